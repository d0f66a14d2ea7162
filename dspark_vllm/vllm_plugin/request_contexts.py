"""Each request's draft context, and every decision about when it is written into the pool.

A request's context is the target features of its committed tokens, as draft K/V in the paged
pool at the request's own KV slots (``paged_context.py``). New features are queued
(``pending_context.py``) and written ("flushed") only when they are needed, which makes steps
the draft gate skips nearly free. They are flushed:

1. for the requests about to draft, right before they draft (:meth:`RequestContexts.before_draft`);
2. for any request whose queue is full, on every step (``PendingContext.full_keys``);
3. for a request leaving the batch while prefix caching is on: its blocks may be hit later;
4. for every request, when a new request arrives with a prefix-cache hit: it reads blocks other
   requests wrote, which may still be queued under their keys;
5. for a request whose positions jumped ahead (steps the proposer did not see): the queued
   tokens are still this request's slots. Positions that went back (recomputation) drop the queue.

Positions are absolute (pool slot <-> token position): a request that jumps keeps drafting from
the context it has from then on; outputs never depend on the context, only acceptance does.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..paged_context import PagedContextPool, PagedContextView, to_device
from ..pending_context import PendingContext
from .runner_io import StepInput


@dataclass
class RequestState:
    key: int        # this request's queue in PendingContext
    start: int      # first context position the drafter attends to (0 unless positions jumped)
    next_pos: int   # absolute position of the next token whose features we expect


class RequestContexts:
    """The requests the proposer knows, their context spans and queued features."""

    def __init__(self, drafter, prefix_caching: bool, on_ingest: Callable[[int, float], None]) -> None:
        self.drafter = drafter
        self.prefix_caching = prefix_caching  # blocks of a finished request can be hit only with it on
        self.on_ingest = on_ingest  # (tokens written, ms): the draft gate's ingestion timer
        self.pool: PagedContextPool | None = None
        self.queue: PendingContext | None = None
        self.requests: dict[str, RequestState] = {}
        self._keys = itertools.count()
        self.ingest_ms: float | None = None  # time spent writing context during the current step

    def bind(self, pool: PagedContextPool) -> None:
        """Start over on a newly allocated pool."""
        self.pool = pool
        self.reset()

    def reset(self) -> None:
        """Forget every request and queued feature (after a fault: no half-updated queue survives)."""
        self.requests.clear()
        self.queue = PendingContext(self.drafter, self.pool) if self.pool is not None else None

    def release_departed(self, step: StepInput) -> list[str]:
        """Forget requests that left the batch (finished, aborted, preempted); returns their ids.
        vLLM does not call the proposer every step, so ``finished`` alone can miss some: the
        batch is the truth. The first call of a step."""
        self.ingest_ms = None
        active = set(step.req_ids)
        gone = [r for r in self.requests if r not in active or r in step.finished]
        states = [self.requests.pop(r) for r in gone]
        if self.prefix_caching:
            self._flush([s.key for s in states])
        for state in states:
            self.queue.drop(state.key)
        return gone

    def admit(self, step: StepInput) -> tuple[list[int], list[RequestState]]:
        """Queue this step's valid tokens: every scheduled prompt token, or for a decode step the
        anchor plus the accepted drafts (= len(sampled) - 1). Returns the rows that can draft
        (those that emitted tokens) and their states."""
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
        self.queue.push_step([s.key for s in states], self.drafter.target_features(step.features[take]),
                             valid.tolist(), step.slot_mapping[take], positions)
        if hit:  # the new request's cached prefix may still be queued under its writer's key
            self._flush(self.queue.keys())
        drafting = [j for j, i in enumerate(rows) if step.sampled[i]]
        return [int(rows[j]) for j in drafting], [states[j] for j in drafting]

    def before_draft(self, states: list[RequestState]) -> None:
        self._flush([s.key for s in states] + self.queue.full_keys())

    def while_gated(self) -> None:
        self._flush(self.queue.full_keys())

    def view(self, step: StepInput, rows: list[int], states: list[RequestState]) -> PagedContextView:
        """The drafting rows' contexts, read through their block-table rows."""
        rows_np = np.asarray(rows, dtype=np.int64)
        return PagedContextView(self.pool, step.block_table[to_device(rows_np, step.block_table.device)],
                                step.page_size, np.array([s.start for s in states]),
                                np.array([s.next_pos for s in states]))

    def _state(self, req_id: str, first_pos: int) -> tuple[RequestState, bool]:
        """This request's state, and whether it is new and starts past position 0 (a prefix-cache
        hit: its first blocks were written by other requests)."""
        state = self.requests.get(req_id)
        if state is None:
            state = RequestState(key=next(self._keys), start=0, next_pos=first_pos)
            self.requests[req_id] = state
            return state, first_pos > 0
        if state.next_pos != first_pos:  # steps we did not see, or recomputation: keep what is certain
            if first_pos > state.next_pos:
                self._flush([state.key])  # still this request's slots
            else:
                self.queue.drop(state.key)  # superseded by the recomputed tokens
            state.start, state.next_pos = first_pos, first_pos
        return state, False

    def _flush(self, keys: list[int]) -> None:
        """Write the queued context of ``keys`` into the pool and report what it cost (a drafted
        step pays it on top of the draft; see ``scheduler/draft_gate.py``)."""
        if not keys:
            return
        t0 = time.perf_counter()
        tokens = self.queue.flush(keys)
        if tokens:
            ms = (time.perf_counter() - t0) * 1000.0
            self.ingest_ms = (self.ingest_ms or 0.0) + ms  # a step can flush twice (departures, then drafters)
            self.on_ingest(tokens, ms)
