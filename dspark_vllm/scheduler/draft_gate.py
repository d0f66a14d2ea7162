"""Skip drafting for a step when no verification length could pay for the draft.

The verify-length policies trim a block *after* the drafter has run, so under heavy load a
batch still pays the drafter's forward every step even when every length comes out 0. The gate
decides *before* drafting, from information that does not depend on this step's drafts (so it
cannot bias verification: skipping only means plain decoding for that step):

* ``prior`` c_k: running mean of the calibrated per-position confidences of earlier blocks;
* the profiled verify cost t(tokens) (times the learned served/profiled ratio, see
  ``step_cost.py``) and the measured draft time d(R) for R drafting requests.

With every request assumed to have the prior survivals a_j = prod_{i<=j} c_i, the best
admissible throughput is max_k (R + top-k survivals) / (t(base + R + k) + d(R)) (the same
greedy path the causal policy walks, searched globally). The step drafts iff that beats plain
decoding, R / t(base + R) by more than the margin ``min_gain`` (default 5%): the prediction
rests on means (prior survivals, a fitted draft time, a median cost scale), and a step opened on
a predicted gain of 1.01 pays every request's full draft when the truth is 0.95; a margin keeps
the gate shut across that noise band, where drafting could win little anyway.

A closed gate learns nothing new (no confidences, no draft times), so
after ``probe_every`` consecutive skipped steps it lets one request draft anyway (a probe costing
one request's draft): an unlucky first block or a draft time measured while the machine was busy
cannot keep drafting off for good. Each probe that leaves the gate closed doubles the wait for
the next one (up to ``max_probe_every``), and an open gate resets it: under steady heavy load
the probes were most of what a closed gate still cost (2.3% of the vLLM worker's samples at 16
clients on the 2-core CPU, a py-spy profile).
"""

from __future__ import annotations

import numpy as np

from .cost_profile import CostProfile
from .policies import StepLoad, _room, survival


class DraftTimer:
    """Online least-squares fit d(R) = a + b R of the drafter's wall time (ms) per step, with
    exponential forgetting so it follows the machine's current speed."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._s = np.zeros(5)  # sums of 1, R, R^2, ms, R*ms

    def observe(self, num_requests: int, ms: float) -> None:
        r = float(num_requests)
        self._s = self.decay * self._s + np.array([1.0, r, r * r, ms, r * ms])

    def predict(self, num_requests: int) -> float:
        n, sr, srr, sy, sry = self._s
        if n < 1e-9:
            return 0.0  # nothing measured yet: optimistic, the first drafted steps measure it
        det = n * srr - sr * sr
        if det < 1e-6 * max(n * srr, 1e-9):  # one batch size seen so far: proportional model
            return max(sy / n, 0.0) * num_requests / max(sr / n, 1.0)
        b = (n * sry - sr * sy) / det
        a = (sy - b * sr) / n
        return max(a + b * num_requests, 0.0)


class DraftGate:
    """Pre-draft decision: draft this step or decode plainly (see module docstring)."""

    def __init__(self, cost: CostProfile, block_size: int, smooth: bool = True, momentum: float = 0.9,
                 probe_every: int = 16, max_probe_every: int = 256, min_gain: float = 1.05) -> None:
        self.cost = cost
        self.min_gain = min_gain
        self.block_size = block_size
        self.smooth = smooth
        self.momentum = momentum
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self.probe_wait = probe_every  # skipped steps before the next probe (backs off)
        self.skipped_in_a_row = 0
        self.prior: np.ndarray | None = None  # mean calibrated c_k, None until a block is seen
        self.blocks_seen = 0
        self.timer = DraftTimer()

    def observe(self, confidence: np.ndarray, draft_ms: float | None = None) -> None:
        """Record a drafted step: calibrated confidences [R, B] and the drafter's wall time."""
        if confidence is not None and len(confidence):
            mean = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0).mean(axis=0)
            # bias-corrected EMA: the plain mean over the first blocks, so the very first block
            # (often a short warm-up request) does not dominate the prior for dozens of steps
            self.blocks_seen += 1
            weight = max(1.0 - self.momentum, 1.0 / self.blocks_seen)
            self.prior = mean if self.prior is None else (1 - weight) * self.prior + weight * mean
        if draft_ms is not None and confidence is not None:
            self.timer.observe(len(confidence), draft_ms)

    def gain(self, num_requests: int, load: StepLoad | None = None) -> float:
        """Predicted throughput with drafting / without (>1: drafting pays)."""
        if num_requests <= 0:
            return 0.0
        if self.prior is None:
            return float("inf")  # no confidences yet: draft to learn them
        load = load or StepLoad()
        surv = survival(self.prior[None, :])[0]
        # R copies of each position's survival, best first (survival decreases with depth)
        sorted_surv = np.repeat(surv, num_requests)[: _room(num_requests, load)]
        tau = num_requests + np.concatenate([[0.0], np.cumsum(sorted_surv)])
        k = np.arange(len(tau))
        verify_ms = np.asarray(self.cost.step_time_ms(load.base_tokens + num_requests + k, self.smooth))
        best = float(np.max(tau[1:] / (verify_ms[1:] + self.timer.predict(num_requests)))) if len(tau) > 1 else 0.0
        plain = num_requests / float(verify_ms[0])
        return best / plain

    def num_to_draft(self, num_requests: int, load: StepLoad | None = None) -> int:
        """How many of the ``num_requests`` should draft this step: all when drafting is predicted
        to pay by more than ``min_gain``, one (a probe, after ``probe_wait`` skipped steps) to
        refresh the estimates at the price of a single request's draft, else none."""
        if self.gain(num_requests, load) > self.min_gain:
            self.skipped_in_a_row = 0
            self.probe_wait = self.probe_every
            return num_requests
        if self.skipped_in_a_row >= self.probe_wait:
            self.skipped_in_a_row = 0
            self.probe_wait = min(2 * self.probe_wait, self.max_probe_every)
            return min(1, num_requests)
        self.skipped_in_a_row += 1
        return 0

    def should_draft(self, num_requests: int, load: StepLoad | None = None) -> bool:
        return self.num_to_draft(num_requests, load) > 0
