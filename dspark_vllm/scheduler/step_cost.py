"""Learn how much a served engine step costs compared with the profiled forward.

A cost profile times bare target forwards of N tokens, in a profiling engine, on whatever state
the machine was in then. A served step costs more (process boundaries, clients sharing the
cores, scheduler work), and the factor is what the length policies and the draft gate need,
because they weigh the drafter's *measured* wall time against the target's step time. Machine
speed drifts, so the factor is learned rather than configured.

The model is multiplicative, served(N) = scale * profiled(N), with ``scale`` the median of
served / profiled over the last ``window`` plain steps (no drafts verified) at any batch size. A
scale keeps the profile's shape and changes only how the target's steps compare with the
drafter's measured time; an additive per-step overhead, learned from big batches, would flatten
the curve and make each extra verified token look cheaper than it is. The median shrugs off
idle gaps between requests and stalls; steps larger than the profile (long prefills) are not
samples.

Steps that verify drafts give the other half of the ``verify_premium`` the draft gate charges a
drafted step: whatever verifying costs beyond the profile's slope (vLLM's spec-decode
bookkeeping and rejection sampling, the context the drafter ingests per accepted token).

The premium is measured *locally*: each time the step kind switches (drafted -> plain or back)
the first step of the new kind is compared with the median of the last few steps of the run that
just ended, and the premium is the median of those drafted/plain pairs. An open gate makes a
plain step only every ``explore_every``-th step, so a window of recent plain steps reaches back
much further than one of drafted steps, and a ratio of those two medians would compare a
drifting machine at two different times; neighbouring steps see the same machine. The premium is
also held at >= 1: a drafted step does everything a plain step of as many tokens does, and more,
so a value below 1 is timing noise, and a gate acting on that phantom discount opens where
drafting loses.
"""

from __future__ import annotations

import statistics
from collections import deque

from .cost_profile import CostProfile, LearnedCost, ServedCost
from .tuning import TUNING


class StepCostEstimator:
    """Median of (measured step ms / profiled forward ms) over the last ``window`` steps: the
    :class:`LearnedCost` it owns (``learned``), read through ``served`` by policies and the gate.

    Runs after every engine step, so the medians are ``statistics.median`` over at most
    ``window`` floats (no array conversion per step)."""

    def __init__(self, cost: CostProfile, window: int = TUNING.cost_window, min_samples: int = TUNING.cost_min_samples,
                 neighbours: int = TUNING.premium_neighbours, pair_window: int = TUNING.premium_pairs) -> None:
        self.profile = cost
        self.learned = LearnedCost()
        self.served = ServedCost(cost, self.learned)
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
        if 1 <= num_tokens <= self.profile.max_tokens and step_ms > 0:
            ratio = step_ms / self.profile.forward_ms(num_tokens)
            drafted = verified_drafts > 0
            (self.verify_samples if drafted else self.samples).append(ratio)
            if self._last_drafted is not None and drafted != self._last_drafted and self._run:
                ended = statistics.median(self._run)  # the kind switches: compare neighbours
                self.premium_pairs.append(ratio / ended if drafted else ended / ratio)
                self._run.clear()
            self._run.append(ratio)
            self._last_drafted = drafted
        self.learned.scale = self.learned_scale
        self.learned.verify_premium = self.learned_premium

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
