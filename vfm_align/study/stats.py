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


def _pearson_rows(x, y) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y (NaN where a row is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc**2).sum(-1) * (yc**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (xc * yc).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def _spearman_rows(x, y) -> np.ndarray:
    return _pearson_rows(rankdata(x, axis=-1), rankdata(y, axis=-1))


def pearson(x, y) -> float:
    return float(_pearson_rows(np.asarray(x, np.float64), np.asarray(y, np.float64)))


def spearman(x, y) -> float:
    return float(_spearman_rows(np.asarray(x, np.float64), np.asarray(y, np.float64)))


_METHODS = {"pearson": _pearson_rows, "spearman": _spearman_rows}


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
    r = float(fn(x, y))
    rng = np.random.default_rng(seed)
    n = len(x)
    # Resamples and orderings are drawn one by one (the seeded stream of the original loop), then
    # correlated all at once along the rows.
    idx = np.stack([rng.integers(0, n, n) for _ in range(num_bootstrap)]) if num_bootstrap else np.zeros((0, n), int)
    boots = fn(x[idx], y[idx])
    boots = boots[np.isfinite(boots)]  # resamples with a constant column have no correlation
    alpha = (1.0 - confidence) / 2.0
    lo, hi = (np.quantile(boots, [alpha, 1.0 - alpha]) if len(boots) else (np.nan, np.nan))
    order = np.stack([rng.permutation(n) for _ in range(num_permutations)]) if num_permutations else np.zeros((0, n), int)
    perms = fn(np.broadcast_to(x, order.shape), y[order])
    p = (1.0 + np.sum(np.abs(perms) >= abs(r) - 1e-12)) / (1.0 + num_permutations)
    return Correlation(method, float(r), float(lo), float(hi), float(p), n, confidence, num_bootstrap, num_permutations)
