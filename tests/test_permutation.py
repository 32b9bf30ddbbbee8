"""Permutation tests: level under the null (p-values ~ uniform), power under a small shift, paired swaps,
exact vs RFF."""

import numpy as np
import pytest
from scipy import stats

from vfm_align.align import exact_mmd2, mmd_test, p_value
from vfm_align.errors import ConfigError, DataError


def test_p_value_formula_worked_example():
    null = np.array([0.1, 0.5, 0.2, 0.7, 0.3])
    assert p_value(0.3, null) == (1 + 3) / 6  # 0.5, 0.7, 0.3 are >= 0.3
    assert p_value(1.0, null) == 1 / 6  # never zero
    assert p_value(-1.0, null) == 1.0


def _uniformity(pvals):
    pvals = np.asarray(pvals)
    return stats.kstest(pvals, "uniform").pvalue, np.mean(pvals <= 0.1)


@pytest.mark.parametrize("method", ["rff", "exact"])
def test_level_under_the_null(method):
    rng = np.random.default_rng(11)
    pvals = []
    for r in range(40):
        x = rng.standard_normal((40, 6)).astype(np.float32)
        y = rng.standard_normal((40, 6)).astype(np.float32)
        pvals.append(mmd_test(x, y, 99, method=method, num_features=256, seed=r, chunk_rows=64).p_value)
    ks, low = _uniformity(pvals)
    assert ks > 0.01, (ks, sorted(pvals))
    assert low < 0.25, low  # nominal 0.1; 40 draws: sd ~0.05


@pytest.mark.parametrize("method", ["rff", "exact"])
def test_power_under_a_small_shift(method):
    rng = np.random.default_rng(12)
    rejections = 0
    for r in range(10):
        x = rng.standard_normal((150, 6)).astype(np.float32)
        y = rng.standard_normal((150, 6)).astype(np.float32)
        y[:, 0] += 0.6
        rejections += mmd_test(x, y, 199, method=method, num_features=512, seed=r).p_value <= 0.05
    assert rejections >= 8, rejections


def test_paired_test_level_and_power():
    """Before/after banks of the same inputs: within-pair swaps hold the level; the pooled shuffle does not."""
    rng = np.random.default_rng(13)
    paired_p, pooled_p = [], []
    for r in range(30):
        base = rng.standard_normal((50, 6)).astype(np.float32)
        x = base + 0.3 * rng.standard_normal((50, 6)).astype(np.float32)
        y = base + 0.3 * rng.standard_normal((50, 6)).astype(np.float32)  # pairs exchangeable: null holds
        paired_p.append(mmd_test(x, y, 99, paired=True, num_features=256, seed=r, chunk_rows=64).p_value)
        pooled_p.append(mmd_test(x, y, 99, paired=False, num_features=256, seed=r, chunk_rows=64).p_value)
    ks, low = _uniformity(paired_p)
    assert ks > 0.01 and low < 0.3, (ks, low)
    # Pairing makes the pooled shuffle badly conservative here (p-values pile up near 1).
    assert _uniformity(pooled_p)[0] < 0.01 and np.median(pooled_p) > 0.8
    # Power: a small systematic shift of every "after" row.
    base = rng.standard_normal((150, 6)).astype(np.float32)
    x = base + 0.3 * rng.standard_normal((150, 6)).astype(np.float32)
    y = base + 0.3 * rng.standard_normal((150, 6)).astype(np.float32) + np.array([0.25, 0, 0, 0, 0, 0], np.float32)
    assert mmd_test(x, y, 199, paired=True, num_features=512).p_value <= 0.01
    assert mmd_test(x, y, 199, paired=True, method="exact").p_value <= 0.01


def test_exact_statistic_and_rff_agreement():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    y = (rng.standard_normal((100, 8)) + 0.3).astype(np.float32)
    ex = mmd_test(x, y, 50, method="exact", sigma=3.0)
    assert abs(ex.statistic - exact_mmd2(x, y, [3.0])) < 1e-6
    assert ex.null.shape == (50,) and ex.sigmas == (3.0,)
    rf = mmd_test(x, y, 50, method="rff", sigma=3.0, num_features=4096, chunk_rows=64)
    assert abs(rf.statistic - ex.statistic) < 0.1 * ex.statistic
    # Null distributions agree in scale (both centred near 0 for U).
    assert abs(np.mean(rf.null)) < 3 * np.std(ex.null) and 0.5 < np.std(rf.null) / np.std(ex.null) < 2
    # Deterministic for a seed.
    again = mmd_test(x, y, 50, method="rff", sigma=3.0, num_features=4096, chunk_rows=64)
    np.testing.assert_array_equal(again.null, rf.null)


def test_bad_input():
    y = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    with pytest.raises(DataError, match="equal size"):
        mmd_test(y, np.concatenate([y, y]), 10, paired=True, sigma=1.0)
    with pytest.raises(DataError, match="different widths"):
        mmd_test(y, y[:, :2], 10)
    with pytest.raises(ConfigError):
        mmd_test(y, y, 0)
    with pytest.raises(ConfigError):
        mmd_test(y, y, 10, estimator="linear")
    bad = y.copy()
    bad[5, 1] = np.inf
    with pytest.raises(DataError, match="non-finite"):
        mmd_test(bad, y, 10, sigma=1.0)
