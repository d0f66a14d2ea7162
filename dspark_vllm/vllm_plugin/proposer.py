"""DSpark proposer for vLLM's V1 model runner: plain step in, drafts out.

vLLM builds it through its ``custom_class`` hook (``startup.py`` routes ``method: dspark``
there); the runner patches (``patches.py``) call :meth:`DSparkV1Proposer.propose_step` after each
target step with a :class:`~.runner_io.StepInput` and hand its :class:`~.runner_io.StepDrafts`
back to vLLM. One step, as :meth:`DSparkV1Proposer._propose` reads:

1. forget departed requests and queue this step's valid target features
   (:class:`~.request_contexts.RequestContexts`, which owns every decision about when queued
   context is written into the paged pool);
2. record the acceptance of the drafts the step just verified (metrics);
3. plan: which ready requests draft and how deep (the scheduler's draft gate; a seeded request
   always drafts its whole block, so its text never depends on clocks);
4. draft a block from [last sampled token, MASK...] over each drafting request's context and trim
   it with the verify-length policy under the step's load;
5. hand back the token lists, and q for probabilistic drafts (``draft_sampling: probabilistic``:
   drafts sampled at the request's temperature; ``greedy`` or T=0: one-hot q). Either way vLLM's
   verification keeps the target distribution.

Host syncs per step do not depend on the batch size: a drafted step copies the draft tokens and
the confidence logits to the host (two waits); a gated step waits for nothing.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..drafter_protocol import DraftModel
from ..paged_context import to_device
from ..sampling import GREEDY_EPS, SEED_LIMIT, derive_seed
from ..scheduler import StepLoad
from . import LOGGER_NAME
from .faults import FaultLog
from .gate_timing import StepClock, calibrate_gate
from .metrics import ProposerMetrics
from .rank_sync import RankSync
from .request_contexts import RequestContexts, RequestState
from .runner_io import KVLayout, StepDrafts, StepInput, kv_layout
from .startup import IN_TARGET_V4, WorkerSettings
from .workspace import max_drafting_requests
from .step_trace import StepTrace

logger = logging.getLogger(LOGGER_NAME)


def load_drafter(worker: WorkerSettings, dtype: torch.dtype | None, draft_vocab_size: int | None) -> DraftModel:
    """The drafter the settings name: a DeepSpec folder, or the stages inside a DeepSeek-V4 target
    (whose embedding and LM head are bound from the served target in :meth:`DSparkV1Proposer.load_model`)."""
    if worker.drafter_format == IN_TARGET_V4:
        from ..v4.loader import load_v4_drafter

        return load_v4_drafter(worker.checkpoint, dtype=dtype, bind_embeddings=False)
    return load_checkpoint(worker.checkpoint, dtype=dtype, draft_vocab_size=draft_vocab_size)


def target_embedding_weights(target_model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding, LM head) weights of a vLLM causal LM (tied heads share one tensor)."""
    inner = getattr(target_model, "model", None) or getattr(target_model, "language_model", None)
    embed = getattr(inner, "embed_tokens", None) if inner is not None else None
    if embed is None or not hasattr(embed, "weight"):
        raise RuntimeError(f"cannot find embed_tokens on {type(target_model).__name__}: this DSpark drafter "
                           "was saved without its embeddings; re-save it with embeddings included")
    head = getattr(target_model, "lm_head", None)
    head_weight = getattr(head, "weight", None)
    return embed.weight, (head_weight if isinstance(head_weight, torch.Tensor) else embed.weight)


def draft_seeds(step: StepInput, rows: list[int], states: list[RequestState], generator: torch.Generator
                ) -> torch.Tensor:
    """[N] draft seeds of the drafting ``rows``: a seeded request's from its seed and anchor
    position (its drafts are then reproducible), the others' from ``generator``."""
    seeds = torch.randint(0, SEED_LIMIT, (len(rows),), generator=generator)
    for j, (i, state) in enumerate(zip(rows, states)):
        if step.seeds[i] is not None:
            seeds[j] = derive_seed(int(step.seeds[i]), state.next_pos)
    return seeds


class DSparkV1Proposer:
    """Conducts one step at a time: request contexts, scheduler plan, drafter, hand-back."""

    def __init__(self, vllm_config) -> None:
        worker = WorkerSettings.from_env()
        self.vllm_config = vllm_config
        self.settings = worker.dspark_settings()
        dtype = vllm_config.model_config.dtype
        self.drafter: DraftModel = load_drafter(worker, dtype if isinstance(dtype, torch.dtype) else None,
                                    self.settings.draft_vocab_size)
        self.block_size = self.drafter.block_size
        self.scheduler = worker.scheduler(self.block_size)
        self.scheduler.check_drafter(self.drafter.confidence_head is not None)
        self.sync = RankSync.from_vllm()  # clock observations: one journal for every TP rank
        self._observe = functools.partial(self.sync.observe, self.scheduler)
        self.max_num_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
        caching = bool(getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", False))
        self.contexts = RequestContexts(self.drafter, caching, functools.partial(self._observe, "observe_ingest"))
        self.layout: KVLayout | None = None
        self.max_drafting = int(vllm_config.scheduler_config.max_num_seqs)  # requests drafting per step (workspace)
        self.metrics = ProposerMetrics(self.block_size)
        self.seed_gen = torch.Generator().manual_seed(0)  # draft seeds of unseeded requests
        # per request: (calibrated confidences of the drafts handed to vLLM last step, depth drafted)
        self.pending: dict[str, tuple[list[float], int]] = {}
        self.clock, self.faults = StepClock(), FaultLog()
        self.trace = StepTrace.from_env()  # DSPARK_VLLM_STEP_TRACE: one JSON line per step
        self._calibrated = False  # the first draft pays one-off costs, then seeds the gate's timers
        logger.info("DSpark proposer: %s, block %d, policy %s", worker.checkpoint, self.block_size,
                    self.settings.scheduler.policy)

    pool = property(lambda self: self.contexts.pool)  # state the request contexts own
    context = property(lambda self: self.contexts.queue)
    requests = property(lambda self: self.contexts.requests)

    # ---- vLLM hooks ------------------------------------------------------------------------
    def attach(self, runner) -> None:
        self.drafter.to(runner.device)

    def context_bytes_per_token(self) -> int:
        """What the pool costs per target KV slot (the plugin reserves it from vLLM's budget)."""
        return self.drafter.context_bytes_per_token()

    def bind_kv_cache(self, runner) -> None:
        """Allocate the pool once vLLM has sized its KV cache: one draft slot per target slot."""
        self.layout = kv_layout(runner)
        self.contexts.bind(self.drafter.new_pool(self.layout.num_slots))
        self.max_drafting = max_drafting_requests(self.layout.target_bytes + self.pool.nbytes, int(
            self.vllm_config.scheduler_config.max_num_seqs), self.block_size, self.drafter.config.vocab_size)
        self.pending.clear()
        self.metrics.context_pool_bytes = self.pool.nbytes
        logger.info("DSpark draft context pool: %d token slots x %d B = %.1f MiB, mirroring KV cache group %d "
                    "(vLLM's own KV cache: %.1f MiB); at most %d requests draft per step (workspace)",
                    self.layout.num_slots, self.context_bytes_per_token(), self.pool.nbytes / 2**20, self.layout.group,
                    self.layout.target_bytes / 2**20, self.max_drafting)

    @property
    def kv_group(self) -> int:
        """The KV-cache group whose block table addresses the pool (see ``runner_io.kv_layout``)."""
        if self.layout is None:
            raise RuntimeError("DSpark's draft context pool is not allocated: the runner's initialize_kv_cache "
                               "was not wrapped (was the dspark plugin registered in this process?)")
        return self.layout.group

    def aux_layer_ids(self) -> tuple[int, ...]:
        """vLLM aux-layer indices: DeepSpec id t is the output of layer t = vLLM index t + 1."""
        return tuple(i + 1 for i in self.drafter.config.target_layer_ids)

    def load_model(self, target_model) -> None:
        """After vLLM loads the target, a shared-embedding drafter takes the target's embedding and LM
        head (gathered once from the vocab-parallel shards under tensor parallelism: a copy per rank)."""
        if self.drafter.embeddings_bound:
            return
        embed, lm_head = (self.sync.gather_rows(w) for w in target_embedding_weights(target_model))
        self.drafter.bind_target_embeddings(embed, lm_head)
        logger.info("DSpark drafter bound to the target's embedding and LM head (%.1f MiB on this rank)",
                    (self.drafter.embed_tokens.weight.nbytes + self.drafter.lm_head.weight.nbytes) / 2**20)

    def propose(self, *args, **kwargs):
        raise RuntimeError("DSparkV1Proposer.propose is driven through propose_step by the dspark plugin; "
                           "was the plugin registered in this process (VLLM_PLUGINS)?")

    # ---- per step --------------------------------------------------------------------------
    @torch.no_grad()
    def propose_step(self, step: StepInput) -> StepDrafts:
        """Draft for the batch after each target step; the time since the previous call (one engine
        step, drafting excluded) and its tokens teach the scheduler's step-cost estimator."""
        if self.pool is None:
            raise RuntimeError("DSpark's draft context pool is not allocated: the runner's initialize_kv_cache "
                               "was not wrapped (was the dspark plugin registered in this process?)")
        step_ms, verified = self.clock.step_ended()
        if step_ms is not None:
            self._observe("observe_step", step.total_tokens, step_ms, verified)
            learned = self.scheduler.snapshot()
            self.metrics.record_learned(learned.cost_scale, learned.verify_premium)
        try:
            return self._propose(step)
        finally:
            self.clock.proposer_returned()

    def step_failed(self, exc: BaseException, req_ids: list[str]) -> StepDrafts:
        """A fault anywhere in the step (``patches.propose_guarded``): no drafts, per-request state
        dropped (only acceptance can suffer), logged once per kind and counted."""
        try:
            self.faults.record(exc, req_ids)
            self.contexts.reset()
            self.pending.clear()
            self.clock.handed_out = 0
            self.metrics.record_fault()
            self.metrics.maybe_flush()
        except Exception:  # noqa: BLE001 - the recovery itself must never take a step down
            logger.debug("DSpark: recovering from a step fault failed", exc_info=True)
        return StepDrafts([[] for _ in req_ids])

    def _propose(self, step: StepInput) -> StepDrafts:
        gone = self.contexts.release_departed(step)
        for req_id in gone:
            self.pending.pop(req_id, None)
        self.scheduler.forget(gone)
        rows, states = self.contexts.admit(step)
        self.metrics.record_verified_step(self.pending, step.req_ids, step.num_spec, step.sampled, rows)
        load = StepLoad(base_tokens=len(step.req_ids) - len(rows), max_num_tokens=self.max_num_tokens)
        picked, depth = self._pick(step, rows, load)
        if not picked:  # nothing to draft from, or gated: plain decoding this step
            self.contexts.while_gated()
            if rows:
                self.metrics.record_gated()
                self.metrics.maybe_flush()
            self._trace(step, len(rows), 0, 0, None)
            return StepDrafts([[] for _ in step.req_ids])
        ready, rows, states = len(rows), [rows[j] for j in picked], [states[j] for j in picked]
        load = StepLoad(base_tokens=len(step.req_ids) - len(rows), max_num_tokens=self.max_num_tokens)
        return self._draft(step, rows, states, depth, load, ready)

    def _pick(self, step: StepInput, rows: list[int], load: StepLoad) -> tuple[list[int], int]:
        """(indices into ``rows`` that draft this step, draft depth): the scheduler's plan, plus
        every seeded request at the full block (reproducible text whatever the clocks say)."""
        if not rows:
            return [], self.block_size
        plan = self.scheduler.plan(len(rows), load)
        picked, depth = (plan.rows(len(rows)) if plan.requests else []), plan.depth or self.block_size
        seeded = [j for j, i in enumerate(rows) if step.seeds[i] is not None]
        if seeded:
            picked, depth = sorted(set(picked) | set(seeded)), self.block_size
        if len(picked) > self.max_drafting:  # the workspace bound (workspace.py): seeded requests first
            picked = sorted(sorted(picked, key=lambda j: step.seeds[rows[j]] is None)[: self.max_drafting])
        return picked, depth

    def _draft(self, step: StepInput, rows: list[int], states: list[RequestState], depth: int,
               load: StepLoad, ready: int) -> StepDrafts:
        # Shortest context first: the view cuts requests into chunks of similar length.
        order = sorted(range(len(rows)), key=lambda j: states[j].next_pos - states[j].start)
        rows, states = [rows[j] for j in order], [states[j] for j in order]
        self.contexts.before_draft(states)
        req_ids = [step.req_ids[i] for i in rows]
        view = self.contexts.view(step, rows, states)
        anchor = to_device(np.array([step.sampled[i][-1] for i in rows], dtype=np.int64), self.drafter.device)
        temps = step.temperatures[rows] if self.settings.draft_sampling == "probabilistic" else np.zeros(len(rows))
        all_greedy = bool((temps < GREEDY_EPS).all())
        temperature = to_device(temps.astype(np.float32), self.drafter.device)
        seeds = draft_seeds(step, rows, states, self.seed_gen)
        fused = self.drafter.can_fuse_sampling
        if not self._calibrated:  # first-call allocations and weight gathers, then the gate's timers
            self.drafter.propose(anchor, view, temperature, fused=fused, seeds=seeds, all_greedy=all_greedy)
            calibrate_gate(self.drafter, self.scheduler, self._observe, anchor, view, temperature, all_greedy,
                           self.max_drafting, self.seed_gen)
            self._calibrated = True
        t_draft = time.perf_counter()
        block = self.drafter.propose(anchor, view, temperature, fused=fused, seeds=seeds, depth=depth,
                                     all_greedy=all_greedy)
        tokens = block.tokens.tolist()  # host sync 1 of 2
        logits = None if block.confidence_logits is None else block.confidence_logits.float().numpy(force=True)  # 2
        conf = self.scheduler.confidences(logits)
        lengths = [depth if step.seeds[i] is not None else int(n)
                   for i, n in zip(rows, self.scheduler.lengths(conf, req_ids, load=load, width=depth))]
        draft_ms = (time.perf_counter() - t_draft) * 1000.0
        self._observe("observe_draft", conf, draft_ms)
        out: list[list[int]] = [[] for _ in step.req_ids]
        for j, (i, toks, n) in enumerate(zip(rows, tokens, lengths)):
            out[i] = toks[:n]
            if n > 0:
                self.pending[req_ids[j]] = (conf[j, :n].tolist() if conf is not None else [float("nan")] * n, depth)
        self.metrics.record_step()
        self.clock.handed_out = sum(lengths)
        self.metrics.maybe_flush()
        self._trace(step, ready, len(rows), depth, draft_ms)
        return StepDrafts(out, block.probs, req_ids if block.probs is not None else None)

    def _trace(self, step: StepInput, ready: int, drafting: int, depth: int, draft_ms: float | None) -> None:
        if self.trace.enabled:
            self.trace.proposer_step(batch=len(step.req_ids), ready=ready, drafting=drafting, depth=depth,
                                     learned=self.scheduler.snapshot(), last_step=self.clock.last,
                                     emitted=sum(len(row) for row in step.sampled), draft_ms=draft_ms,
                                     ingest_ms=self.contexts.ingest_ms)
