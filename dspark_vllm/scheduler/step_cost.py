"""Learn how much a served engine step costs compared with the profiled forward.

A cost profile times bare target forwards of N tokens (an N-token prefill in a profiling
engine, on whatever state the machine was in that day). A served step costs more, and the
factor is what the length policies and the draft gate need, because they weigh the drafter's
*measured* wall time against the target's step time. On the 2-core CPU at 16 clients a served
plain step took 1.11-1.14x a profile timed in vLLM's pinned worker process (``startup_profile``:
the API server and the clients share the worker's cores, and each step crosses the engine
core's process boundary). Against the earlier profile, timed in-process with two threads, it
was ~1.6 two days before and 1.04-1.07 on the same day: the machine's speed drifts, which is
why the factor is learned rather than configured.

The model is multiplicative, served(N) = scale * profiled(N), with ``scale`` the median of
served / profiled over the last ``window`` plain steps (no drafts verified) at any batch size.

Steps that verify drafts are the other half of the ``verify_premium`` the draft gate charges a
drafted step: whatever verifying costs beyond the profile's slope (vLLM's spec-decode bookkeeping
and rejection sampling, the context the drafter ingests per accepted token). It was 1.17-1.34
while profiles were timed with two threads in the calling process: their per-token slope was too
flat for the one-thread served worker, and a gate blind to the difference opened at 16 clients
on a predicted 5-10% gain that came out as 0.94x. Against a profile of the served worker it is
1.04 at the end of the serving benchmark's rounds (1.09-1.11 with the in-process profile the
same day), and 1.02-1.03 at 2-16 requests alike in a single-process engine (one pinned thread).

The premium is measured *locally*: each time the step kind switches (drafted -> plain or back)
the first step of the new kind is compared with the median of the last few steps of the run
that just ended, and the premium is the median of those drafted/plain pairs. An open gate makes
a plain step only every 16th step, so the window of the last 64 plain steps reaches back ~1000
steps (minutes) while the drafted window covers seconds: the ratio of those two medians compares
a drifting machine at two different times. It ended a served round at 0.82, the round whose
first 16-client run drafted 120 of 160 steps and made 0.82x the tokens of no speculation.
Neighbouring steps see the same machine. The premium is also held at >= 1: a drafted step does
everything a plain step of as many tokens does, and more, so a value below 1 is timing noise,
and a gate acting on that phantom discount opens where drafting loses.

An additive per-step overhead (this module's previous design) fits small batches but flattens the curve when learned
from big ones (60 ms on top of a 62 ms forward for 16 tokens made each extra token look half as
dear as it is, and drafting at 16 clients cost 10-15% throughput); a scale keeps the profile's
shape and changes only how the target's steps compare with the drafter's measured time. The
median shrugs off idle gaps between requests and stalls; steps larger than the profile (long
prefills) are not samples.
"""

from __future__ import annotations

import statistics
from collections import deque

from .cost_profile import CostProfile


class StepCostEstimator:
    """Median of (measured step ms / profiled forward ms) over the last ``window`` steps, written
    into ``CostProfile.scale`` for every later lookup.

    Runs after every engine step, so the medians are ``statistics.median`` over at most
    ``window`` floats: 4 us where ``np.median`` on a deque took 21 us (its array conversion)."""

    def __init__(self, cost: CostProfile, window: int = 64, min_samples: int = 8, neighbours: int = 4,
                 pair_window: int = 32) -> None:
        self.cost = cost
        self.samples: deque[float] = deque(maxlen=window)  # plain steps
        self.verify_samples: deque[float] = deque(maxlen=window)  # steps that verified drafts
        self.min_samples = min_samples
        # the last few steps of the current run of one kind, and drafted/plain ratios taken where
        # the kind switches (the run that ended against the first step of the next)
        self._run: deque[float] = deque(maxlen=neighbours)
        self._last_drafted: bool | None = None
        self.premium_pairs: deque[float] = deque(maxlen=pair_window)

    def observe(self, num_tokens: int, step_ms: float, verified_drafts: int = 0) -> None:
        """One engine step that processed ``num_tokens`` tokens, ``verified_drafts`` of them
        draft tokens, took ``step_ms`` of wall time (drafting excluded)."""
        if 1 <= num_tokens <= self.cost.max_tokens and step_ms > 0:
            ratio = step_ms / self.cost.forward_ms(num_tokens)
            drafted = verified_drafts > 0
            (self.verify_samples if drafted else self.samples).append(ratio)
            if self._last_drafted is not None and drafted != self._last_drafted and self._run:
                ended = statistics.median(self._run)  # the kind switches: compare neighbours
                self.premium_pairs.append(ratio / ended if drafted else ended / ratio)
                self._run.clear()
            self._run.append(ratio)
            self._last_drafted = drafted
        self.cost.scale = self.learned_scale
        self.cost.verify_premium = self.learned_premium

    @property
    def learned_scale(self) -> float:
        """Median served/profiled ratio of recent plain steps; of all recent steps while fewer
        than ``min_samples`` plain ones exist; 1.0 until ``min_samples`` steps are seen."""
        if len(self.samples) >= self.min_samples:
            return statistics.median(self.samples)
        both = list(self.samples) + list(self.verify_samples)
        return statistics.median(both) if len(both) >= self.min_samples else 1.0

    @property
    def learned_premium(self) -> float | None:
        """Median of the neighbouring drafted/plain ratios (None until ``min_samples`` of them),
        kept within [1, 4]: never a discount (see the module docstring), and a burst of odd
        steps cannot flip every decision."""
        if len(self.premium_pairs) < self.min_samples:
            return None
        return min(max(statistics.median(self.premium_pairs), 1.0), 4.0)
