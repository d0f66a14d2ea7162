"""Goodness-of-fit helper for the distribution tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.stats import chi2


def chi_square_pvalue(samples: list, exact: dict, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of ``samples`` against the exact distribution ``exact``.

    Outcomes whose expected count is below ``min_expected`` are pooled into one bin (including
    outcomes with zero exact probability, so an impossible sample drives the p-value to 0)."""
    n = len(samples)
    counts = Counter(samples)
    big = [o for o, p in exact.items() if p * n >= min_expected]
    obs = [counts.get(o, 0) for o in big]
    exp = [exact[o] * n for o in big]
    rest_obs = n - sum(obs)
    rest_exp = n - sum(exp)
    if rest_exp >= 1e-9:
        obs.append(rest_obs)
        exp.append(rest_exp)
    elif rest_obs > 0:
        return 0.0
    obs_a, exp_a = np.array(obs, float), np.array(exp, float)
    stat = float(((obs_a - exp_a) ** 2 / exp_a).sum())
    return float(chi2.sf(stat, df=max(len(obs) - 1, 1)))
