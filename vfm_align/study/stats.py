"""Correlation statistics for the study: Pearson and Spearman with bootstrap intervals and permutation p-values.

With ten (backbone, task) pairs, asymptotic formulas are unreliable, so intervals come from a
percentile bootstrap over pairs and p-values from permuting one variable (exact enumeration is
10! = 3.6 M orderings; a seeded Monte-Carlo of 10,000 is used and its p-value never reaches 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

from vfm_align.errors import DataError


def pearson(x, y) -> float:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc**2).sum() * (yc**2).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def spearman(x, y) -> float:
    return pearson(rankdata(x), rankdata(y))


_METHODS = {"pearson": pearson, "spearman": spearman}


@dataclass
class Correlation:
    method: str
    r: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    confidence: float
    num_bootstrap: int
    num_permutations: int

    def to_dict(self) -> dict:
        return asdict(self)


def correlate(x, y, *, method: str = "spearman", confidence: float = 0.95, num_bootstrap: int = 5000,
              num_permutations: int = 10000, seed: int = 0) -> Correlation:
    """Correlation of paired values with a percentile bootstrap CI and a two-sided permutation p-value."""
    if method not in _METHODS:
        raise DataError(f"unknown correlation method '{method}'; use one of {sorted(_METHODS)}")
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise DataError(f"correlate needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise DataError(f"correlate needs at least 3 pairs, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("correlate: NaN/inf among the values")
    fn = _METHODS[method]
    r = fn(x, y)
    rng = np.random.default_rng(seed)
    n = len(x)
    boots = []
    for _ in range(num_bootstrap):
        idx = rng.integers(0, n, n)
        b = fn(x[idx], y[idx])
        if np.isfinite(b):  # resamples with a constant column have no correlation
            boots.append(b)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = (np.quantile(boots, [alpha, 1.0 - alpha]) if boots else (np.nan, np.nan))
    perms = np.array([fn(x, rng.permutation(y)) for _ in range(num_permutations)])
    p = (1.0 + np.sum(np.abs(perms) >= abs(r) - 1e-12)) / (1.0 + num_permutations)
    return Correlation(method, float(r), float(lo), float(hi), float(p), n, confidence, num_bootstrap, num_permutations)
