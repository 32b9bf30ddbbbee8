"""Exact MMD^2 against a plain-numpy float64 reference, the median heuristic, the jittable form and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfm_align.align import median_sigma, mmd, mmd_fn
from vfm_align.errors import ConfigError, DataError


def _gram(a, b, sigmas, kernel):
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    if kernel == "rbf":
        return sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)
    return sum(np.exp(-np.sqrt(d2) / s) for s in sigmas)


def ref_mmd2(x, y, sigmas, kernel="rbf", estimator="unbiased"):
    """Textbook estimators (Gretton et al. 2012) from full Gram matrices in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n, m = len(x), len(y)
    if estimator == "linear":
        h = n // 2
        x1, x2, y1, y2 = x[0:2 * h:2], x[1:2 * h:2], y[0:2 * h:2], y[1:2 * h:2]
        k = lambda a, b: np.diag(_gram(a, b, sigmas, kernel))  # noqa: E731
        return float(np.mean(k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)))
    kxx, kyy, kxy = _gram(x, x, sigmas, kernel), _gram(y, y, sigmas, kernel), _gram(x, y, sigmas, kernel)
    if estimator == "biased":
        return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


@pytest.fixture(scope="module")
def banks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    y = (rng.standard_normal((130, 12)) * 1.1 + 0.2).astype(np.float32)
    return x, y


@pytest.mark.parametrize("kernel", ["rbf", "laplacian"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("sigma", [3.0, [1.5, 3.0, 6.0]])
def test_exact_matches_numpy(banks, kernel, estimator, sigma):
    x, y = banks
    sig = sigma if isinstance(sigma, list) else [sigma]
    want = ref_mmd2(x, y, sig, kernel, estimator)
    # block=64: several tiles per Gram block, a padded last tile, and mirrored off-diagonal tiles.
    got = mmd(x, y, kernel=kernel, sigma=sigma, estimator=estimator, block=64)
    assert abs(got - want) <= 1e-6 + 1e-4 * abs(want), (got, want)


def test_single_tile_equals_many_tiles(banks):
    x, y = banks
    want = ref_mmd2(x, y, [3.0])
    assert abs(mmd(x, y, sigma=3.0, block=1024) - want) <= 1e-6 + 1e-4 * abs(want)


def test_linear_estimator_matches_numpy(banks):
    x, y = banks
    x, y = x[:120], y[:120]
    for kernel in ("rbf", "laplacian"):
        want = ref_mmd2(x, y, [2.5], kernel, "linear")
        got = mmd(x, y, kernel=kernel, sigma=2.5, estimator="linear")
        assert abs(got - want) <= 1e-6, (kernel, got, want)


def test_u_and_v_differ_by_the_diagonal(banks):
    """With k(x, x) = 1: V - U = (1 - mean off-diagonal Kxx)/n + (1 - mean off-diagonal Kyy)/m (alignment.md §4)."""
    x, y = banks
    u = mmd(x, y, sigma=3.0, estimator="unbiased")
    v = mmd(x, y, sigma=3.0, estimator="biased")
    n, m = len(x), len(y)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    kxx, kyy = _gram(x64, x64, [3.0], "rbf"), _gram(y64, y64, [3.0], "rbf")
    offx = (kxx.sum() - n) / (n * (n - 1))
    offy = (kyy.sum() - m) / (m * (m - 1))
    assert abs((v - u) - ((1 - offx) / n + (1 - offy) / m)) < 1e-6


def test_median_heuristic_convention(banks):
    x, y = banks
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    med = np.median(d2[~np.eye(len(z), dtype=bool)])  # off-diagonal pairs of the pooled sample
    assert abs(median_sigma(x, y) - np.sqrt(med / 2)) < 1e-9 * np.sqrt(med)
    # alibi-detect's form: k = exp(-d^2 / median d^2); mmd(sigma="median") uses exactly that kernel.
    want = ref_mmd2(x, y, [np.sqrt(med / 2)])
    assert abs(mmd(x, y) - want) <= 1e-6 + 1e-4 * abs(want)


def test_median_heuristic_subsample_is_seeded_and_close():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1800, 8)).astype(np.float32)
    y = rng.standard_normal((1500, 8)).astype(np.float32)
    s0, s0b, s1 = median_sigma(x, y, seed=0), median_sigma(x, y, seed=0), median_sigma(x, y, seed=1)
    assert s0 == s0b and s0 != s1  # 3300 > 2000 pooled rows: a seeded subsample
    # Population value for standard normals: d^2 ~ 2 chi^2_8, so sigma^2 = median(chi^2_8).
    from scipy.stats import chi2

    assert abs(s0 - np.sqrt(chi2.median(8))) < 0.03 * np.sqrt(chi2.median(8))


def test_jittable_functional_form(banks):
    x, y = (jnp.asarray(a) for a in banks)
    with jax.default_matmul_precision("highest"):
        f = jax.jit(lambda a, b, s: mmd_fn(a, b, s, block=64))
        got = float(f(x, y, jnp.array([2.0, 4.0])))
        want = ref_mmd2(np.asarray(x), np.asarray(y), [2.0, 4.0])
        assert abs(got - want) <= 1e-5, (got, want)
        # Gradients flow (small banks: one tile, so the compile stays cheap).
        xs, ys, s3 = x[:40], y[:40], jnp.array([3.0])
        g = jax.jit(jax.grad(lambda a: mmd_fn(a, ys, s3, block=64)))(xs)
        assert g.shape == xs.shape and bool(jnp.all(jnp.isfinite(g)))
        # Moving x against the gradient lowers the discrepancy: the gradient points the right way.
        step = xs - 0.05 * g / jnp.linalg.norm(g)
        assert ref_mmd2(np.asarray(step), np.asarray(ys), [3.0]) < ref_mmd2(np.asarray(xs), np.asarray(ys), [3.0])


def test_bad_input_raises_data_error(banks):
    x, y = banks
    with pytest.raises(DataError, match="different widths"):
        mmd(x, y[:, :5])
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(DataError, match="row 7"):
        mmd(bad, y, sigma=1.0)
    bad[7, 3] = np.inf
    with pytest.raises(DataError, match="row 7"):
        mmd(bad, y, sigma=1.0, method="rff")
    with pytest.raises(DataError, match="empty"):
        mmd(x[:0], y)
    with pytest.raises(DataError, match="at least 2"):
        mmd(x[:1], y, sigma=1.0)
    with pytest.raises(DataError, match="equal size"):
        mmd(x, y, estimator="linear", sigma=1.0)
    with pytest.raises(ConfigError):
        mmd(x, y, kernel="cosine")
    with pytest.raises(DataError, match="median"):
        mmd(np.ones((5, 3), np.float32), np.ones((5, 3), np.float32))
    # V-statistic is defined for a single row.
    assert np.isfinite(mmd(x[:1], y, sigma=1.0, estimator="biased"))
