"""Linear CKA against the Gram (HSIC) form in numpy, its invariances, streaming, and paired drift."""

import numpy as np
import pytest

from vfm_align.align import PairedAccumulator, linear_cka, paired_drift, paired_measures
from vfm_align.errors import DataError


def ref_cka(x, y):
    """Kornblith et al. 2019: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    y = (x @ rng.standard_normal((24, 24)) * 0.3 + rng.standard_normal((300, 24))).astype(np.float32)
    return x, y


def test_matches_gram_form(pair):
    x, y = pair
    assert abs(linear_cka(x, y) - ref_cka(x, y)) < 1e-6


def test_streamed_equals_one_pass_and_survives_a_large_offset(pair):
    x, y = pair
    assert abs(linear_cka(x, y, chunk_rows=37) - linear_cka(x, y)) < 1e-6
    # Features far from the origin: naive float32 centring would cancel catastrophically.
    xo, yo = x + 1000.0, y - 500.0
    assert abs(linear_cka(xo, yo, chunk_rows=64) - ref_cka(xo.astype(np.float64), yo.astype(np.float64))) < 1e-4


def test_invariances(pair):
    x, _ = pair
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((24, 24)))
    assert abs(linear_cka(x, (x @ q * 3.0 + 2.0).astype(np.float32)) - 1.0) < 1e-6  # rotation, scale, shift
    independent = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    assert linear_cka(x, independent) < 0.15


def test_paired_drift_matches_numpy(pair):
    x, y = pair
    d = paired_drift(x, y, chunk_rows=50)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    cos = (x64 * y64).sum(1) / np.linalg.norm(x64, axis=1) / np.linalg.norm(y64, axis=1)
    assert abs(d["mean_cosine"] - cos.mean()) < 1e-6
    assert abs(d["mean_l2"] - np.linalg.norm(x64 - y64, axis=1).mean()) < 1e-4
    both = paired_measures(x, y)
    assert both["n"] == 300 and abs(both["cka"] - ref_cka(x, y)) < 1e-6
    same = paired_drift(x, x)
    assert abs(same["mean_cosine"] - 1) < 1e-6 and same["mean_l2"] == 0.0


def test_accumulator_and_errors(pair):
    x, y = pair
    acc = PairedAccumulator()
    for s in range(0, 300, 100):
        acc.update(x[s:s + 100], y[s:s + 100])
    assert abs(acc.cka() - ref_cka(x, y)) < 1e-6
    with pytest.raises(DataError, match="same length"):
        linear_cka(x, y[:-1])
    with pytest.raises(DataError, match="different widths"):
        paired_drift(x, y[:, :3])
    bad = y.copy()
    bad[10, 0] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        linear_cka(x, bad)
    with pytest.raises(DataError, match="at least 2"):
        linear_cka(x[:1], y[:1])
    with pytest.raises(DataError, match="constant"):
        linear_cka(np.ones((5, 3), np.float32), y[:5, :3])


def test_jittable_cka_matches_streamed_float64():
    import jax

    from vfm_align.align.cka import linear_cka, linear_cka_jax

    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    y = (x @ rng.normal(size=(24, 24)) + 0.5 * rng.normal(size=(300, 24))).astype(np.float32)
    got = float(jax.jit(linear_cka_jax)(x, y))
    assert got == pytest.approx(linear_cka(x, y), rel=1e-4)
