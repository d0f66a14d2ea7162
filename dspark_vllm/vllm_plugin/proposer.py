"""DSpark proposer for vLLM's V1 model runner.

vLLM builds it through its ``custom_class`` hook (our config wrapper routes ``method: dspark``
there) and, thanks to the runner wrapper, calls :meth:`propose_step` each step with the target's
aux hidden states. Per request it keeps a row of the drafter's context K/V cache:

1. queue the features of this step's *valid* positions: every scheduled prompt token, or for a
   decode step the anchor plus the drafts that were accepted (= len(sampled) - 1); they enter
   the drafter's context cache when the request next drafts (``pending_context.py``: gated
   steps under load then cost almost nothing);
2. unless the draft gate says no verify length could pay this step (cost-aware policies: past
   confidences, cost curve, measured draft time; see ``scheduler/draft_gate.py``), draft a
   block from [last sampled token, MASK...] (from the checkpoint's draft vocabulary if any),
   as deep as the gate found worth verifying (the whole block unless load makes deep drafts
   unprofitable);
3. trim each request's block with the configured policy (confidence + step load) and return
   the per-request token lists; vLLM's rejection sampler verifies them. With
   ``draft_sampling: probabilistic`` (default) each request's drafts are sampled at its own
   temperature and their q goes to vLLM through ``runner._draft_probs``; with ``greedy`` (or at
   temperature 0) q is one-hot. Either way vLLM's verification keeps the target distribution.

Positions: the context of a request starts where we first see it (after a prefix-cache hit the
first scheduled position is > 0); RoPE only sees relative offsets, so this is exact for the
drafter's attention. A request seen again from position 0 (preemption/recompute) is reset.
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
from ..pending_context import PendingContext
from ..scheduler import CostProfile, StepLoad, VerifyLengthScheduler
from ..settings import load_settings
from .metrics import DSparkStats
from .patches import ENV_CHECKPOINT, ENV_CONFIG
from .startup_profile import ENV_COST_PROFILE
from .step_trace import StepTrace

logger = logging.getLogger("dspark_vllm")


ENV_ORACLE = "DSPARK_VLLM_ORACLE"
ENV_ORACLE_CORRUPT = "DSPARK_VLLM_ORACLE_CORRUPT"
DRAFT_TIMING_SIZES = (1, 2, 4, 8, 16, 32)  # batch sizes timed once (full block) to seed the gate's d(n) fit
SHALLOW_TIMING_DEPTHS = (1, 2)  # depths also timed at the largest of those sizes (under load the gate drafts shallow)
INGEST_TIMING_TOKENS = (1, 4)  # context tokens per row timed once at that size to seed the ingestion fit


class OracleHook:
    """Test hook: replace drafts with a known continuation (e.g. the target's greedy output).

    ``DSPARK_VLLM_ORACLE`` names a JSON file {"sequences": [[token, ...], ...]} of full token
    sequences (prompt + continuation); a request whose history is a prefix of one of them gets
    the next B tokens as drafts. ``DSPARK_VLLM_ORACLE_CORRUPT=k`` changes draft k of every block,
    so acceptance must stop exactly there. The drafter still runs; only its tokens are replaced.
    """

    def __init__(self, path: str, corrupt: int | None) -> None:
        import json

        self.sequences = [list(map(int, s)) for s in json.loads(open(path).read())["sequences"]]
        self.corrupt = corrupt

    @classmethod
    def from_env(cls) -> "OracleHook | None":
        path = os.environ.get(ENV_ORACLE)
        if not path:
            return None
        corrupt = os.environ.get(ENV_ORACLE_CORRUPT)
        return cls(path, int(corrupt) if corrupt not in (None, "") else None)

    def drafts(self, history: list[int], block: int, vocab: int) -> list[int] | None:
        n = len(history)
        for seq in self.sequences:
            if len(seq) > n and seq[:n] == history:
                out = seq[n: n + block]
                out = out + [0] * (block - len(out))
                if self.corrupt is not None:
                    out[self.corrupt] = (out[self.corrupt] + 1) % vocab
                return out
        return None


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


@dataclass
class _RequestState:
    row: int
    next_pos: int  # absolute position of the next token whose features we expect


class DSparkV1Proposer:
    """Owns the drafter, its per-request context rows, and the verify-length scheduler."""

    def __init__(self, vllm_config) -> None:
        checkpoint = os.environ.get(ENV_CHECKPOINT)
        if not checkpoint:
            raise RuntimeError(f"{ENV_CHECKPOINT} is not set: DSparkV1Proposer is created by the dspark "
                               "plugin from a speculative config with method 'dspark'")
        self.vllm_config = vllm_config
        self.settings = load_settings(os.environ[ENV_CONFIG])
        dtype = vllm_config.model_config.dtype
        self.drafter = load_checkpoint(checkpoint, dtype=dtype if isinstance(dtype, torch.dtype) else None,
                                       draft_vocab_size=self.settings.draft_vocab_size)
        self.block_size = self.drafter.block_size
        profiled = os.environ.get(ENV_COST_PROFILE)  # set by profile_at_startup
        cost = CostProfile.load(profiled) if profiled else None
        self.scheduler = VerifyLengthScheduler.from_settings(self.settings, self.block_size, checkpoint, cost=cost)
        self.max_reqs = int(vllm_config.scheduler_config.max_num_seqs)
        self.max_num_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
        self.cache = None
        self.context: PendingContext | None = None
        self.requests: dict[str, _RequestState] = {}
        self.free_rows: list[int] = list(range(self.max_reqs))[::-1]
        self.oracle = OracleHook.from_env()
        self.scheduler.check_drafter(self.drafter.confidence_head is not None)
        self.stats = DSparkStats(self.block_size)
        self.seed_gen = torch.Generator().manual_seed(0)
        # per request: calibrated confidences of the drafts handed to vLLM last step
        self.pending: dict[str, list[float]] = {}
        self._step_end: float | None = None  # when propose_step last returned (step timing)
        self._handed_out = 0  # draft tokens handed to vLLM by the last call (verified next step)
        self._warmed_up = False  # first draft pays one-off costs; keep them out of the timer
        self.trace = StepTrace.from_env()  # DSPARK_VLLM_STEP_TRACE: one JSON line per step
        self._last_step: tuple[float | None, int] = (None, 0)  # (ms, verified drafts) of the step that just ended
        self._ingest_ms: float | None = None  # context flushed during the current call (tracing)
        logger.info("DSpark proposer: %s, block %d, policy %s", checkpoint, self.block_size,
                    self.settings.scheduler.policy)

    # ---- vLLM hooks ------------------------------------------------------------------------
    def attach(self, runner) -> None:
        device = runner.device
        self.drafter.to(device)
        self.cache = self.drafter.new_cache(self.max_reqs)
        self.context = PendingContext(self.drafter, self.cache)

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
    def _release(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        self.pending.pop(req_id, None)
        if state is not None:
            self.context.drop(state.row)
            self.free_rows.append(state.row)
            self.scheduler.stale.forget([req_id])

    def _state(self, req_id: str, first_pos: int) -> _RequestState:
        state = self.requests.get(req_id)
        if state is not None and state.next_pos != first_pos:
            self._release(req_id)  # preempted and recomputed, or skipped positions: start over
            state = None
        if state is None:
            state = _RequestState(row=self.free_rows.pop(), next_pos=first_pos)
            self.cache.reset_rows(torch.tensor([state.row]))
            self.context.drop(state.row)
            self.requests[req_id] = state
        return state

    @torch.no_grad()
    def propose_step(self, runner, scheduler_output, sampled_token_ids, aux_hidden_states) -> list[list[int]]:
        """Draft for every request in the batch (called by the plugin after each target step).

        The time since the previous call is one engine step without our drafting; it goes to the
        scheduler's step-cost estimator together with the tokens that step processed."""
        self._last_step = (None, self._handed_out)
        if self._step_end is not None:  # that step verified the drafts handed out last call
            step_ms = (time.perf_counter() - self._step_end) * 1000.0
            self._last_step = (step_ms, self._handed_out)
            self.scheduler.observe_step(int(scheduler_output.total_num_scheduled_tokens), step_ms, self._handed_out)
            if self.scheduler.step_cost is not None:  # observe_step just wrote it; no second median
                self.stats.cost_scale = self.scheduler.step_cost.cost.scale
                self.stats.verify_premium = self.scheduler.step_cost.cost.verify_premium or 1.0
        self._handed_out = 0
        self._ingest_ms = None  # context flushed during this call (tracing)
        try:
            return self._propose_step(runner, scheduler_output, sampled_token_ids, aux_hidden_states)
        finally:
            self._step_end = time.perf_counter()

    def _propose_step(self, runner, scheduler_output, sampled_token_ids, aux_hidden_states) -> list[list[int]]:
        req_ids = list(runner.input_batch.req_ids)
        # Free rows of requests that left the batch (finished, aborted, preempted). vLLM does not
        # call us every step, so finished_req_ids alone can miss some; the batch is the truth.
        active = set(req_ids)
        for req_id in [r for r in self.requests if r not in active] + list(scheduler_output.finished_req_ids):
            self._release(req_id)
        if isinstance(sampled_token_ids, torch.Tensor):
            sampled = [[t for t in row if t >= 0] for row in sampled_token_ids.tolist()]
        else:
            sampled = [list(row) for row in sampled_token_ids]
        num_sched = [int(scheduler_output.num_scheduled_tokens.get(r, 0)) for r in req_ids]
        starts = list(itertools.accumulate(num_sched, initial=0))
        total = starts[-1]
        features = torch.cat([h[:total] for h in aux_hidden_states], dim=-1)
        scheduled = [i for i, n in enumerate(num_sched) if n]
        positions = runner._get_positions(total)
        first_pos = positions[torch.tensor([starts[i] for i in scheduled], dtype=torch.long, device=positions.device)].tolist()

        anchors, draft_ids = [], []
        rows, valid_counts = [], []  # context to queue: the first valid_counts[j] tokens of each
        for i, pos in zip(scheduled, first_pos):
            req_id = req_ids[i]
            spec = scheduler_output.scheduled_spec_decode_tokens.get(req_id, ())
            valid = num_sched[i] - len(spec) + max(len(sampled[i]) - 1, 0)
            state = self._state(req_id, int(pos))
            rows.append(state.row)
            valid_counts.append(valid)
            state.next_pos += valid
            verified = self.pending.pop(req_id, None)
            if verified and sampled[i]:
                self.stats.record_outcome(verified, len(sampled[i]) - 1)
            if sampled[i]:
                anchors.append(sampled[i][-1])
                draft_ids.append((i, state.row))
        if valid_counts != [num_sched[i] for i in scheduled]:  # rejected drafts or idle rows: keep each row's valid prefix
            mask = np.zeros(total, dtype=bool)
            for i, valid in zip(scheduled, valid_counts):
                mask[starts[i]: starts[i] + valid] = True
            features = features[torch.from_numpy(mask).to(features.device)]
        self.context.push_step(rows, features, valid_counts)
        out: list[list[int]] = [[] for _ in req_ids]
        if not draft_ids:
            self._flush(self.context.full_rows())
            self._trace_step(len(req_ids), 0, 0, 0, sampled, None)
            return out
        load = StepLoad(base_tokens=len(req_ids) - len(draft_ids), max_num_tokens=self.max_num_tokens)
        depth = self.block_size
        ready = len(draft_ids)
        if self.oracle is None:
            plan = self.scheduler.plan_draft(len(draft_ids), load)
            if plan.requests == 0:  # gated: plain decoding this step
                self._flush(self.context.full_rows())
                self.stats.record_gated()
                self.stats.maybe_flush()
                self._trace_step(len(req_ids), ready, 0, 0, sampled, None)
                return out
            if plan.requests < len(draft_ids):  # a gate probe: one request (rotating) drafts
                pick = self.stats.steps % len(draft_ids)
                anchors, draft_ids = [anchors[pick]], [draft_ids[pick]]
                load = StepLoad(base_tokens=len(req_ids) - 1, max_num_tokens=self.max_num_tokens)
            depth = plan.depth or self.block_size
        # In cache-row order, so that a full batch drafts from a slice of the cache (rows_view)
        order = sorted(range(len(draft_ids)), key=lambda j: draft_ids[j][1])
        anchors, draft_ids = [anchors[j] for j in order], [draft_ids[j] for j in order]
        self._flush([row for _, row in draft_ids] + self.context.full_rows())
        draft_rows = torch.tensor([row for _, row in draft_ids])
        view = self.cache.rows_view(draft_rows, spare=depth)
        anchor = torch.tensor(anchors, dtype=torch.long)
        temperature = self._draft_temperatures(runner, [i for i, _ in draft_ids])
        seeds = torch.randint(0, 2**31 - 1, (len(anchors),), generator=self.seed_gen)
        if not self._warmed_up:  # first-call allocations and weight gathers, then time d(R)
            self.drafter.propose(anchor, view, temperature, fused=self.drafter.can_fuse_sampling, seeds=seeds)
            self._time_drafter(anchor, draft_rows, temperature)
            self._warmed_up = True
        t_draft = time.perf_counter()
        block = self.drafter.propose(anchor, view, temperature, fused=self.drafter.can_fuse_sampling, seeds=seeds,
                                     depth=depth)
        if block.probs is not None:
            # q for vLLM's rejection sampler: rows in draft order, looked up by request id
            runner._draft_probs = block.probs.to(runner.device)
            runner._draft_prob_req_ids = [req_ids[i] for i, _ in draft_ids]
        conf = self.scheduler.confidences(block.confidence_logits)
        lengths = self._lengths(conf, [req_ids[i] for i, _ in draft_ids], load)
        tokens = block.tokens.cpu().tolist()
        draft_ms = (time.perf_counter() - t_draft) * 1000.0
        self.scheduler.observe_draft(conf, draft_ms)
        if self.oracle is not None:
            batch = runner.input_batch
            for j, (i, _) in enumerate(draft_ids):
                history = batch.token_ids_cpu[i, : int(batch.num_tokens_no_spec[i])].tolist()
                known = self.oracle.drafts(history, self.block_size, self.drafter.config.vocab_size)
                if known is not None:
                    tokens[j] = known
        for j, ((i, _), toks, n) in enumerate(zip(draft_ids, tokens, lengths)):
            out[i] = toks[: int(n)]
            if n > 0:
                self.pending[req_ids[i]] = conf[j, : int(n)].tolist() if conf is not None else [float("nan")] * int(n)
        kept = [int(n) for n in lengths]
        self.stats.record_step(len(draft_ids) * depth, kept)
        self._handed_out = sum(kept)
        self.stats.maybe_flush()
        self._trace_step(len(req_ids), ready, len(draft_ids), depth, sampled, draft_ms)
        return out

    def _flush(self, rows: list[int]) -> None:
        """Ingest the queued context of ``rows`` and tell the gate what it cost (a drafted
        step pays it on top of the draft; see ``scheduler/draft_gate.py``)."""
        if not rows:
            return
        t0 = time.perf_counter()
        tokens = self.context.flush(rows)
        if tokens:
            self._ingest_ms = (time.perf_counter() - t0) * 1000.0
            self.scheduler.observe_ingest(tokens, self._ingest_ms)

    def _trace_step(self, batch: int, ready: int, drafting: int, depth: int, sampled: list[list[int]],
                    draft_ms: float | None) -> None:
        if not self.trace.enabled:
            return
        emitted = sum(len(row) for row in sampled)
        gate = self.scheduler.gate
        step_ms, verified = self._last_step
        cost = self.scheduler.step_cost.cost if self.scheduler.step_cost is not None else None
        self.trace.write(batch=batch, ready=ready, drafting=drafting, depth=depth,
                         gain=None if gate is None or drafting == 0 and ready == 0 else gate.last_gain,
                         step_ms=None if step_ms is None else round(step_ms, 3), verified=verified,
                         emitted=emitted, draft_ms=None if draft_ms is None else round(draft_ms, 3),
                         ingest_ms=None if self._ingest_ms is None else round(self._ingest_ms, 3),
                         scale=None if cost is None else round(cost.scale, 4),
                         premium=None if cost is None else cost.verify_premium)

    def _time_drafter(self, anchor: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor) -> None:
        """Time one full-block draft at each batch size in ``DRAFT_TIMING_SIZES`` (the rows at
        hand, repeated), and shallow drafts (``SHALLOW_TIMING_DEPTHS``) at the largest size, and
        feed the gate's draft timer (n = requests x depth), once per engine (0.2 s up to 8
        requests for SmolLM2's drafter on this CPU).

        Without it the timer extrapolates d(R) from the batch sizes that happened to draft first:
        a server whose first drafts were single requests predicted 346 ms for 16 (proportional)
        or 18 ms (a line through 1 and 2), against ~70 ms measured, and the gate opened or shut
        at 16 clients on that error. Later drafts refine the fit (it forgets old points)."""
        if self.scheduler.gate is None:
            return
        sizes = [r for r in DRAFT_TIMING_SIZES if r <= self.max_reqs]
        runs = [(size, self.block_size) for size in sizes]
        runs += [(sizes[-1], d) for d in SHALLOW_TIMING_DEPTHS if d < self.block_size]
        for size, depth in runs:
            pick = torch.arange(size) % len(rows)
            view = self.cache.rows_view(rows[pick], spare=depth)
            seeds = torch.randint(0, 2**31 - 1, (size,), generator=self.seed_gen)
            t0 = time.perf_counter()
            block = self.drafter.propose(anchor[pick], view, temperature[pick], fused=self.drafter.can_fuse_sampling,
                                         seeds=seeds, depth=depth)
            block.tokens.cpu()  # waits for the device, as a drafted step does
            self.scheduler.confidences(block.confidence_logits)  # part of a drafted step's cost too
            self.scheduler.gate.timer.observe(size * depth, (time.perf_counter() - t0) * 1000.0)
        self._time_ingestion(sizes[-1])

    def _time_ingestion(self, rows: int) -> None:
        """Seed the gate's ingestion line i(n): flush ``INGEST_TIMING_TOKENS`` tokens per row
        of random features for ``rows`` rows into a scratch cache (the live one holds requests)."""
        scratch = PendingContext(self.drafter, self.drafter.new_cache(rows))
        width = self.drafter.fc.in_features  # m target layers x hidden size
        for per_row in INGEST_TIMING_TOKENS:
            for row in range(rows):
                scratch.push(row, torch.randn(per_row, width, dtype=self.drafter.dtype, device=self.drafter.device))
            t0 = time.perf_counter()
            tokens = scratch.flush()
            scratch.cache.lengths.cpu()  # waits for the device
            self.scheduler.gate.observe_ingest(tokens, (time.perf_counter() - t0) * 1000.0)

    def _draft_temperatures(self, runner, rows: list[int]) -> torch.Tensor:
        """Per-request draft temperature: the request's own under ``draft_sampling: probabilistic``
        (drafts sampled from q, q handed to vLLM), else 0 (greedy drafts, one-hot q)."""
        if self.settings.draft_sampling != "probabilistic":
            return torch.zeros(len(rows))
        temps = runner.input_batch.temperature_cpu
        return torch.tensor([float(temps[i]) for i in rows], dtype=torch.float32)

    def _lengths(self, conf: np.ndarray | None, req_ids: list[str], load: StepLoad) -> list[int]:
        if conf is None:  # no confidence head: fixed policy (checked at start-up)
            return [self.block_size] * len(req_ids)
        return [int(x) for x in self.scheduler.lengths_from_confidences(conf, req_ids, load=load)]
