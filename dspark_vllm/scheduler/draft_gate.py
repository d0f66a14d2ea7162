"""Skip drafting for a step when no verification length could pay for the draft.

The verify-length policies trim a block *after* the drafter has run, so under heavy load a
batch would still pay the drafter's forward every step even when every length comes out 0. The
gate decides *before* drafting, from information that does not depend on this step's drafts (so
it cannot bias verification: skipping only means plain decoding for that step):

* ``prior`` c_k: running mean of the calibrated per-position confidences of earlier blocks;
* the profiled verify cost t(tokens) (times the learned served/profiled ratio, see
  ``step_cost.py``) and the measured draft time d(n) for n drafted block positions (R requests
  drafting D positions each: n = R * D);
* the measured context ingestion time i(n) for n tokens (below).

With every request assumed to have the prior survivals a_j = prod_{i<=j} c_i, drafting D
positions admits at best max_{k <= R*D} tau_k / (t(base + R + k) + i(tau_k) + d(R * D)), with
tau_k = R + the top-k survivals (the greedy path the causal policy walks, searched globally).
The gate also picks the depth D: under load the best k is about one token per request, while a
full block of B positions costs nearly B times a block of one. The step drafts at the best D iff
that beats plain decoding, R / t(base + R), by more than the margin ``min_gain``: the prediction
rests on means (prior survivals, a fitted draft time, a median cost scale), so a step opened on
a predicted gain just above 1 can lose; the margin keeps the gate shut across that noise band,
where drafting could win little anyway.

Drafted steps are charged the learned ``verify_premium`` (``step_cost.py``): verifying drafts
costs more than the profile's slope says. The premium compares neighbouring drafted and plain
steps, and an open gate makes no plain ones, so while the predicted gain is below
``explore_below`` every ``explore_every``-th step decodes plainly (every 4th until the premium is
first learned), costing at most that step's share of the gain. While no premium is known and
one is being learned (``learn_premium``) every 4th step is plain *whatever the predicted gain*:
a gate that opened on a wrong cost curve (a synthetic roofline on a CPU, say) would otherwise
never see a plain step and never correct it.

A closed gate learns nothing new (no confidences, no draft times), so after ``probe_every``
consecutive skipped steps it lets one request draft anyway (a probe costing one request's
draft): an unlucky first block or a draft time measured while the machine was busy cannot keep
drafting off for good. Each probe that leaves the gate closed doubles the wait for the next one
(up to ``max_probe_every``), and an open gate resets it, so under steady heavy load probes cost
next to nothing.

Ingestion: every token a drafting request emitted since it last drafted goes through the
drafter's fc + norm and every layer's K/V projection before the block is drafted
(``pending_context.py``). In steady drafting that is the step's own emitted tokens, tau(k), so
the gate charges ``ingest(tau)`` from a second online line fit, i(n) = a + b n ms, fed with every
flush's wall time; it is the same order as a shallow draft, so leaving it out overrates drafted
steps. A backlog built up while the gate was shut is not charged to the step that reopens it: it
is the price of the context those plain steps decoded, paid once, not a per-step rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cost_profile import CostCurve, ServedCost
from .tuning import TUNING
from .policies import StepLoad, _room, extend_to_block, survival, tau_path


@dataclass(frozen=True)
class DraftPlan:
    """What a step drafts: ``requests`` of the ready requests (0 = plain decoding, 1 = a probe
    when fewer than all), starting at ready index ``first`` (probes rotate through the batch),
    each drafting the first ``depth`` positions of its block (None: the whole block)."""

    requests: int
    depth: int | None
    first: int = 0

    def rows(self, ready: int) -> list[int]:
        """Indices into the ready requests that draft this step."""
        return [(self.first + j) % ready for j in range(min(self.requests, ready))]


class DraftTimer:
    """Online least-squares fit d(n) = a + b n of a wall time in ms, with exponential forgetting
    so it follows the machine's current speed: the drafter's forward for n drafted block
    positions (requests x depth), or the context ingestion of n tokens."""

    def __init__(self, decay: float = TUNING.timer_decay) -> None:
        self.decay = decay
        self._s = np.zeros(5)  # sums of 1, n, n^2, ms, n*ms

    def observe(self, num_tokens: int, ms: float) -> None:
        x = float(num_tokens)
        self._s = self.decay * self._s + np.array([1.0, x, x * x, ms, x * ms])

    def predict(self, num_tokens: int | np.ndarray) -> float | np.ndarray:
        """Predicted ms for ``num_tokens`` drafted positions (an int, or an array of them)."""
        x = np.asarray(num_tokens, dtype=np.float64)
        n, sx, sxx, sy, sxy = self._s
        if n < 1e-9:
            out = np.zeros_like(x)  # nothing measured yet: optimistic, the first drafted steps measure it
        elif (det := n * sxx - sx * sx) < 1e-6 * max(n * sxx, 1e-9):  # one size seen so far: proportional
            out = max(sy / n, 0.0) * x / max(sx / n, 1.0)
        else:
            b = (n * sxy - sx * sy) / det
            out = np.maximum((sy - b * sx) / n + b * x, 0.0)
        return float(out) if out.ndim == 0 else out


class DraftGate:
    """Pre-draft decision: draft this step or decode plainly (see module docstring)."""

    def __init__(self, cost: CostCurve, block_size: int, smooth: bool = True,
                 momentum: float = TUNING.gate_momentum, probe_every: int = TUNING.probe_every,
                 max_probe_every: int = TUNING.max_probe_every, min_gain: float = 1.05,
                 adaptive_depth: bool = True, explore_every: int = TUNING.explore_every,
                 explore_below: float = TUNING.explore_below, learn_premium: bool = False) -> None:
        self.cost = ServedCost.of(cost)
        self.min_gain = min_gain
        self.adaptive_depth = adaptive_depth
        self.block_size = block_size
        self.smooth = smooth
        self.momentum = momentum
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self.probe_wait = probe_every  # skipped steps before the next probe (backs off)
        self.skipped_in_a_row = 0
        self.probes = 0  # probes made so far (rotates which request probes)
        self.explore_every = explore_every
        self.explore_below = explore_below
        self.learn_premium = learn_premium
        self.drafted_in_a_row = 0
        self.prior: np.ndarray | None = None  # mean calibrated c_k, None until a block is seen
        self.seen = np.zeros(block_size)  # blocks that reached each position (shallow drafts stop early)
        self.timer = DraftTimer()  # drafter forward: ms for n = requests x depth block positions
        self.ingest = DraftTimer()  # context ingestion: ms for n tokens projected into the drafter's cache
        self.last_gain: float | None = None  # predicted gain at the depth the last plan chose (tracing)

    def observe(self, confidence: np.ndarray, draft_ms: float | None = None) -> None:
        """Record a drafted step: calibrated confidences [R, D] (D <= B drafted positions) and
        the drafter's wall time. Only the D observed positions of the prior move."""
        if confidence is not None and len(confidence):
            mean = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0).mean(axis=0)[: self.block_size]
            depth = len(mean)
            if self.prior is None:  # positions a first shallow block did not reach: its deepest one
                self.prior = extend_to_block(mean, self.block_size)
            # bias-corrected EMA per position: the plain mean over the first blocks, so the very
            # first block (often a short warm-up request) does not dominate the prior for long
            self.seen[:depth] += 1
            weight = np.maximum(1.0 - self.momentum, 1.0 / self.seen[:depth])
            self.prior[:depth] = (1 - weight) * self.prior[:depth] + weight * mean
        if draft_ms is not None and confidence is not None:
            self.timer.observe(np.size(confidence), draft_ms)  # R x D drafted positions

    def observe_ingest(self, num_tokens: int, ms: float) -> None:
        """Record one context flush: ``num_tokens`` tokens projected in ``ms`` of wall time."""
        if num_tokens > 0:
            self.ingest.observe(num_tokens, ms)

    def gains(self, num_requests: int, load: StepLoad | None = None) -> np.ndarray:
        """Predicted throughput with drafting / without, for each depth D = 1..B ([B]; >1 pays).

        Survivals decrease with depth, so the best k tokens of depth D are the first k of R
        copies of each position's survival, in position order: one tau curve serves every D."""
        if num_requests <= 0:
            return np.zeros(self.block_size)
        if self.prior is None:
            return np.full(self.block_size, np.inf)  # no confidences yet: draft to learn them
        load = load or StepLoad()
        surv = survival(self.prior[None, :])[0]
        sorted_surv = np.repeat(surv, num_requests)[: _room(num_requests, load)]
        tau = tau_path(sorted_surv, num_requests)
        k = np.arange(len(tau))
        verify_ms = np.asarray(self.cost.step_time_ms(load.base_tokens + num_requests + k, self.smooth))
        plain = num_requests / float(verify_ms[0])
        verify_ms[1:] *= self.cost.verify_premium or 1.0
        if len(tau) < 2:  # no room for a single draft token
            return np.zeros(self.block_size)
        # rows: depths D = 1..B; columns: k = 1..K admitted tokens, of which k <= R * D exist
        drafted = num_requests * np.arange(1, self.block_size + 1)
        draft_ms = self.timer.predict(drafted)
        ingest_ms = self.ingest.predict(tau[1:])  # steady drafting ingests what each step emits
        ratio = tau[None, 1:] / (verify_ms[None, 1:] + ingest_ms[None, :] + draft_ms[:, None])
        ratio[k[None, 1:] > drafted[:, None]] = -np.inf
        return ratio.max(axis=1) / plain

    def gain(self, num_requests: int, load: StepLoad | None = None) -> float:
        """Predicted throughput with drafting / without at the best depth (>1: drafting pays)."""
        return float(np.max(self.gains(num_requests, load)))

    def plan(self, num_requests: int, load: StepLoad | None = None) -> DraftPlan:
        """Draft all ``num_requests`` at the best depth when that is predicted to pay by more
        than ``min_gain``; else one request at full depth (a probe, after ``probe_wait`` skipped
        steps) to refresh the estimates at the price of a single request's draft; else none."""
        if self.prior is None:  # no confidences yet: a full block learns every position's
            return DraftPlan(num_requests, self.block_size)
        gains = self.gains(num_requests, load)
        if not self.adaptive_depth:
            gains[:-1] = -np.inf
        best = int(np.argmax(gains))  # ties: the shallowest (cheapest) depth
        self.last_gain = float(gains[best])
        if gains[best] > self.min_gain:
            self.skipped_in_a_row = 0
            self.probe_wait = self.probe_every
            self.drafted_in_a_row += 1
            learning = self.cost.verify_premium is None
            every = min(TUNING.explore_every_learning, self.explore_every) if learning else self.explore_every
            marginal = gains[best] < self.explore_below or (learning and self.learn_premium)
            if marginal and self.drafted_in_a_row >= every:
                self.drafted_in_a_row = 0  # an exploration step: plain, to keep the plain cost current
                return DraftPlan(0, self.block_size)
            return DraftPlan(num_requests, best + 1)
        if self.skipped_in_a_row >= self.probe_wait:
            self.skipped_in_a_row = 0
            self.probe_wait = min(2 * self.probe_wait, self.max_probe_every)
            self.probes += 1
            return DraftPlan(min(1, num_requests), self.block_size, first=self.probes % max(num_requests, 1))
        self.skipped_in_a_row += 1
        return DraftPlan(0, self.block_size)
