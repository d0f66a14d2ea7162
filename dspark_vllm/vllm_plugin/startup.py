"""Start-up: validate a ``method: dspark`` speculative config and hand the worker its settings.

Runs in the process that builds vLLM's config (the API server, or the ``LLM`` caller) before any
engine process exists. Every mismatch between the checkpoint, the target and the YAML settings
is raised here as a :class:`DSparkStartupError` naming the problem and the fix, not as a
traceback from inside vLLM. What the worker needs (checkpoint folder, validated settings, the
calibration temperatures and cost profile themselves, not their paths) travels as one
:class:`WorkerSettings` JSON in ``DSPARK_VLLM_WORKER``, inherited by the engine and worker
processes (and copied to Ray workers on other nodes, see :func:`carry_to_ray_workers`); the
proposer reads it once. The only file a worker opens is the drafter checkpoint, which must sit
at the same absolute path on every node, as vLLM requires of a local model folder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import CheckpointMismatchError, load_config, validate_against_target, validate_block_size
from ..drafter_config import SUPPORTED_ARCHS, DSparkConfigError
from ..scheduler import require_confidence_head
from ..settings import CONFIGS_DIR, DSparkSettings, SettingsError, load_settings, settings_from_dict
from . import LOGGER_NAME

if TYPE_CHECKING:
    from ..scheduler import VerifyLengthScheduler

PROPOSER_PATH = "dspark_vllm.vllm_plugin.proposer.DSparkV1Proposer"
ENV_CONFIG = "DSPARK_VLLM_CONFIG"    # user's choice of YAML settings (a path or a name in configs/)
ENV_BACKEND = "DSPARK_VLLM_BACKEND"  # "upstream": leave method=dspark to vLLM (MRV2 on CUDA)
ENV_WORKER = "DSPARK_VLLM_WORKER"    # WorkerSettings JSON, written here, read by the proposer
SETTINGS_IN_CHECKPOINT = "dspark.yaml"
DEEPSPEC = "deepspec"          # a separate DeepSpec drafter folder (Qwen3 / Gemma4 targets)
IN_TARGET_V4 = "deepseek_v4"   # DeepSeek-V4: the drafter ships inside the target checkpoint


class DSparkStartupError(ValueError):
    """DSpark cannot start with this configuration; the message says why and what to do."""


RAY_PREFIXES = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"  # vLLM's list of extra prefixes for Ray workers
OUR_PREFIX = "DSPARK_VLLM_"


def carry_to_ray_workers() -> None:
    """Add ``DSPARK_VLLM_`` to the prefixes vLLM's Ray executor copies into its workers.

    Processes that vLLM forks or spawns inherit ``os.environ``; Ray actors (multi-node tensor
    parallelism) get only the variables vLLM lists, so without this a worker on another node
    would have no ``DSPARK_VLLM_WORKER``. The user's own entries are kept.
    """
    current = [p.strip() for p in os.environ.get(RAY_PREFIXES, "").split(",") if p.strip()]
    if OUR_PREFIX not in current:
        os.environ[RAY_PREFIXES] = ",".join(current + [OUR_PREFIX])


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker-side proposer needs, validated once at start-up.

    File contents, not paths, for everything but the checkpoint: a worker on another node has
    neither the head node's YAML folder nor its start-up profile cache.
    """

    checkpoint: str          # the drafter's folder (for DeepSeek-V4: the target's, holding mtp.*)
    settings: dict           # DSparkSettings.model_dump()
    settings_source: str | None = None
    cost_profile: dict | None = None        # CostProfile.to_dict(): configured or measured at start-up
    calibration: list[float] | None = None  # STS temperatures per position; None: identity
    drafter_format: str = DEEPSPEC   # DEEPSPEC folder, or IN_TARGET_V4 (the target's mtp.* stages)

    def dspark_settings(self) -> DSparkSettings:
        return settings_from_dict(self.settings, self.settings_source or "<dict>")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def export(self) -> None:
        """Hand these settings to the engine and worker processes started after this call."""
        os.environ[ENV_WORKER] = self.to_json()
        carry_to_ray_workers()

    def scheduler(self, block_size: int) -> "VerifyLengthScheduler":
        """The verify-length scheduler these settings describe, built from the carried contents."""
        from ..scheduler import CostProfile, STSCalibrator, VerifyLengthScheduler

        calibrator = (STSCalibrator.identity(block_size) if self.calibration is None
                      else STSCalibrator(list(self.calibration)))
        cost = None if self.cost_profile is None else CostProfile(**self.cost_profile)
        return VerifyLengthScheduler.from_settings(self.dspark_settings(), block_size, cost=cost,
                                                   calibrator=calibrator)

    @classmethod
    def from_env(cls) -> "WorkerSettings":
        raw = os.environ.get(ENV_WORKER)
        if not raw:
            raise RuntimeError(f"{ENV_WORKER} is not set: DSparkV1Proposer is created by the dspark plugin from "
                               "a speculative config with method 'dspark' (was the plugin registered?)")
        return cls(**json.loads(raw))

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path, settings: DSparkSettings, measured_profile: str | Path | None = None,
                       drafter_format: str = DEEPSPEC) -> "WorkerSettings":
        """Read the calibration and cost profile the settings name (or ``measured_profile``,
        measured at start-up) here, on the node that starts the server."""
        from ..scheduler.runtime import calibration_path, load_cost_profile
        from ..scheduler import CostProfile, STSCalibrator

        profile = CostProfile.load(measured_profile) if measured_profile else load_cost_profile(settings)
        cal_file = calibration_path(settings, checkpoint)
        temperatures = None if cal_file is None else STSCalibrator.load(cal_file).temperatures
        return cls(str(checkpoint), settings.model_dump(), settings.source,
                   None if profile is None else profile.to_dict(), temperatures, drafter_format)


def settings_path(checkpoint: str | None) -> Path:
    """DSPARK_VLLM_CONFIG (a path or a name in configs/), else dspark.yaml in the checkpoint
    folder, else configs/default.yaml."""
    choice = os.environ.get(ENV_CONFIG)
    if choice:
        p = Path(choice).expanduser()
        if p.exists() or p.suffix in (".yaml", ".yml"):
            return p
        named = CONFIGS_DIR / f"{choice}.yaml"
        if named.exists():
            return named
        raise DSparkStartupError(f"{ENV_CONFIG}={choice!r} is neither a file nor one of "
                                 f"{sorted(x.stem for x in CONFIGS_DIR.glob('*.yaml'))}")
    if checkpoint and (Path(checkpoint) / SETTINGS_IN_CHECKPOINT).exists():
        return Path(checkpoint) / SETTINGS_IN_CHECKPOINT
    return CONFIGS_DIR / "default.yaml"


def is_deepspec_checkpoint(model: str | None) -> bool:
    """A folder whose config.json names one of our drafter architectures."""
    if not model or not (Path(model) / "config.json").exists():
        return False
    archs = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    return bool(set(archs) & set(SUPPORTED_ARCHS))


def is_v4_target(spec) -> bool:
    """A dspark config without a drafter path on a DeepSeek-V4 target (whose checkpoint carries it)."""
    if spec.target_model_config is None or spec.model not in (None, spec.target_model_config.model):
        return False
    from ..v4 import is_deepseek_v4_config

    hf = spec.target_model_config.hf_config
    return is_deepseek_v4_config(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf))


def claims(spec) -> bool:
    """Whether the plugin serves this speculative config (else vLLM's own path does): every
    ``method: dspark`` config unless ``DSPARK_VLLM_BACKEND=upstream``; one it cannot serve (no
    such folder, not a DSpark checkpoint) stops in :func:`prepare_speculative_config` with a
    DSpark message instead of reaching vLLM's loaders."""
    return spec.method == "dspark" and os.environ.get(ENV_BACKEND) != "upstream"


def check_drafter_folder(source: str, checkpoint: str) -> None:
    """Raise FileNotFoundError/DSparkConfigError naming the fix when ``checkpoint`` cannot be ours."""
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"drafter {source!r} is not a local folder. DSpark reads the drafter from its "
                                f"checkpoint folder: download it first (e.g. `huggingface-cli download {source} "
                                "--local-dir DIR`) and pass DIR, or set DSPARK_VLLM_BACKEND=upstream to leave "
                                "method 'dspark' to vLLM's own loader")
    if not is_deepspec_checkpoint(checkpoint):
        raise DSparkConfigError(f"{checkpoint} is not a DSpark drafter checkpoint: its config.json must name one of "
                                f"{sorted(SUPPORTED_ARCHS)} in 'architectures' (a DeepSpec-format DSpark folder)")


def check_parallelism(spec) -> None:
    """Tensor parallelism is supported (every rank drafts alike, ``rank_sync.py``); pipeline
    parallelism is not: the drafter would exist on the last stage only, fed target layers that
    live on other stages."""
    parallel = getattr(spec, "target_parallel_config", None)
    stages = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
    if stages > 1:
        raise ValueError(f"pipeline_parallel_size is {stages}, but DSpark needs every target layer it reads on the "
                         "rank that drafts: serve with --pipeline-parallel-size 1 and scale with "
                         "--tensor-parallel-size instead")


def check_scheduler_files(settings: DSparkSettings, checkpoint: str, block_size: int) -> None:
    """Read the calibration file and cost profile the settings name now, so that a missing or
    malformed one stops start-up here rather than inside the worker."""
    from ..scheduler.runtime import load_calibrator, load_cost_profile

    load_calibrator(settings, checkpoint, block_size)
    load_cost_profile(settings)


def _deepspec_block_size(spec, settings: DSparkSettings, checkpoint: str) -> int:
    config = load_config(checkpoint)
    requested = spec.num_speculative_tokens or settings.num_speculative_tokens
    target = spec.target_model_config.hf_config if spec.target_model_config is not None else None
    require_confidence_head(settings.scheduler.policy, config.enable_confidence_head)
    if target is not None:
        validate_against_target(config, target, requested)
    else:
        validate_block_size(config, requested)
    return config.block_size


def _v4_block_size(spec, settings: DSparkSettings, checkpoint: str) -> int:
    from ..v4.loader import check_v4_checkpoint

    config, _ = check_v4_checkpoint(checkpoint)
    require_confidence_head(settings.scheduler.policy, config.enable_confidence_head)
    requested = spec.num_speculative_tokens or settings.num_speculative_tokens
    if requested is not None and int(requested) != config.block_size:
        raise CheckpointMismatchError(f"num_speculative_tokens is {requested} but the DeepSeek-V4 drafter was trained "
                                      f"with dspark_block_size {config.block_size}: set it to {config.block_size} (or "
                                      "leave it unset) and trim verification with the scheduler policy instead")
    return config.block_size


def _startup_profile(spec, settings: DSparkSettings) -> Path | None:
    """The start-up profile's path, or None (logged) where one cannot be measured.

    The profile is measured by a one-GPU child engine; a target served with tensor parallelism
    needs its GPUs together (and may not fit one), so there it is skipped and the configured
    ``cost_profile`` (or the synthetic curve, scaled by the learned served cost) is used."""
    from .startup_profile import ensure_startup_profile

    parallel = getattr(spec, "target_parallel_config", None)
    tp = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
    log = logging.getLogger(LOGGER_NAME)
    if tp > 1:
        log.warning("DSpark: profile_at_startup skipped: the target is served with tensor_parallel_size %d and the "
                    "profile runs a one-GPU engine; using %s. Measure one offline with `dspark-vllm profile` and "
                    "set scheduler.cost_profile to it.", tp,
                    settings.scheduler.cost_profile or "a synthetic cost curve scaled by the learned step cost")
        return None
    dtype = str(spec.target_model_config.dtype).replace("torch.", "")
    try:
        return ensure_startup_profile(spec.target_model_config.model, settings.scheduler.profile_max_tokens, dtype)
    except Exception as exc:  # the child's own output (above in the log) says what failed inside vLLM
        message = (f"DSpark start-up failed: profile_at_startup could not profile {spec.target_model_config.model} "
                   f"({type(exc).__name__}: {exc}). Set scheduler.profile_at_startup: false (optionally with "
                   "scheduler.cost_profile from `dspark-vllm profile`) to serve without it.")
        log.error(message)
        raise DSparkStartupError(message) from None


def prepare_speculative_config(spec) -> None:
    """Validate a dspark SpeculativeConfig, export the worker's settings and route the config
    to our V1 proposer through vLLM's ``custom_class`` method (mutates ``spec``)."""
    from . import check_vllm_version

    check_vllm_version()
    in_target = is_v4_target(spec)
    source = spec.target_model_config.model if in_target else spec.model
    try:
        if source is None:
            raise FileNotFoundError("speculative config method 'dspark' needs the drafter's folder in 'model' "
                                    "(only a DeepSeek-V4 target carries its drafter inside its own checkpoint)")
        checkpoint = str(Path(source).expanduser().resolve())
        check_parallelism(spec)
        if not in_target:
            check_drafter_folder(source, checkpoint)
        settings = load_settings(settings_path(checkpoint))
        block = (_v4_block_size if in_target else _deepspec_block_size)(spec, settings, checkpoint)
        check_scheduler_files(settings, checkpoint, block)
    except (CheckpointMismatchError, DSparkConfigError, SettingsError, FileNotFoundError, ValueError) as exc:
        message = f"DSpark start-up failed: {exc}"
        # vLLM prints a long traceback before the exception's own line: say it first.
        logging.getLogger(LOGGER_NAME).error(message)
        raise DSparkStartupError(message) from None
    profile = None
    if settings.scheduler.profile_at_startup and spec.target_model_config is not None:
        profile = _startup_profile(spec, settings)
    WorkerSettings.for_checkpoint(checkpoint, settings, profile, IN_TARGET_V4 if in_target else DEEPSPEC).export()
    spec.num_speculative_tokens = block
    spec.method = "custom_class"
    spec.model = PROPOSER_PATH
