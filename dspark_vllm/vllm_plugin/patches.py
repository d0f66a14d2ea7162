"""The few vLLM functions the plugin wraps (see package docstring); each wrapper is a no-op for
everything except a DSpark config handled by this plugin."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from ..checkpoint import CheckpointMismatchError, load_config, validate_against_target
from ..config import SUPPORTED_ARCHS, DSparkConfigError
from . import LOGGER_NAME
from ..settings import CONFIGS_DIR, SettingsError, load_settings

PROPOSER_PATH = "dspark_vllm.vllm_plugin.proposer.DSparkV1Proposer"
ENV_CHECKPOINT = "DSPARK_VLLM_CHECKPOINT"
ENV_CONFIG = "DSPARK_VLLM_CONFIG"
ENV_BACKEND = "DSPARK_VLLM_BACKEND"  # "upstream": leave method=dspark to vLLM (MRV2 on CUDA)
SETTINGS_IN_CHECKPOINT = "dspark.yaml"
logger = logging.getLogger(LOGGER_NAME)


class DSparkStartupError(ValueError):
    """DSpark cannot start with this configuration; the message says why and what to do."""


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


def _is_deepspec_checkpoint(model: str | None) -> bool:
    if not model or not (Path(model) / "config.json").exists():
        return False
    import json

    archs = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    return bool(set(archs) & set(SUPPORTED_ARCHS))


def prepare_speculative_config(spec) -> None:
    """Validate a dspark SpeculativeConfig and route it to our V1 proposer (mutates ``spec``)."""
    from . import check_vllm_version

    check_vllm_version()
    checkpoint = str(Path(spec.model).expanduser().resolve())
    try:
        config = load_config(checkpoint)
        settings = load_settings(settings_path(checkpoint))
        requested = spec.num_speculative_tokens or settings.num_speculative_tokens
        target = spec.target_model_config.hf_config if spec.target_model_config is not None else None
        if not config.enable_confidence_head and settings.scheduler.policy != "fixed":
            raise DSparkConfigError(f"scheduler policy '{settings.scheduler.policy}' needs the drafter's confidence "
                                    "head, but this checkpoint has enable_confidence_head=false; set "
                                    "`scheduler: {policy: fixed}` in the YAML settings")
        if target is not None:
            validate_against_target(config, target, requested)
        elif requested is not None and requested != config.block_size:
            validate_against_target(config, {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                                             "num_hidden_layers": max(config.target_layer_ids) + 2}, requested)
    except (CheckpointMismatchError, DSparkConfigError, SettingsError, FileNotFoundError) as exc:
        raise DSparkStartupError(f"DSpark start-up failed: {exc}") from None
    os.environ[ENV_CHECKPOINT] = checkpoint
    os.environ[ENV_CONFIG] = str(settings_path(checkpoint))
    if settings.scheduler.profile_at_startup and spec.target_model_config is not None:
        from .startup_profile import ENV_COST_PROFILE, ensure_startup_profile

        dtype = str(spec.target_model_config.dtype).replace("torch.", "")
        os.environ[ENV_COST_PROFILE] = str(ensure_startup_profile(spec.target_model_config.model,
                                                                  settings.scheduler.profile_max_tokens, dtype))
    spec.num_speculative_tokens = config.block_size
    spec.method = "custom_class"
    spec.model = PROPOSER_PATH


def _wrap_speculative_config() -> None:
    from vllm.config.speculative import SpeculativeConfig

    original = SpeculativeConfig.__post_init__
    if getattr(original, "_dspark_wrapped", False):
        return

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        if (self.method == "dspark" and os.environ.get(ENV_BACKEND) != "upstream"
                and _is_deepspec_checkpoint(self.model)):
            prepare_speculative_config(self)
        return original(self, *args, **kwargs)

    __post_init__._dspark_wrapped = True  # type: ignore[attr-defined]
    SpeculativeConfig.__post_init__ = __post_init__


def _is_ours(runner) -> bool:
    from .proposer import DSparkV1Proposer

    return isinstance(getattr(runner, "drafter", None), DSparkV1Proposer)


def _plain_sampling_suffices(spec_decode_metadata, sampling_metadata) -> bool:
    """True when a step verifies no drafts at all and plain sampling gives the same output.

    With a speculative config vLLM's V1 runner sends *every* step through the rejection
    sampler, even one without a single draft token (the draft gate's plain-decoding steps):
    the same one token per request, sampled by the same sampler from the same logits, but via
    extra clones, a bonus-token pass and a Triton-interpreter rejection kernel, ~1 ms of a
    ~120 ms 16-request step on the 2-core CPU. Logprob requests and thinking budgets keep the
    rejection path (their outputs are laid out for it)."""
    if max(spec_decode_metadata.num_draft_tokens, default=0) != 0:
        return False
    if sampling_metadata.max_num_logprobs is not None or getattr(sampling_metadata, "logprob_token_ids", None):
        return False
    holder = getattr(sampling_metadata, "thinking_budget_state_holder", None)
    return holder is None or not holder.has_tracked_requests()


def _wrap_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_dspark_wrapped", False):
        return
    init, aux_layers, propose, sample, sample_tokens, init_kv = (
        GPUModelRunner.__init__, GPUModelRunner._get_eagle3_aux_layers_from_config,
        GPUModelRunner.propose_draft_token_ids, GPUModelRunner._sample, GPUModelRunner.sample_tokens,
        GPUModelRunner.initialize_kv_cache)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if _is_ours(self):
            self.use_aux_hidden_state_outputs = True
            self.drafter.attach(self)

    @functools.wraps(init_kv)
    def initialize_kv_cache(self, *args, **kwargs):
        out = init_kv(self, *args, **kwargs)
        if _is_ours(self):
            self.drafter.bind_kv_cache(self)
        return out

    @functools.wraps(aux_layers)
    def _get_eagle3_aux_layers_from_config(self):
        if _is_ours(self):
            return self.drafter.aux_layer_ids()
        return aux_layers(self)

    @functools.wraps(propose)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                common_attn_metadata, slot_mappings):
        if _is_ours(self):
            self._draft_probs = None
            self._draft_prob_req_ids = None
            return self.drafter.propose_step(self, scheduler_output, sampled_token_ids, aux_hidden_states)
        return propose(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                       sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                       slot_mappings)

    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        if spec_decode_metadata is not None and _is_ours(self) and _plain_sampling_suffices(
                spec_decode_metadata, self.input_batch.sampling_metadata):
            spec_decode_metadata = None
        return sample(self, logits, spec_decode_metadata, *args, **kwargs)

    @functools.wraps(sample_tokens)
    def sample_tokens_(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        if _is_ours(self) and not self.use_async_scheduling:
            attach_draft_token_ids(output, self)
        return output

    GPUModelRunner.__init__ = __init__
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner._sample = _sample
    GPUModelRunner.sample_tokens = sample_tokens_
    GPUModelRunner._get_eagle3_aux_layers_from_config = _get_eagle3_aux_layers_from_config
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
    GPUModelRunner._dspark_wrapped = True


DRAFTS_ATTR = "dspark_draft_token_ids"  # ModelRunnerOutput attribute carrying this step's drafts


def attach_draft_token_ids(output, runner) -> None:
    """Worker side of the draft hand-over: put this step's drafts on the step's output.

    Without it vLLM's engine core fetches them with a second worker RPC after every step
    (``EngineCore.post_step`` -> ``take_draft_token_ids``): ~1 ms per step of a served 16-client
    run on the 2-core CPU, on the critical path of every step, drafted or gated. The output is
    pickled to the engine core with its attributes; the engine-core half is
    :func:`_wrap_engine_core`. vLLM's shared empty output is never touched."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, DRAFTS_ATTR, runner.take_draft_token_ids())


def _wrap_engine_core() -> None:
    """Engine-core side of the draft hand-over: a step output that carries its drafts feeds them
    to the scheduler right after ``update_from_output`` (where vLLM's RPC in ``post_step`` would
    have put them, nothing reads them in between) and that step's ``post_step`` skips the RPC. An
    output without them (other proposers, async scheduling, an empty step) keeps vLLM's path."""
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore

        update, post_step = Scheduler.update_from_output, EngineCore.post_step
    except (ImportError, AttributeError) as exc:  # another layout: vLLM's RPC still delivers the drafts
        logger.debug("DSpark: engine-core draft hand-over not installed (%s)", exc)
        return
    if getattr(Scheduler, "_dspark_wrapped", False):
        return

    @functools.wraps(update)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        out = update(self, scheduler_output, model_runner_output, *args, **kwargs)
        carried = hasattr(model_runner_output, DRAFTS_ATTR)
        self._dspark_drafts_delivered = carried
        if carried and (drafts := getattr(model_runner_output, DRAFTS_ATTR)) is not None:
            self.update_draft_token_ids(drafts)
        return out

    @functools.wraps(post_step)
    def post_step_(self, model_executed: bool) -> None:
        if getattr(self.scheduler, "_dspark_drafts_delivered", False):
            self.scheduler._dspark_drafts_delivered = False
            return
        post_step(self, model_executed)

    Scheduler.update_from_output = update_from_output
    EngineCore.post_step = post_step_
    Scheduler._dspark_wrapped = True


def draft_context_share(worker, available: int) -> int:
    """Bytes of the KV budget ``available`` that the draft context pool needs, so that vLLM's
    cache and the pool, one draft slot per target slot, together fit in it: with T and D the
    target's and the drafter's K/V bytes per token, the pool takes D / (T + D). Exact for a
    single KV-cache group (every attention layer alike); for hybrid targets vLLM packs groups
    into shared tensors, T is then overestimated and the pool may end up a little larger than
    its share (the start-up log states both)."""
    from .runner_io import target_bytes_per_token

    target = target_bytes_per_token(worker.model_runner.get_kv_cache_spec())
    draft = worker.model_runner.drafter.context_bytes_per_token()
    return int(available * draft / (target + draft)) if target > 0 else 0


def _wrap_available_memory() -> None:
    """Take the draft context pool's bytes out of the KV budget each worker reports, before the
    engine sizes vLLM's cache from it (CPU and GPU workers each define their own)."""
    classes = []
    for module, name in (("vllm.v1.worker.gpu_worker", "Worker"), ("vllm.v1.worker.cpu_worker", "CPUWorker")):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except Exception as exc:  # noqa: BLE001 - a platform without this worker (or its ops)
            logger.debug("DSpark: %s.%s not wrapped (%s)", module, name, exc)
    for cls in classes:
        original = cls.__dict__.get("determine_available_memory")
        if original is None or getattr(original, "_dspark_wrapped", False):
            continue

        @functools.wraps(original)
        def determine_available_memory(self, *args, _original=original, **kwargs):
            if getattr(self, "_dspark_in_budget", False):  # a subclass calling its parent
                return _original(self, *args, **kwargs)
            self._dspark_in_budget = True
            try:
                available = int(_original(self, *args, **kwargs))
            finally:
                self._dspark_in_budget = False
            if not _is_ours(self.model_runner):
                return available
            share = draft_context_share(self, available)
            logger.info("DSpark: %.1f MiB of the %.1f MiB KV budget go to the draft context pool",
                        share / 2**20, available / 2**20)
            return available - share

        determine_available_memory._dspark_wrapped = True  # type: ignore[attr-defined]
        cls.determine_available_memory = determine_available_memory


# Every vLLM symbol the plugin wraps or reads, with the reason (docs/vllm-adapter.md explains
# each; tests/test_runner_patches.py checks they all exist in the installed vLLM).
VLLM_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("vllm.config.speculative.SpeculativeConfig.__post_init__",
     "wrapped: validate a dspark config against the target, route it to the custom_class proposer"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner.__init__", "wrapped: turn on aux hidden states, attach the proposer"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_eagle3_aux_layers_from_config",
     "wrapped: aux layers = the checkpoint's target_layer_ids"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids",
     "wrapped: hand the proposer the step's aux hidden states"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
     "wrapped: a step with no drafts samples plainly instead of through the rejection sampler"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens", "wrapped: drafts ride on the step's output"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner.initialize_kv_cache",
     "wrapped: allocate the draft context pool once vLLM sized its KV cache"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner.get_kv_cache_spec", "read: target KV bytes per token"),
    ("vllm.v1.worker.gpu_worker.Worker.determine_available_memory", "wrapped: the pool's share of the KV budget"),
    ("vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory", "wrapped: the same on CPU"),
    ("vllm.v1.core.sched.scheduler.Scheduler.update_from_output", "wrapped: take the drafts carried by the output"),
    ("vllm.v1.engine.core.EngineCore.post_step", "wrapped: skip the draft RPC when the output carried them"),
    ("vllm.v1.outputs.ModelRunnerOutput", "read: the step output the drafts ride on"),
    ("vllm.v1.worker.block_table.BlockTable", "read: block_table / slot_mapping / block_size of the KV group"),
    ("vllm.v1.kv_cache_interface.FullAttentionSpec", "read: the KV group whose slots the pool mirrors"),
)


def resolve_symbol(dotted: str):
    """The object at ``dotted`` (module path, then attributes), or raise AttributeError/ImportError."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module found for {dotted}")


def install() -> None:
    _wrap_speculative_config()
    _wrap_model_runner()
    _wrap_available_memory()
    _wrap_engine_core()
