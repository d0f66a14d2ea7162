"""Profiled cost of one engine step as a function of the tokens it processes.

The scheduler needs SPS(B), steps per second of a verification forward over B tokens (paper
Alg. 1), as an O(1) lookup. A profile stores measured step times at a grid of token counts and
turns them into a dense table:

* monotone cleanup: step time never decreases with more tokens (running max over the grid), so
  noise cannot make a larger batch look cheaper;
* padded buckets: between two profiled sizes the step costs what the next profiled size costs
  (engines pad to captured CUDA-graph sizes, so cost is a step function);
* beyond the last profiled size: linear extrapolation from the last two points.

A *smoothed* view (``smooth=True``) interpolates linearly between profiled sizes instead of
stepping. The causal scheduler decides with it: its early stop would otherwise halt at the first
padding cliff even when the rest of the bucket is free (paper §5.2's "jagged SPS"). Any fixed
cost function keeps Algorithm 1 lossless, since the curve never depends on sampled tokens.
The drafter's own time is not part of a profile: the draft gate measures it while serving.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


@dataclass
class CostProfile:
    """Step time (ms) measured at ``tokens`` (ascending)."""

    tokens: list[int]
    step_ms: list[float]
    device: str = ""
    max_tokens: int = 0
    _table: np.ndarray = field(init=False, repr=False)
    _smooth_table: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.step_ms) or not self.tokens:
            raise ValueError("cost profile needs equally long, non-empty 'tokens' and 'step_ms' lists")
        order = np.argsort(self.tokens)
        self.tokens = [int(self.tokens[i]) for i in order]
        self.step_ms = [float(self.step_ms[i]) for i in order]
        if self.tokens[0] < 1 or min(self.step_ms) <= 0:
            raise ValueError("cost profile token counts must be >= 1 and step times > 0 ms")
        self.max_tokens = max(self.max_tokens, self.tokens[-1])
        self._table = self._dense(self.tokens, self.step_ms, self.max_tokens, floor=1e-6)
        mono = np.maximum.accumulate(np.asarray(self.step_ms))
        self._smooth_table = np.maximum(np.interp(np.arange(self.max_tokens + 1), self.tokens, mono), 1e-6)

    @staticmethod
    def _dense(xs: list[int], ys: list[float], upto: int, floor: float) -> np.ndarray:
        """Table t[n] for n = 0..upto: step function up to the next profiled x, monotone."""
        ys_mono = np.maximum.accumulate(np.asarray(ys, dtype=np.float64))
        n = np.arange(upto + 1)
        idx = np.searchsorted(np.asarray(xs), n, side="left")
        table = np.empty(upto + 1)
        inside = idx < len(xs)
        table[inside] = ys_mono[idx[inside]]
        if (~inside).any():
            table[~inside] = CostProfile._extrapolate(xs, ys_mono, n[~inside])
        return np.maximum(table, floor)

    @staticmethod
    def _extrapolate(xs, ys, n):
        n = np.asarray(n, dtype=np.float64)
        if len(xs) == 1:
            return ys[-1] * n / xs[-1]  # proportional beyond a single measured point
        slope = max((ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1), 0.0)
        return ys[-1] + slope * (n - xs[-1])

    # ---- lookups -------------------------------------------------------------------------
    def forward_ms(self, num_tokens: int | np.ndarray, smooth: bool = True) -> np.ndarray | float:
        """The profiled forward time for ``num_tokens`` (array or int), O(1) per lookup (the
        scheduler looks up every engine step, so sizes inside the table skip extrapolation)."""
        table = self._smooth_table if smooth else self._table
        if isinstance(num_tokens, (int, np.integer)) and 0 <= num_tokens <= self.max_tokens:
            return float(table[num_tokens])
        n = np.asarray(num_tokens)
        if n.size and n.max() <= self.max_tokens:
            out = table[np.clip(n, 0, self.max_tokens)]
        else:
            out = np.where(n <= self.max_tokens, table[np.clip(n, 0, self.max_tokens)],
                           self._extrapolate(self.tokens, np.maximum.accumulate(self.step_ms), n))
        return float(out) if out.ndim == 0 else out

    def step_time_ms(self, num_tokens: int | np.ndarray, smooth: bool = False) -> np.ndarray | float:
        """Verification step time for ``num_tokens`` as profiled (see :class:`ServedCost` for
        the served one)."""
        return self.forward_ms(num_tokens, smooth)

    def sps(self, num_tokens: int | np.ndarray, smooth: bool = False) -> np.ndarray | float:
        """Steps per second SPS(tokens) of a step verifying ``num_tokens``."""
        return 1000.0 / self.step_time_ms(num_tokens, smooth)

    verify_premium = None  # a profile knows no premium; see ServedCost

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "step_ms": self.step_ms, "device": self.device, "max_tokens": self.max_tokens}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostProfile":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read cost profile {path}: {exc}") from exc
        known = {"tokens", "step_ms", "device", "max_tokens"}
        for legacy in ("draft_requests", "draft_ms"):  # an always-empty field of older profiles
            if data.get(legacy) == []:
                del data[legacy]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"cost profile {path} has unknown keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)

    @classmethod
    def synthetic(cls, base_ms: float = 20.0, flat_tokens: int = 64, slope_ms: float = 0.25,
                  max_tokens: int = 4096, bucket: int = 8) -> "CostProfile":
        """A roofline-shaped curve: flat while memory bound, then linear in tokens, padded to
        ``bucket`` multiples. Used by tests and benchmarks when no measured profile exists."""
        grid = list(range(bucket, max_tokens + 1, bucket))
        ms = [base_ms + slope_ms * max(0, t - flat_tokens) for t in grid]
        return cls(tokens=grid, step_ms=ms, device="synthetic")


PROFILE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def profile_grid(max_tokens: int) -> list[int]:
    """The token counts a cost profile times, up to ``max_tokens`` (denser where batches are small)."""
    return [t for t in PROFILE_GRID if t <= max_tokens]


def profile_step_times(forward: Callable[[int], None], token_grid: Iterable[int], repeats: int = 3,
                       warmup: int = 1, progress: bool = True,
                       sync: Callable[[], None] | None = None) -> CostProfile:
    """Time ``forward(num_tokens)`` over a grid (median of ``repeats``), with a progress bar."""
    from tqdm.auto import tqdm

    grid = sorted(set(int(t) for t in token_grid))
    times = []
    for n in tqdm(grid, desc="profiling step cost", unit="size", disable=not progress):
        for _ in range(warmup):
            forward(n)
        samples = []
        for _ in range(repeats):
            if sync:
                sync()
            t0 = time.perf_counter()
            forward(n)
            if sync:
                sync()
            samples.append((time.perf_counter() - t0) * 1000.0)
        times.append(float(np.median(samples)))
    return CostProfile(tokens=grid, step_ms=times)


@dataclass
class LearnedCost:
    """What the served engine taught the step-cost estimator (``step_cost.py``), which owns it.

    scale: served step time / profiled forward time (engine overheads, a machine slower than when
    profiled); multiplies every served lookup. verify_premium: served cost of a step that
    verifies drafts / of a plain step of as many tokens, beyond the profile's slope (the draft gate
    charges it; None until learned, read as 1.0). Neither is saved with a profile."""

    scale: float = 1.0
    verify_premium: float | None = None


class ServedCost:
    """The cost curve policies and the draft gate price lengths with: a static
    :class:`CostProfile` times what was learned about the served engine (read-only here)."""

    def __init__(self, profile: CostProfile, learned: LearnedCost | None = None) -> None:
        self.profile = profile
        self.learned = learned if learned is not None else LearnedCost()

    @classmethod
    def of(cls, cost: "CostProfile | ServedCost") -> "ServedCost":
        return cost if isinstance(cost, ServedCost) else cls(cost)

    @property
    def max_tokens(self) -> int:
        return self.profile.max_tokens

    @property
    def scale(self) -> float:
        return self.learned.scale

    @property
    def verify_premium(self) -> float | None:
        return self.learned.verify_premium

    def forward_ms(self, num_tokens: int | np.ndarray, smooth: bool = True) -> np.ndarray | float:
        return self.profile.forward_ms(num_tokens, smooth)

    def step_time_ms(self, num_tokens: int | np.ndarray, smooth: bool = False) -> np.ndarray | float:
        """Served verification step time for ``num_tokens``: the profile times the learned scale."""
        out = self.learned.scale * np.asarray(self.profile.forward_ms(num_tokens, smooth))
        return float(out) if out.ndim == 0 else out

    def sps(self, num_tokens: int | np.ndarray, smooth: bool = False) -> np.ndarray | float:
        return 1000.0 / self.step_time_ms(num_tokens, smooth)


CostCurve = CostProfile | ServedCost  # what policies and the gate price with (same lookups)
