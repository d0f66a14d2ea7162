"""Optional per-step trace of the DSpark proposer, one JSON line per engine step.

``DSPARK_VLLM_STEP_TRACE=/path/trace-{pid}.jsonl`` (``{pid}`` is replaced by the worker's pid, so
several servers can share one template) records what the draft gate saw and decided each step,
and what the previous step cost and produced. It answers the questions a throughput number
cannot: did the gate open at 16 clients, on what predicted gain, and did the drafted steps pay?
Off by default (a line per step is a file write).

Fields: ``t`` (s, monotonic), ``batch`` (requests in the batch), ``ready`` (requests with a token
to draft from), ``drafting`` (requests that drafted: 0 = gated, 1 = a probe when ``ready`` > 1),
``depth``, ``gain`` (the gate's predicted gain at the chosen depth, null without a gate or
before its first block), ``step_ms`` (wall time of the engine step that just ended, drafting
excluded), ``verified`` (draft tokens that step verified), ``emitted`` (tokens it produced),
``draft_ms`` (this step's drafter time), ``ingest_ms`` (context projected into the drafter's
cache this step, null if none), ``scale``/``premium`` (learned step-cost factors).
"""

from __future__ import annotations

import json
import os
import time
from typing import IO

ENV_STEP_TRACE = "DSPARK_VLLM_STEP_TRACE"


class StepTrace:
    """Appends one JSON object per step to a file; a no-op object when tracing is off."""

    def __init__(self, path: str | None) -> None:
        self._file: IO[str] | None = None
        if path:
            path = path.replace("{pid}", str(os.getpid()))
            self._file = open(path, "a", buffering=1)  # line-buffered: a server is stopped by a signal

    @classmethod
    def from_env(cls) -> "StepTrace":
        return cls(os.environ.get(ENV_STEP_TRACE))

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, **fields: object) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({"t": round(time.monotonic(), 4), **fields}) + "\n")
        except OSError:  # tracing must never break serving
            self._file = None

    def proposer_step(self, *, batch: int, ready: int, drafting: int, depth: int, learned, last_step: tuple,
                      emitted: int, draft_ms: float | None, ingest_ms: float | None) -> None:
        """One proposer call: what the gate saw and decided (``learned``: the scheduler's
        snapshot; ``last_step``: (ms, verified drafts) of the engine step that just ended)."""
        if self._file is None:
            return
        step_ms, verified = last_step
        self.write(batch=batch, ready=ready, drafting=drafting, depth=depth,
                   gain=None if ready == 0 else learned.last_gain, step_ms=_round(step_ms, 3), verified=verified,
                   emitted=emitted, draft_ms=_round(draft_ms, 3), ingest_ms=_round(ingest_ms, 3),
                   scale=_round(learned.cost_scale, 4), premium=learned.verify_premium)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
