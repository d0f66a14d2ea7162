"""Learn how much a served engine step costs compared with the profiled forward.

A cost profile times bare target forwards of N tokens (an N-token prefill in a profiling
engine, on whatever state the machine was in that day). A served step costs more, and the
factor is what the length policies and the draft gate need, because they weigh the drafter's
*measured* wall time against the target's step time. On the 2-core CPU at 16 clients the served
step (the wall time between two proposer calls, drafting excluded) took 2.8-3.4x the profiled
forward for N = 16..128 tokens, and 2.3-2.5x at N = 4-8: one pinned worker thread, the LM head
and sampler over every verified token (a prefill profile computes one row of logits), the
engine core's turnaround, and a machine slower than on the day of the profile.

The model is multiplicative, served(N) = scale * profiled(N), with ``scale`` the median of
served / profiled over the last ``window`` steps at any batch size. An additive per-step
overhead (this module's previous design) fits small batches but flattens the curve when learned
from big ones (60 ms on top of a 62 ms forward for 16 tokens made each extra token look half as
dear as it is, and drafting at 16 clients cost 10-15% throughput); a scale keeps the profile's
shape and changes only how the target's steps compare with the drafter's measured time. The
median shrugs off idle gaps between requests and stalls; steps larger than the profile (long
prefills) are not samples.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .cost_profile import CostProfile


class StepCostEstimator:
    """Median of (measured step ms / profiled forward ms) over the last ``window`` steps, written
    into ``CostProfile.scale`` for every later lookup."""

    def __init__(self, cost: CostProfile, window: int = 64, min_samples: int = 8) -> None:
        self.cost = cost
        self.samples: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples

    def observe(self, num_tokens: int, step_ms: float) -> None:
        """One engine step that processed ``num_tokens`` tokens took ``step_ms`` of wall time
        (drafting excluded)."""
        if 1 <= num_tokens <= self.cost.max_tokens and step_ms > 0:
            self.samples.append(step_ms / self.cost.forward_ms(num_tokens))
        self.cost.scale = self.learned_scale

    @property
    def learned_scale(self) -> float:
        """Median served/profiled ratio of the recent steps (1.0 until ``min_samples`` are seen)."""
        if len(self.samples) < self.min_samples:
            return 1.0
        return float(np.median(self.samples))
