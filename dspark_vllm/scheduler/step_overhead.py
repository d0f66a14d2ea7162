"""Learn the per-step serving cost that a forward-only cost profile does not contain.

A profile times target forwards of N tokens. A served engine step costs more: scheduling, input
preparation, sampling or rejection sampling, output processing and the hand-off to the API
process. That overhead is paid once per step whatever the step verifies, so ignoring it makes
verification look dearer than it is (every token of a longer draft saves a whole step's
overhead), and the length policies and the draft gate trim too hard.

The estimator compares the measured wall time of engine steps with the profile's forward time
for the same token count and keeps the median difference of recent steps (the median shrugs
off idle gaps between requests and prefill bursts). It writes the result into
``CostProfile.overhead_ms``, which every lookup adds.

The overhead is learned from, and applied to, small batches only (``max_requests``, default
2); for bigger batches the curve is used as profiled. In a big batch the wall time between steps
also absorbs per-*token* work of other processes sharing the CPU (the API server detokenizing
and streaming 16 responses), which fewer, longer steps do not save; counting it as per-step
overhead made drafting look cheap at high load (measured on the 2-core CPU at 16 clients: 60 ms
of "overhead" learned from those steps, or 32 ms learned from small ones and applied anyway,
and load-aware DSpark fell from 0.99x to 0.88x / 0.85x of no speculation).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .cost_profile import CostProfile


class StepOverheadEstimator:
    """Median of (measured step ms - profiled forward ms) over the last ``window`` steps."""

    def __init__(self, cost: CostProfile, window: int = 32, min_samples: int = 4, max_requests: int = 2) -> None:
        self.cost = cost
        self.samples: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples
        self.max_requests = max_requests

    def observe(self, num_tokens: int, step_ms: float, num_requests: int = 1) -> None:
        """One engine step of ``num_requests`` requests that processed ``num_tokens`` tokens took
        ``step_ms`` of wall time (drafting excluded). Steps larger than the profile (long
        prefills) or with more than ``max_requests`` requests are not samples. Sets the
        overhead the next step's decisions use: the learned one for a small batch, else 0."""
        small = num_requests <= self.max_requests
        if small and 1 <= num_tokens <= self.cost.max_tokens and step_ms > 0:
            forward = self.cost.step_time_ms(num_tokens, smooth=True) - self.cost.overhead_ms
            self.samples.append(step_ms - forward)
        self.cost.overhead_ms = self.learned_ms if small else 0.0

    @property
    def learned_ms(self) -> float:
        """Median overhead of the recent small-batch steps (0 until ``min_samples`` are seen)."""
        if len(self.samples) < self.min_samples:
            return 0.0
        return max(0.0, float(np.median(self.samples)))
