"""Clocks the draft gate learns from: the served step between two proposer calls, and one
calibration of the drafter and of context ingestion on the first draft of an engine.

The gate (``scheduler/draft_gate.py``) predicts whether drafting pays from fitted lines: the
drafter's time d(n) for n = requests x depth block positions, the ingestion time i(n) for n
context tokens, and the served step's cost. :class:`StepClock` measures each served step;
:func:`calibrate_gate` seeds d(n) and i(n) once, because a fit through the batch sizes that
happened to draft first (1 and 2 requests, say) extrapolates badly and opens or shuts the gate
under load on that error. Later drafts refine the fits (they forget old points).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..paged_context import PagedContextView, to_device
from ..pending_context import PendingContext
from ..sampling import SEED_LIMIT

DRAFT_TIMING_SIZES = (1, 2, 4, 8, 16, 32)  # batch sizes timed once (full block) to seed the gate's d(n) fit
SHALLOW_TIMING_DEPTHS = (1, 2)  # depths also timed at the largest of those sizes (under load the gate drafts shallow)
INGEST_TIMING_TOKENS = (1, 4)  # context tokens per request timed once at that size to seed the ingestion fit


class StepClock:
    """Wall time of the engine step between two proposer calls, and the drafts it verified."""

    def __init__(self) -> None:
        self._end: float | None = None  # when the proposer last returned
        self.handed_out = 0  # draft tokens handed to vLLM by the last call (verified in the step that follows)
        self.last: tuple[float | None, int] = (None, 0)  # (ms, verified drafts) of the step that just ended

    def step_ended(self) -> tuple[float | None, int]:
        """Called at the start of a proposer call: the step that just ended, as (ms, verified)."""
        ms = None if self._end is None else (time.perf_counter() - self._end) * 1000.0
        self.last, self.handed_out = (ms, self.handed_out), 0
        return self.last

    def proposer_returned(self) -> None:
        self._end = time.perf_counter()


def calibrate_gate(drafter, scheduler, observe: Callable[..., None], anchor: torch.Tensor, view: PagedContextView,
                   temperature: torch.Tensor, all_greedy: bool, max_requests: int, generator: torch.Generator) -> None:
    """Time a full-block draft at each size of ``DRAFT_TIMING_SIZES`` up to ``max_requests`` (the
    requests at hand, repeated) and shallow drafts at the largest, then context ingestion, and
    feed the scheduler's timers through ``observe(method, *args)`` (``RankSync.observe``: one
    rank's clocks for all ranks). Call once per engine, after a first (warm-up) draft."""
    if not scheduler.measures_draft_time:
        return
    block = drafter.block_size
    sizes = [r for r in DRAFT_TIMING_SIZES if r <= max_requests]
    runs = [(size, block) for size in sizes] + [(sizes[-1], d) for d in SHALLOW_TIMING_DEPTHS if d < block]
    for size, depth in runs:
        pick = np.arange(size) % view.batch
        index = to_device(pick, anchor.device)
        seeds = torch.randint(0, SEED_LIMIT, (size,), generator=generator)
        t0 = time.perf_counter()
        out = drafter.propose(anchor[index], view.select(pick), temperature[index], fused=drafter.can_fuse_sampling,
                              seeds=seeds, depth=depth, all_greedy=all_greedy)
        out.tokens.cpu()  # waits for the device, as a drafted step does
        scheduler.confidences(out.confidence_logits)  # part of a drafted step's cost too
        observe("observe_draft_time", size * depth, (time.perf_counter() - t0) * 1000.0)
    _calibrate_ingestion(drafter, observe, sizes[-1])


def _calibrate_ingestion(drafter, observe: Callable[..., None], requests: int) -> None:
    """Flush ``INGEST_TIMING_TOKENS`` tokens per request of random features for ``requests``
    requests into a scratch pool (the live one is in use) and feed the ingestion timer."""
    scratch = PendingContext(drafter, drafter.new_pool(requests * max(INGEST_TIMING_TOKENS)))
    width, device = drafter.context_width, drafter.device  # m target layers x hidden size
    for per in INGEST_TIMING_TOKENS:
        n = requests * per
        slots = torch.arange(n, device=device)
        scratch.push_step(list(range(requests)), torch.randn(n, width, dtype=drafter.dtype, device=device),
                          [per] * requests, slots, slots % per)
        t0 = time.perf_counter()
        tokens = scratch.flush()
        scratch.pool.keys[0][:1].cpu()  # waits for the device
        observe("observe_ingest", tokens, (time.perf_counter() - t0) * 1000.0)
