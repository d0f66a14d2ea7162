"""DSpark proposer for vLLM's V1 model runner: plain step in, drafts out.

vLLM builds it through its ``custom_class`` hook (``startup.py`` routes ``method: dspark``
there); the runner patches (``patches.py``) call :meth:`DSparkV1Proposer.propose_step` after each
target step with a :class:`~.runner_io.StepInput` and hand its :class:`~.runner_io.StepDrafts`
back to vLLM. The drafter's context K/V live in a :class:`PagedContextPool` whose slots mirror
the target's KV slots (``paged_context.py``), sized when vLLM sizes its KV cache and taken out of
the same memory budget. Per step:

1. queue the features of this step's *valid* tokens with their target slots: every scheduled
   prompt token, or for a decode step the anchor plus the drafts that were accepted
   (= len(sampled) - 1); they are projected into the pool when the request next drafts
   (``pending_context.py``: gated steps under load then cost almost nothing), when its request
   leaves the batch while prefix caching is on (its blocks may be hit later), or when a new
   request arrives with a prefix-cache hit (it reads blocks other requests wrote);
2. ask the scheduler's plan (``scheduler/runtime.py``) which requests draft and how deep: the
   draft gate of cost-aware policies skips steps where no verify length could pay;
3. draft a block from [last sampled token, MASK...] over each drafting request's whole context,
   cached prefix included, and trim it with the configured policy under the step's load. With
   ``draft_sampling: probabilistic`` (default) each request's drafts are sampled at its own
   temperature and their q goes to vLLM with the drafts; with ``greedy`` (or at temperature 0)
   q is one-hot. Either way vLLM's verification keeps the target distribution.

Host syncs per step do not depend on the batch size: a drafted step copies the draft tokens and
the confidence logits to the host (two waits); a gated step waits for nothing.

Positions are absolute (pool slot <-> token position). A request whose positions jump past
what it had (steps the runner did not show us) or back (recomputed) keeps drafting, from the
context it has from then on; outputs never depend on the context, only acceptance does.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..oracle import OracleDrafts
from ..paged_context import PagedContextPool, PagedContextView, to_device
from ..pending_context import PendingContext
from ..sampling import GREEDY_EPS, SEED_LIMIT, derive_seed
from ..scheduler import CostProfile, DraftPlan, StepLoad, VerifyLengthScheduler
from . import LOGGER_NAME
from .metrics import ProposerMetrics
from .runner_io import KVLayout, StepDrafts, StepInput, kv_layout
from .startup import IN_TARGET_V4, WorkerSettings
from .step_trace import StepTrace

logger = logging.getLogger(LOGGER_NAME)


ENV_ORACLE = "DSPARK_VLLM_ORACLE"
ENV_ORACLE_CORRUPT = "DSPARK_VLLM_ORACLE_CORRUPT"
DRAFT_TIMING_SIZES = (1, 2, 4, 8, 16, 32)  # batch sizes timed once (full block) to seed the gate's d(n) fit
SHALLOW_TIMING_DEPTHS = (1, 2)  # depths also timed at the largest of those sizes (under load the gate drafts shallow)
INGEST_TIMING_TOKENS = (1, 4)  # context tokens per request timed once at that size to seed the ingestion fit


def oracle_from_env(block_size: int, vocab_size: int) -> OracleDrafts | None:
    """Test hook: ``DSPARK_VLLM_ORACLE`` names a JSON file of full token sequences (prompt +
    continuation); a request whose history is a prefix of one gets the next B tokens as drafts,
    draft ``DSPARK_VLLM_ORACLE_CORRUPT`` changed. The drafter still runs; only its tokens are
    replaced, and the gate is bypassed (every request drafts the full block)."""
    path = os.environ.get(ENV_ORACLE)
    if not path:
        return None
    corrupt = os.environ.get(ENV_ORACLE_CORRUPT)
    return OracleDrafts.from_json(path, block_size, vocab_size, int(corrupt) if corrupt not in (None, "") else None)


def load_drafter(worker: WorkerSettings, dtype: torch.dtype | None, draft_vocab_size: int | None):
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


def _fault_site(exc: BaseException) -> str:
    """file:line:function of the innermost frame of ``exc``'s traceback inside this package
    (a fault deep in torch is named by the DSpark line that called into it)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tb, site = exc.__traceback__, "?"
    while tb is not None:
        code = tb.tb_frame.f_code
        if site == "?" or os.path.abspath(code.co_filename).startswith(package):
            site = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}:{code.co_name}"
        tb = tb.tb_next
    return site


@dataclass
class _RequestState:
    key: int        # this request's queue in PendingContext
    start: int      # first context position the drafter attends to (0 unless positions jumped)
    next_pos: int   # absolute position of the next token whose features we expect


class DSparkV1Proposer:
    """Owns the drafter, its paged context pool, and the verify-length scheduler."""

    def __init__(self, vllm_config) -> None:
        worker = WorkerSettings.from_env()
        self.vllm_config = vllm_config
        self.settings = worker.dspark_settings()
        dtype = vllm_config.model_config.dtype
        self.drafter = load_drafter(worker, dtype if isinstance(dtype, torch.dtype) else None,
                                    self.settings.draft_vocab_size)
        self.block_size = self.drafter.block_size
        cost = CostProfile.load(worker.cost_profile) if worker.cost_profile else None
        self.scheduler = VerifyLengthScheduler.from_settings(self.settings, self.block_size, worker.checkpoint,
                                                             cost=cost)
        self.max_num_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
        cache_config = getattr(vllm_config, "cache_config", None)
        # Blocks of a finished request can be hit by a later one only with prefix caching on.
        self.prefix_caching = bool(getattr(cache_config, "enable_prefix_caching", False))
        self.pool: PagedContextPool | None = None
        self.layout: KVLayout | None = None
        self.context: PendingContext | None = None
        self.requests: dict[str, _RequestState] = {}
        self._keys = itertools.count()
        self.oracle = oracle_from_env(self.block_size, self.drafter.config.vocab_size)
        self.scheduler.check_drafter(self.drafter.confidence_head is not None)
        self.metrics = ProposerMetrics(self.block_size)
        self.seed_gen = torch.Generator().manual_seed(0)
        # per request: (calibrated confidences of the drafts handed to vLLM last step, depth drafted)
        self.pending: dict[str, tuple[list[float], int]] = {}
        self._step_end: float | None = None  # when propose_step last returned (step timing)
        self._handed_out = 0  # draft tokens handed to vLLM by the last call (verified next step)
        self._warmed_up = False  # first draft pays one-off costs; keep them out of the timer
        self.trace = StepTrace.from_env()  # DSPARK_VLLM_STEP_TRACE: one JSON line per step
        self._last_step: tuple[float | None, int] = (None, 0)  # (ms, verified drafts) of the step that just ended
        self._ingest_ms: float | None = None  # context flushed during the current call (tracing)
        self._faults_seen: set[tuple[str, str]] = set()  # (exception type, code site) already logged
        logger.info("DSpark proposer: %s, block %d, policy %s", worker.checkpoint, self.block_size,
                    self.settings.scheduler.policy)

    # ---- vLLM hooks ------------------------------------------------------------------------
    def attach(self, runner) -> None:
        self.drafter.to(runner.device)

    def context_bytes_per_token(self) -> int:
        """What the pool costs per target KV slot (the plugin reserves it from vLLM's budget)."""
        return self.drafter.context_bytes_per_token()

    def bind_kv_cache(self, runner) -> None:
        """Allocate the pool once vLLM has sized its KV cache: one draft slot per target slot."""
        self.layout = kv_layout(runner)
        self.pool = self.drafter.new_pool(self.layout.num_slots)
        self.context = PendingContext(self.drafter, self.pool)
        self.requests.clear()
        self.pending.clear()
        self.metrics.context_pool_bytes = self.pool.nbytes
        logger.info("DSpark draft context pool: %d token slots x %d B = %.1f MiB, mirroring KV cache group %d "
                    "(vLLM's own KV cache: %.1f MiB)", self.layout.num_slots, self.context_bytes_per_token(),
                    self.pool.nbytes / 2**20, self.layout.group, self.layout.target_bytes / 2**20)

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
        """vLLM calls this after loading the target: a drafter saved with shared embeddings
        (``dspark_shared_embeddings``) takes the target's embedding and LM head here."""
        if self.drafter.embeddings_bound:
            return
        embed, lm_head = target_embedding_weights(target_model)
        self.drafter.bind_target_embeddings(embed, lm_head)
        logger.info("DSpark drafter bound to the target's embedding and LM head")

    def propose(self, *args, **kwargs):
        raise RuntimeError("DSparkV1Proposer.propose is driven through propose_step by the dspark plugin; "
                           "was the plugin registered in this process (VLLM_PLUGINS)?")

    # ---- per step --------------------------------------------------------------------------
    @torch.no_grad()
    def propose_step(self, step: StepInput) -> StepDrafts:
        """Draft for every request in the batch (called by the plugin after each target step).

        The time since the previous call is one engine step without our drafting; it goes to the
        scheduler's step-cost estimator together with the tokens that step processed."""
        if self.pool is None:
            raise RuntimeError("DSpark's draft context pool is not allocated: the runner's initialize_kv_cache "
                               "was not wrapped (was the dspark plugin registered in this process?)")
        self._observe_last_step(step.total_tokens)
        self._ingest_ms = None
        try:
            return self._propose(step)
        finally:
            self._step_end = time.perf_counter()

    def step_failed(self, exc: BaseException, req_ids: list[str]) -> StepDrafts:
        """The plugin boundary's answer to a fault anywhere in a step (reading it, context,
        scheduler, drafter, metrics): no drafts this step, so the target decodes plainly.

        Per-request state is dropped (a half-updated queue must not be drafted from); requests
        that stay start again from their next position and read what the pool already holds,
        which only affects acceptance. Each kind of fault is logged once with its traceback and
        the step's request ids; every fault is counted in ``dspark:step_faults_total``."""
        kind = (type(exc).__name__, _fault_site(exc))
        try:
            if kind not in self._faults_seen:
                self._faults_seen.add(kind)
                logger.error("DSpark: drafting failed at %s (%s: %s) for requests %s; serving this step without "
                             "drafts (logged once per kind; counted in dspark:step_faults_total)", kind[1], kind[0],
                             exc, req_ids[:16], exc_info=exc)
            self.requests.clear()
            self.pending.clear()
            self._handed_out = 0
            if self.pool is not None:
                self.context = PendingContext(self.drafter, self.pool)
            self.metrics.record_fault()
            self.metrics.maybe_flush()
        except Exception:  # noqa: BLE001 - the recovery itself must never take a step down
            logger.debug("DSpark: recovering from a step fault failed", exc_info=True)
        return StepDrafts([[] for _ in req_ids])

    def _observe_last_step(self, num_tokens: int) -> None:
        """The engine step that just ended verified the drafts handed out by the last call."""
        self._last_step = (None, self._handed_out)
        if self._step_end is not None:
            step_ms = (time.perf_counter() - self._step_end) * 1000.0
            self._last_step = (step_ms, self._handed_out)
            self.scheduler.observe_step(num_tokens, step_ms, self._handed_out)
            learned = self.scheduler.snapshot()
            self.metrics.record_learned(learned.cost_scale, learned.verify_premium)
        self._handed_out = 0

    def _release_departed(self, step: StepInput) -> None:
        """Forget requests that left the batch (finished, aborted, preempted). vLLM does not call
        us every step, so finished_req_ids alone can miss some; the batch is the truth. With
        prefix caching their queued context is written first: their blocks stay hit-able."""
        active = set(step.req_ids)
        gone = [r for r in self.requests if r not in active or r in step.finished]
        if not gone:
            return
        states = [self.requests.pop(r) for r in gone]
        if self.prefix_caching:
            self._flush([s.key for s in states])
        for req_id, state in zip(gone, states):
            self.context.drop(state.key)
            self.pending.pop(req_id, None)
        self.scheduler.forget(gone)

    def _state(self, req_id: str, first_pos: int) -> tuple[_RequestState, bool]:
        """This request's state, and whether it is new and starts past position 0 (a prefix-cache
        hit: its first blocks were written by other requests)."""
        state = self.requests.get(req_id)
        if state is None:
            state = _RequestState(key=next(self._keys), start=0, next_pos=first_pos)
            self.requests[req_id] = state
            return state, first_pos > 0
        if state.next_pos != first_pos:  # steps we did not see, or recomputation: keep what is certain
            if first_pos > state.next_pos:
                self._flush([state.key])  # still this request's slots
            else:
                self.context.drop(state.key)  # superseded by the recomputed tokens
            state.start, state.next_pos = first_pos, first_pos
        return state, False

    def _queue_context(self, step: StepInput) -> tuple[list[int], list[_RequestState], bool]:
        """Queue this step's valid tokens; returns the drafting rows (those that emitted tokens),
        their states, and whether a new request reads blocks other requests wrote."""
        rows = np.flatnonzero(step.num_scheduled)
        accepted = np.fromiter((max(len(step.sampled[i]) - 1, 0) for i in rows), dtype=np.int64, count=len(rows))
        valid = step.num_scheduled[rows] - step.num_spec[rows] + accepted
        states, hit = [], False
        for i in rows:
            state, new_hit = self._state(step.req_ids[i], int(step.first_pos[i]))
            states.append(state)
            hit |= new_hit
        for state, n in zip(states, valid):
            state.next_pos += int(n)
        starts = np.cumsum(step.num_scheduled)[rows] - step.num_scheduled[rows]  # row offsets in the packed step
        owner = np.repeat(np.arange(len(rows)), valid)
        within = np.arange(len(owner)) - np.repeat(np.cumsum(valid) - valid, valid)
        index = to_device(np.concatenate([starts[owner] + within, step.first_pos[rows][owner] + within]),
                          step.features.device)
        take, positions = index[: len(owner)], index[len(owner):]
        self.context.push_step([s.key for s in states], self.drafter.target_features(step.features[take]),
                               valid.tolist(), step.slot_mapping[take], positions)
        drafting = [j for j, i in enumerate(rows) if step.sampled[i]]
        return [int(rows[j]) for j in drafting], [states[j] for j in drafting], hit

    def _propose(self, step: StepInput) -> StepDrafts:
        self._release_departed(step)
        rows, states, hit = self._queue_context(step)
        self._record_outcomes(step, rows)
        if hit:  # the new request's cached prefix may still be queued under its writer's key
            self._flush(self.context.keys())
        out: list[list[int]] = [[] for _ in step.req_ids]
        ready = len(rows)
        plan = self._plan(len(step.req_ids), ready)
        picked = plan.rows(ready) if plan.requests else []
        depth = plan.depth or self.block_size
        seeded = [j for j, i in enumerate(rows) if step.seeds[i] is not None]
        if seeded:  # reproducible text: a seeded request verifies its whole block every step, whatever the clocks say
            picked, depth = sorted(set(picked) | set(seeded)), self.block_size
        if not picked:  # nothing to draft from, or gated: plain decoding this step
            self._flush(self.context.full_keys())
            if ready:
                self.metrics.record_gated()
                self.metrics.maybe_flush()
            self._trace_step(step, ready, 0, 0, None)
            return StepDrafts(out)
        rows, states = [rows[j] for j in picked], [states[j] for j in picked]
        load = StepLoad(base_tokens=len(step.req_ids) - len(rows), max_num_tokens=self.max_num_tokens)
        return self._draft(step, rows, states, depth, load, ready, out)

    def _record_outcomes(self, step: StepInput, rows: list[int]) -> None:
        """Acceptance of the drafts each request had verified in the step that just ended (what
        vLLM scheduled for verification: ``num_spec``)."""
        for row in rows:
            handed = self.pending.pop(step.req_ids[row], None)
            verified = int(step.num_spec[row])
            if handed and verified:
                confidences, depth = handed
                self.metrics.record_outcome(confidences[:verified], len(step.sampled[row]) - 1)
                self.metrics.record_verified(depth, verified)

    def _plan(self, batch: int, ready: int) -> DraftPlan:
        if ready == 0:
            return DraftPlan(0, None)
        if self.oracle is not None:
            return DraftPlan(ready, self.block_size)
        return self.scheduler.plan(ready, StepLoad(base_tokens=batch - ready, max_num_tokens=self.max_num_tokens))

    def _draft(self, step: StepInput, rows: list[int], states: list[_RequestState], depth: int,
               load: StepLoad, ready: int, out: list[list[int]]) -> StepDrafts:
        # Shortest context first: the view cuts requests into chunks of similar length.
        order = sorted(range(len(rows)), key=lambda j: states[j].next_pos - states[j].start)
        rows, states = [rows[j] for j in order], [states[j] for j in order]
        self._flush([s.key for s in states] + self.context.full_keys())
        req_ids = [step.req_ids[i] for i in rows]
        rows_np = np.asarray(rows, dtype=np.int64)
        view = PagedContextView(self.pool, step.block_table[to_device(rows_np, step.block_table.device)],
                                step.page_size, np.array([s.start for s in states]),
                                np.array([s.next_pos for s in states]))
        anchor = to_device(np.array([step.sampled[i][-1] for i in rows], dtype=np.int64), self.drafter.device)
        temps = self._draft_temperatures(step.temperatures[rows_np])
        all_greedy = bool((temps < GREEDY_EPS).all())
        temperature = to_device(temps.astype(np.float32), self.drafter.device)
        seeds = self._draft_seeds(step, rows, states)
        fused = self.drafter.can_fuse_sampling
        if not self._warmed_up:  # first-call allocations and weight gathers, then time d(R)
            self.drafter.propose(anchor, view, temperature, fused=fused, seeds=seeds, all_greedy=all_greedy)
            self._time_drafter(anchor, view, temperature, all_greedy)
            self._warmed_up = True
        t_draft = time.perf_counter()
        block = self.drafter.propose(anchor, view, temperature, fused=fused, seeds=seeds, depth=depth,
                                     all_greedy=all_greedy)
        tokens = block.tokens.tolist()  # host sync 1 of 2
        logits = None if block.confidence_logits is None else block.confidence_logits.float().numpy(force=True)  # 2
        conf = self.scheduler.confidences(logits)
        lengths = [depth if step.seeds[i] is not None else int(n)
                   for i, n in zip(rows, self.scheduler.lengths(conf, req_ids, load=load, width=depth))]
        draft_ms = (time.perf_counter() - t_draft) * 1000.0
        self.scheduler.observe_draft(conf, draft_ms)
        if self.oracle is not None:
            for j, i in enumerate(rows):
                known = self.oracle.after(step.history(i))
                if known is not None:
                    tokens[j] = known
        for j, (i, toks, n) in enumerate(zip(rows, tokens, lengths)):
            out[i] = toks[:n]
            if n > 0:
                self.pending[req_ids[j]] = (conf[j, :n].tolist() if conf is not None else [float("nan")] * n, depth)
        self.metrics.record_step()
        self._handed_out = sum(lengths)
        self.metrics.maybe_flush()
        self._trace_step(step, ready, len(rows), depth, draft_ms)
        return StepDrafts(out, block.probs, req_ids if block.probs is not None else None)

    def _draft_seeds(self, step: StepInput, rows: list[int], states: list[_RequestState]) -> torch.Tensor:
        """[N] draft seeds: a seeded request's from its seed and anchor position (its drafts are
        then reproducible), the others' from the proposer's generator."""
        seeds = torch.randint(0, SEED_LIMIT, (len(rows),), generator=self.seed_gen)
        for j, (i, state) in enumerate(zip(rows, states)):
            if step.seeds[i] is not None:
                seeds[j] = derive_seed(int(step.seeds[i]), state.next_pos)
        return seeds

    def _flush(self, keys: list[int]) -> None:
        """Write the queued context of ``keys`` into the pool and tell the gate what it cost (a
        drafted step pays it on top of the draft; see ``scheduler/draft_gate.py``)."""
        if not keys:
            return
        t0 = time.perf_counter()
        tokens = self.context.flush(keys)
        if tokens:
            self._ingest_ms = (time.perf_counter() - t0) * 1000.0
            self.scheduler.observe_ingest(tokens, self._ingest_ms)

    def _trace_step(self, step: StepInput, ready: int, drafting: int, depth: int, draft_ms: float | None) -> None:
        if not self.trace.enabled:
            return
        learned = self.scheduler.snapshot()
        step_ms, verified = self._last_step
        self.trace.write(batch=len(step.req_ids), ready=ready, drafting=drafting, depth=depth,
                         gain=None if ready == 0 else learned.last_gain,
                         step_ms=None if step_ms is None else round(step_ms, 3), verified=verified,
                         emitted=sum(len(row) for row in step.sampled),
                         draft_ms=None if draft_ms is None else round(draft_ms, 3),
                         ingest_ms=None if self._ingest_ms is None else round(self._ingest_ms, 3),
                         scale=None if learned.cost_scale is None else round(learned.cost_scale, 4),
                         premium=learned.verify_premium)

    def _time_drafter(self, anchor: torch.Tensor, view: PagedContextView, temperature: torch.Tensor,
                      all_greedy: bool) -> None:
        """Time one full-block draft at each batch size in ``DRAFT_TIMING_SIZES`` (the requests
        at hand, repeated), and shallow drafts (``SHALLOW_TIMING_DEPTHS``) at the largest size,
        and feed the gate's draft timer (n = requests x depth), once per engine.

        Without it the timer extrapolates d(R) from the batch sizes that happened to draft first
        (a line through 1 and 2 requests, say), and the gate opens or shuts under load on that
        error. Later drafts refine the fit (it forgets old points)."""
        if not self.scheduler.measures_draft_time:
            return
        max_reqs = int(self.vllm_config.scheduler_config.max_num_seqs)
        sizes = [r for r in DRAFT_TIMING_SIZES if r <= max_reqs]
        runs = [(size, self.block_size) for size in sizes]
        runs += [(sizes[-1], d) for d in SHALLOW_TIMING_DEPTHS if d < self.block_size]
        for size, depth in runs:
            pick = np.arange(size) % view.batch
            index = to_device(pick, anchor.device)
            seeds = torch.randint(0, SEED_LIMIT, (size,), generator=self.seed_gen)
            t0 = time.perf_counter()
            block = self.drafter.propose(anchor[index], view.select(pick), temperature[index],
                                         fused=self.drafter.can_fuse_sampling, seeds=seeds, depth=depth,
                                         all_greedy=all_greedy)
            block.tokens.cpu()  # waits for the device, as a drafted step does
            self.scheduler.confidences(block.confidence_logits)  # part of a drafted step's cost too
            self.scheduler.observe_draft_time(size * depth, (time.perf_counter() - t0) * 1000.0)
        self._time_ingestion(sizes[-1])

    def _time_ingestion(self, requests: int) -> None:
        """Seed the gate's ingestion line i(n): flush ``INGEST_TIMING_TOKENS`` tokens per request
        of random features for ``requests`` requests into a scratch pool (the live one is in use)."""
        per_max = max(INGEST_TIMING_TOKENS)
        scratch = PendingContext(self.drafter, self.drafter.new_pool(requests * per_max))
        width = self.drafter.context_width  # m target layers x hidden size
        device = self.drafter.device
        for per in INGEST_TIMING_TOKENS:
            n = requests * per
            slots = torch.arange(n, device=device)
            scratch.push_step(list(range(requests)), torch.randn(n, width, dtype=self.drafter.dtype, device=device),
                              [per] * requests, slots, slots % per)
            t0 = time.perf_counter()
            tokens = scratch.flush()
            scratch.pool.keys[0][:1].cpu()  # waits for the device
            self.scheduler.observe_ingest(tokens, (time.perf_counter() - t0) * 1000.0)

    def _draft_temperatures(self, temperatures: np.ndarray) -> np.ndarray:
        """Per-request draft temperature: the request's own under ``draft_sampling: probabilistic``
        (drafts sampled from q, q handed to vLLM), else 0 (greedy drafts, one-hot q)."""
        if self.settings.draft_sampling != "probabilistic":
            return np.zeros(len(temperatures))
        return temperatures
