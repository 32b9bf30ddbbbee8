"""Random-feature MMD: convergence to the exact statistic, streaming from disk, sharding and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfm_align.align import (
    exact_mmd2,
    feature_sums,
    features,
    median_sigma,
    mmd,
    mmd2_from_sums,
    rff_frequencies,
    rff_mmd2,
)
from vfm_align.align.rff import sincos
from vfm_align.errors import DataError


@pytest.fixture(scope="module")
def shifted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    y = rng.standard_normal((400, 16)).astype(np.float32)
    y[:, 0] += 0.5
    return x, y


def test_sincos_matches_numpy():
    th = np.linspace(-300, 300, 200_001).astype(np.float32)
    c, s = jax.jit(sincos)(jnp.asarray(th))
    assert np.abs(np.asarray(c) - np.cos(th.astype(np.float64))).max() < 1e-6
    assert np.abs(np.asarray(s) - np.sin(th.astype(np.float64))).max() < 1e-6


def test_feature_inner_products_approximate_the_kernel():
    """z(x).z(y) -> exp(-|x-y|^2 / 2 sigma^2) and ||z(x)||^2 = number of bandwidths exactly (sin/cos pairs)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 5)).astype(np.float32)
    w = rff_frequencies(5, 20_000, [2.0, 4.0], seed=0)
    z = np.asarray(features(jnp.asarray(a), jnp.asarray(w), num_bandwidths=2), np.float64)
    np.testing.assert_allclose((z * z).sum(1), 2.0, atol=1e-4)
    d2 = ((a[:, None].astype(np.float64) - a[None]) ** 2).sum(-1)
    k = np.exp(-d2 / 8) + np.exp(-d2 / 32)
    assert np.abs(z @ z.T - k).max() < 0.05  # ~ sqrt(2 / 20000) per bandwidth, 5 sd margin


def _errors(x, y, sigma, sizes, seeds, orthogonal=False, kernel="rbf"):
    exact = exact_mmd2(x, y, [sigma], kernel=kernel)
    out = []
    for f in sizes:
        vals = np.array([mmd(x, y, sigma=sigma, method="rff", num_features=f, seed=s, orthogonal=orthogonal,
                             kernel=kernel)
                         for s in range(seeds)])
        out.append(np.sqrt(np.mean((vals - exact) ** 2)))
    return exact, np.array(out)


def test_rff_converges_to_exact_at_one_over_sqrt_d(shifted):
    x, y = shifted
    sigma = median_sigma(x, y)
    sizes = [64, 256, 1024, 4096]
    exact, err = _errors(x, y, sigma, sizes, seeds=12)
    slope = np.polyfit(np.log(sizes), np.log(err), 1)[0]
    assert -0.85 < slope < -0.3, (slope, err)  # theory: -0.5
    assert err[-1] < 0.03 * exact, (err, exact)
    # Orthogonal random features: markedly lower error at the same D.
    _, err_orf = _errors(x, y, sigma, [256], seeds=12, orthogonal=True)
    assert err_orf[0] < 0.7 * err[1], (err_orf, err)


def test_laplacian_rff_matches_exact(shifted):
    x, y = shifted
    exact, err = _errors(x, y, 4.0, [4096], seeds=4, kernel="laplacian")
    assert err[0] < 0.05 * exact, (err, exact)


def test_biased_rff_matches_exact_v_statistic(shifted):
    x, y = shifted
    v = exact_mmd2(x, y, [4.0], estimator="biased")
    vals = [mmd(x, y, sigma=4.0, method="rff", estimator="biased", num_features=4096, seed=s) for s in range(4)]
    assert abs(np.mean(vals) - v) < 0.03 * v


def test_streaming_from_memmap_equals_in_memory(tmp_path, shifted):
    x, y = shifted
    path = tmp_path / "x.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    bank = np.load(path, mmap_mode="r")
    w = rff_frequencies(16, 512, [3.0], seed=1)
    whole = feature_sums(x, w)
    streamed = feature_sums(bank, w, chunk_rows=100)  # chunks round up to 256 rows: 2 chunks, the last padded
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-3)
    # And against float64 numpy.
    th = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(whole, np.concatenate([np.cos(th).sum(0), np.sin(th).sum(0)]), atol=2e-3)
    got = mmd(bank, y, sigma=3.0, method="rff", num_features=512, seed=1, chunk_rows=100)
    assert abs(got - mmd(x, y, sigma=3.0, method="rff", num_features=512, seed=1)) < 1e-7


def test_jax_array_in_one_call_equals_float64_and_reports_bad_row(shifted):
    # A jax array takes one device call over all rows: 400 = one 256-row block and a 144-row tail, no padding.
    x, _ = shifted
    w = rff_frequencies(16, 512, [3.0], seed=1)
    th = x.astype(np.float64) @ w.astype(np.float64)
    got = feature_sums(jnp.asarray(x), w)
    np.testing.assert_allclose(got, np.concatenate([np.cos(th).sum(0), np.sin(th).sum(0)]), rtol=0, atol=2e-3)
    bad = x.copy()
    bad[350, 3] = np.nan  # in the tail block
    with pytest.raises(DataError, match="row 350"):
        feature_sums(jnp.asarray(bad), w)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_streaming_reports_non_finite_row(tmp_path, shifted, value):
    x, y = shifted
    bad = x.copy()
    bad[301, 2] = value
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match="row 301"):
        mmd(np.load(tmp_path / "bad.npy", mmap_mode="r"), y, sigma=1.0, method="rff", chunk_rows=256)


def test_functional_form_matches_streamed(shifted):
    x, y = shifted
    w = rff_frequencies(16, 256, [2.0, 5.0], seed=4)
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(lambda a, b: rff_mmd2(a, b, jnp.asarray(w), num_bandwidths=2))
        got = float(fn(jnp.asarray(x), jnp.asarray(y)))
    want = mmd2_from_sums(feature_sums(x, w), feature_sums(y, w), len(x), len(y), k0=2)
    assert abs(got - want) < 2e-5


def test_deterministic_and_sharded_equals_single_device(shifted):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest")
    x, y = shifted
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    kw = dict(sigma="median", method="rff", num_features=1024, seed=7)
    one = mmd(x, y, **kw)
    assert mmd(x, y, **kw) == one  # same seed, same device: bit-identical
    sharded = mmd(x, y, mesh=mesh, chunk_rows=1024, **kw)
    assert abs(sharded - one) < 1e-6 + 1e-4 * abs(one), (sharded, one)
    assert mmd(x, y, mesh=mesh, chunk_rows=1024, **kw) == sharded
    # Sharded streaming over several chunks (2048-row steps on 8 devices) of a bigger bank.
    rng = np.random.default_rng(5)
    big = rng.standard_normal((5000, 16)).astype(np.float32)
    w = rff_frequencies(16, 256, [4.0], seed=0)
    np.testing.assert_allclose(feature_sums(big, w, mesh=mesh, chunk_rows=2048), feature_sums(big, w),
                               atol=2e-2, rtol=1e-5)
    assert mmd(x, y, seed=8, method="rff", num_features=1024) != one  # a different seed draws other frequencies
