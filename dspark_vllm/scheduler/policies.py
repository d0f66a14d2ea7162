"""Verification-length policies: per-request confidences -> how many drafts to verify.

Every policy maps a batch's calibrated per-position confidences c [R, B] (c_{r,k} estimates
P(d_k accepted | d_<k accepted)) to prefix lengths l_r in 0..max_len_r. Survival of a prefix is
a_{r,j} = prod_{i<=j} c_{r,i}; verifying l_r drafts costs 1 + l_r target tokens and is expected
to yield 1 + sum_{j<=l_r} a_{r,j} tokens (paper §3.2.2).

* ``fixed``: verify everything (baseline).
* ``threshold``: stop at the first position whose c_k is below a static threshold
  (DeepSpec ``--confidence-threshold``; per-position c_k, not the product).
* ``causal_greedy``: paper Algorithm 1. Admit candidates in descending survival order while the
  expected throughput Theta = tau * SPS(tokens) strictly improves; stop at the first
  non-improvement. The admission of d_k then depends only on survivals ranked before it, which
  never include anything computed from d_k itself (Appendix A), so verification stays lossless.
* ``async_topk``: paper §5.2. The budget K is the *global* argmax of Theta (no early stop),
  computed from confidences two steps old; the current step then admits the K candidates with
  the highest current survival (rank-preserving). K uses no information about the current
  tokens, so the unconstrained search is safe.

All policies are deterministic, vectorised NumPy, and respect an optional step token budget.
Each selectable policy is a :class:`VerifyPolicy` subclass registered by name with
:func:`register_policy`; settings validation, the scheduler and the CLI read :data:`POLICIES`, so
adding a policy is one class in this file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .cost_profile import CostCurve, CostProfile

if TYPE_CHECKING:
    from ..settings import SchedulerSettings

NO_TOKEN_LIMIT = sys.maxsize  # room left in a step without a token budget


@dataclass
class StepLoad:
    """What else is in the next target step. base_tokens: tokens of other work (prefill chunks,
    non-speculating requests); max_num_tokens: the step's token budget (None = unlimited)."""

    base_tokens: int = 0
    max_num_tokens: int | None = None


class VerifyPolicy:
    """Calibrated confidences [R, B] -> verify lengths [R] (see the module docstring).

    ``needs_confidence``: False only for a policy that can run on a drafter without a confidence
    head. ``load_aware``: the policy prices lengths with the step-cost curve; the scheduler then
    adds the draft gate and the served step-cost estimator (``runtime.py``)."""

    name: ClassVar[str]
    needs_confidence: ClassVar[bool] = True
    load_aware: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings: "SchedulerSettings", cost: CostCurve | None,
                      block_size: int) -> "VerifyPolicy":
        return cls()

    def lengths(self, confidence: np.ndarray, max_lens: np.ndarray | None = None,
                load: StepLoad | None = None) -> np.ndarray:
        raise NotImplementedError

    def step_lengths(self, confidence: np.ndarray, request_ids: list, max_lens: np.ndarray | None = None,
                     load: StepLoad | None = None) -> np.ndarray:
        """One engine step's lengths; a policy with per-request history keys it by ``request_ids``."""
        return self.lengths(confidence, max_lens, load)

    def forget(self, request_ids: list) -> None:
        """Requests that left the engine (drop any per-request history)."""


POLICIES: dict[str, type[VerifyPolicy]] = {}


def register_policy(cls: type[VerifyPolicy]) -> type[VerifyPolicy]:
    """Make ``cls`` selectable as ``scheduler.policy: <cls.name>``."""
    POLICIES[cls.name] = cls
    return cls


def build_policy(settings: "SchedulerSettings", cost: CostCurve | None, block_size: int) -> VerifyPolicy:
    """The policy named by ``settings.policy``; load-aware ones fall back to a synthetic cost curve."""
    cls = POLICIES[settings.policy]
    if cls.load_aware and cost is None:
        cost = CostProfile.synthetic()
    return cls.from_settings(settings, cost, block_size)


def require_confidence_head(policy: str, has_confidence_head: bool) -> None:
    """The one rule for every engine: a policy that needs confidences needs the drafter's head."""
    if not has_confidence_head and POLICIES[policy].needs_confidence:
        fallback = sorted(n for n, c in POLICIES.items() if not c.needs_confidence)
        raise ValueError(f"scheduler policy '{policy}' needs the drafter's confidence head, but this checkpoint "
                         f"has enable_confidence_head=false; set `scheduler: {{policy: {fallback[0]}}}` in the "
                         "YAML settings")


def survival(confidence: np.ndarray) -> np.ndarray:
    """a_{r,j} = prod_{i<=j} c_{r,i} along each row."""
    return np.cumprod(np.clip(confidence, 0.0, 1.0), axis=1)


def extend_to_block(confidence: np.ndarray, width: int) -> np.ndarray:
    """Confidences of a shallow draft ([..., D], D <= width) extended to ``width`` positions, the
    undrafted ones repeating the deepest drafted one (an estimate, never a verified length)."""
    missing = width - confidence.shape[-1]
    if missing <= 0:
        return confidence
    return np.concatenate([confidence, np.repeat(confidence[..., -1:], missing, axis=-1)], axis=-1)


def _max_lens(confidence: np.ndarray, max_lens: np.ndarray | None) -> np.ndarray:
    r, b = confidence.shape
    return np.full(r, b, dtype=np.int64) if max_lens is None else np.minimum(np.asarray(max_lens, np.int64), b)


def _room(num_requests: int, load: StepLoad | None) -> int:
    """How many draft tokens fit in the step after every request's bonus token."""
    if load is None or load.max_num_tokens is None:
        return NO_TOKEN_LIMIT
    return max(0, load.max_num_tokens - load.base_tokens - num_requests)


def _clip_to_budget(lengths: np.ndarray, room: int) -> np.ndarray:
    """Trim lengths so sum(lengths) <= room, removing the deepest positions first."""
    if lengths.sum() <= room:
        return lengths
    out = lengths.copy()
    while out.sum() > room:
        out[np.argmax(out)] -= 1  # deepest first keeps survival-ordered admission
    return out


def sorted_candidates(surv: np.ndarray, max_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened candidate indices sorted by descending survival (stable: row-major ties keep
    position order, so a request's positions are always admitted as a prefix), and the
    corresponding survivals. Positions beyond max_len_r or with zero survival are dropped."""
    r, b = surv.shape
    valid = (np.arange(b)[None, :] < max_lens[:, None]) & (surv > 0)
    flat = np.where(valid, surv, -1.0).ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[: int(valid.sum())]
    return order, flat[order]


def tau_path(sorted_surv: np.ndarray, num_requests: int) -> np.ndarray:
    """Expected tokens tau_k of a step admitting the first k sorted candidates, k = 0..K:
    one per request plus the admitted survivals."""
    return num_requests + np.concatenate([[0.0], np.cumsum(sorted_surv)])


def throughput_path(sorted_surv: np.ndarray, num_requests: int, cost: CostCurve,
                    base_tokens: int = 0, smooth: bool = False) -> np.ndarray:
    """Theta_k = tau_k * SPS(base + R + k) for admitting the first k sorted candidates."""
    k = np.arange(len(sorted_surv) + 1)
    return tau_path(sorted_surv, num_requests) * cost.sps(base_tokens + num_requests + k, smooth)


def _lengths_from_admitted(order: np.ndarray, count: int, shape: tuple[int, int]) -> np.ndarray:
    rows = order[:count] // shape[1]
    return np.bincount(rows, minlength=shape[0]).astype(np.int64)


@register_policy
class FixedPolicy(VerifyPolicy):
    """Verify the whole block (within the step budget); needs no confidences."""

    name = "fixed"
    needs_confidence = False

    def lengths(self, confidence, max_lens=None, load=None):
        lens = _max_lens(confidence, max_lens)
        return _clip_to_budget(lens, _room(len(lens), load))


@register_policy
class ThresholdPolicy(VerifyPolicy):
    """Stop at the first position whose calibrated c_k is below ``threshold``."""

    name = "threshold"

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    @classmethod
    def from_settings(cls, settings, cost, block_size):
        return cls(settings.threshold)

    def lengths(self, confidence, max_lens=None, load=None):
        below = confidence < self.threshold
        first = np.where(below.any(axis=1), below.argmax(axis=1), confidence.shape[1])
        lens = np.minimum(first, _max_lens(confidence, max_lens))
        return _clip_to_budget(lens, _room(len(lens), load))


@register_policy
class CausalGreedyPolicy(VerifyPolicy):
    """Paper Algorithm 1 with its early-stopping break.

    smooth=True (default) takes the stop decision on the cost curve interpolated between profiled
    sizes, so padding-bucket cliffs do not end the search early; smooth=False is the paper's
    algorithm on the raw step-function curve."""

    name = "causal_greedy"
    load_aware = True

    def __init__(self, cost: CostCurve, smooth: bool = True) -> None:
        self.cost = cost
        self.smooth = smooth

    @classmethod
    def from_settings(cls, settings, cost, block_size):
        return cls(cost, smooth=settings.smooth_cost)

    def lengths(self, confidence, max_lens=None, load=None):
        load = load or StepLoad()
        r = confidence.shape[0]
        order, surv = sorted_candidates(survival(confidence), _max_lens(confidence, max_lens))
        surv = surv[: _room(r, load)]
        path = throughput_path(surv, r, self.cost, load.base_tokens, self.smooth)
        stops = np.flatnonzero(path[1:] <= path[:-1])
        count = int(stops[0]) if stops.size else len(surv)
        return _lengths_from_admitted(order, count, confidence.shape)


class RetrospectivePolicy(VerifyPolicy):
    """Global argmax of Theta over the greedy path *without* the break. Biased when applied to
    current confidences (paper Appendix A); kept for that demonstration and as the budget search
    of :class:`AsyncTopKPolicy`, where it only sees stale confidences."""

    name = "retrospective"

    def __init__(self, cost: CostCurve) -> None:
        self.cost = cost

    def budget(self, confidence, max_lens=None, load=None) -> int:
        load = load or StepLoad()
        r = confidence.shape[0]
        _, surv = sorted_candidates(survival(confidence), _max_lens(confidence, max_lens))
        surv = surv[: _room(r, load)]
        return int(np.argmax(throughput_path(surv, r, self.cost, load.base_tokens)))

    def lengths(self, confidence, max_lens=None, load=None):
        order, _ = sorted_candidates(survival(confidence), _max_lens(confidence, max_lens))
        return _lengths_from_admitted(order, self.budget(confidence, max_lens, load), confidence.shape)


@register_policy
class AsyncTopKPolicy(VerifyPolicy):
    """Paper §5.2: budget from stale confidences, rank-preserving top-K on current ones.

    :meth:`lengths` takes the stale confidences explicitly; :meth:`step_lengths` keeps them per
    request (``lag`` steps old) in a :class:`StaleConfidences`."""

    name = "async_topk"
    load_aware = True

    def __init__(self, cost: CostCurve, block_size: int = 0, lag: int = 2) -> None:
        self.search = RetrospectivePolicy(cost)
        self.history = StaleConfidences(block_size, lag)

    @classmethod
    def from_settings(cls, settings, cost, block_size):
        return cls(cost, block_size, settings.stale_steps)

    def step_lengths(self, confidence, request_ids, max_lens=None, load=None):
        stale = self.history.stale(request_ids)
        self.history.push(request_ids, extend_to_block(confidence, self.history.block_size))  # shallow: D < B
        return self.lengths(confidence, max_lens, load, stale_confidence=stale)

    def forget(self, request_ids):
        self.history.forget(request_ids)

    def lengths(self, confidence, max_lens=None, load=None, stale_confidence: np.ndarray | None = None):
        if stale_confidence is None:
            raise ValueError("async_topk needs the confidences from two steps earlier (stale_confidence)")
        budget = self.search.budget(stale_confidence, max_lens, load)
        order, _ = sorted_candidates(survival(confidence), _max_lens(confidence, max_lens))
        return _lengths_from_admitted(order, min(budget, len(order)), confidence.shape)


class StaleConfidences:
    """Per-request confidence history so async_topk can read what was known two steps ago.

    New requests (or requests with fewer than two recorded steps) read all-ones, as upstream
    vLLM does for fresh requests."""

    def __init__(self, block_size: int, lag: int = 2) -> None:
        self.block_size = block_size
        self.lag = lag
        self._history: dict[object, list[np.ndarray]] = {}

    def push(self, request_ids: list, confidence: np.ndarray) -> None:
        for rid, row in zip(request_ids, confidence):
            hist = self._history.setdefault(rid, [])
            hist.append(np.array(row, dtype=np.float64))
            del hist[: -self.lag]

    def stale(self, request_ids: list) -> np.ndarray:
        out = np.ones((len(request_ids), self.block_size))
        for i, rid in enumerate(request_ids):
            hist = self._history.get(rid, [])
            if len(hist) >= self.lag:
                out[i] = hist[-self.lag]
        return out

    def forget(self, request_ids: list) -> None:
        for rid in request_ids:
            self._history.pop(rid, None)


def expected_tokens(confidence: np.ndarray, lengths: np.ndarray) -> float:
    """Expected emitted tokens of a step: sum_r (1 + sum_{j<l_r} a_{r,j})."""
    surv = survival(confidence)
    mask = np.arange(surv.shape[1])[None, :] < lengths[:, None]
    return float(len(lengths) + (surv * mask).sum())
