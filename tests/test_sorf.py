"""Structured orthogonal random features: the fast transform against explicit numpy Hadamard products,
exact orthogonality, convergence to the exact MMD, and every consumer (streaming, sharding,
permutation tests, the jittable form, the score command)."""

import json

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
    mmd_test,
    rff,
    rff_frequencies,
    rff_mmd2,
)
from vfm_align.errors import ConfigError


def _hadamard_by_definition(p):
    """H[i, j] = (-1)^popcount(i & j) / sqrt(p): Sylvester's matrix written from its closed form."""
    i = np.arange(p)
    bits = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return (-1.0) ** bits / np.sqrt(p)


def _numpy_frequencies(sf):
    """The dense (d, K * F) matrix the structured frequencies stand for, built with explicit diagonals."""
    p = sf.a * sf.b
    h = _hadamard_by_definition(p)
    d1, d2 = np.asarray(sf.signs, np.float64).reshape(2, p)
    d3 = np.asarray(sf.block_signs, np.float64).reshape(-1, p)
    sc = np.asarray(sf.scales, np.float64).reshape(-1, p)
    blocks = [(np.diag(sc[k]) @ h @ np.diag(d3[k]) @ h @ np.diag(d2) @ h @ np.diag(d1))[:, :sf.d]
              for k in range(len(d3))]
    nb = sf.blocks_per_bandwidth
    rows = [np.concatenate(blocks[i * nb:(i + 1) * nb])[:sf.num_features] for i in range(sf.num_bandwidths)]
    return np.concatenate(rows).T


@pytest.mark.parametrize("d,f,kernel", [(20, 70, "rbf"), (768, 2048, "rbf"), (5, 9, "laplacian")])
def test_structured_angles_equal_explicit_hadamard_products(d, f, kernel):
    sf = rff_frequencies(d, f, [2.0, 3.0], kernel=kernel, orthogonal="structured", seed=1)
    w = _numpy_frequencies(sf)
    assert w.shape == (d, 2 * f) and rff.num_angles(sf) == 2 * f
    x = np.random.default_rng(0).standard_normal((37, d))
    got = np.asarray(rff.angles(jnp.asarray(x, jnp.float32), sf), np.float64)
    want = x @ w
    assert np.abs(got - want).max() < 2e-6 * np.abs(want).max()


def test_structured_rows_are_orthogonal_with_chi_norms():
    """With d = p, each block's rows are exactly orthogonal; their norms are the chi(p)/sigma scales."""
    sf = rff_frequencies(64, 128, [2.0], orthogonal="structured", seed=3)
    w = _numpy_frequencies(sf).T  # (128, 64): two blocks of 64 rows
    for blk in (w[:64], w[64:]):
        g = blk @ blk.T
        np.testing.assert_allclose(g - np.diag(np.diag(g)), 0.0, atol=1e-9)
    norms = np.linalg.norm(w, axis=1) * 2.0  # times sigma: chi(64) samples
    assert abs(norms.mean() - np.sqrt(64 - 0.5)) < 0.3 and 0.1 < norms.std() < 1.4  # chi(64): mean ~7.97, sd ~0.71


@pytest.fixture(scope="module")
def shifted64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 64)).astype(np.float32)
    y = rng.standard_normal((400, 64)).astype(np.float32)
    y[:, 0] += 1.0
    return x, y


def _rmse(x, y, sigma, f, orthogonal, seeds=12, kernel="rbf"):
    exact = exact_mmd2(x, y, [sigma], kernel=kernel)
    vals = np.array([mmd(x, y, sigma=sigma, method="rff", num_features=f, seed=s, orthogonal=orthogonal, kernel=kernel)
                     for s in range(seeds)])
    return exact, np.sqrt(np.mean((vals - exact) ** 2))


def test_structured_features_converge_to_exact_mmd_like_orthogonal_features(shifted64):
    x, y = shifted64
    sigma = median_sigma(x, y)
    exact, err_sorf = _rmse(x, y, sigma, 256, "structured")
    _, err_gauss = _rmse(x, y, sigma, 256, False)
    _, err_orf = _rmse(x, y, sigma, 256, True)
    assert err_sorf < 0.6 * err_gauss, (err_sorf, err_gauss)  # orthogonality's variance reduction
    assert err_sorf < 2.0 * err_orf, (err_sorf, err_orf)
    _, err_big = _rmse(x, y, sigma, 4096, "structured", seeds=6)
    assert err_big < 0.6 * err_sorf and err_big < 0.02 * exact, (err_big, err_sorf, exact)


def test_structured_laplacian_matches_exact(shifted64):
    x, y = shifted64
    exact, err = _rmse(x, y, 8.0, 4096, "structured", seeds=4, kernel="laplacian")
    assert err < 0.05 * exact, (err, exact)


def test_structured_kernel_approximation_at_full_width():
    """z(x).z(y) ~ k(x, y) at d = 768, two bandwidths, ||z||^2 exactly the number of bandwidths."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((5, 768)).astype(np.float32)
    a[1] = a[0] + 0.02 * rng.standard_normal(768)  # a near pair: kernel values spread over (0, 2)
    sigmas = [20.0, 40.0]
    sf = rff_frequencies(768, 16_384, sigmas, orthogonal="structured", seed=0)
    z = np.asarray(features(jnp.asarray(a), sf, num_bandwidths=2), np.float64)
    np.testing.assert_allclose((z * z).sum(1), 2.0, atol=1e-4)
    d2 = ((a[:, None].astype(np.float64) - a[None]) ** 2).sum(-1)
    k = sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)
    assert np.abs(z @ z.T - k).max() < 0.04  # ~ sqrt(2 / 16384) per bandwidth, with a wide margin


def test_structured_streams_shards_and_tests_consistently(tmp_path, shifted64):
    x, y = shifted64
    sf = rff_frequencies(64, 512, [6.0, 9.0], orthogonal="structured", seed=2)
    whole = feature_sums(x, sf)
    th = x.astype(np.float64) @ _numpy_frequencies(sf)
    np.testing.assert_allclose(whole, np.concatenate([np.cos(th).sum(0), np.sin(th).sum(0)]), atol=2e-3)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_allclose(feature_sums(np.load(tmp_path / "x.npy", mmap_mode="r"), sf, chunk_rows=100), whole,
                               atol=1e-3)
    want = mmd2_from_sums(whole, feature_sums(y, sf), 400, 400, k0=2)
    got = float(jax.jit(lambda a, b: rff_mmd2(a, b, sf, num_bandwidths=2))(jnp.asarray(x), jnp.asarray(y)))
    assert abs(got - want) < 2e-5
    kw = dict(sigma=7.0, method="rff", num_features=512, seed=5, orthogonal="structured")
    stat = mmd(x, y, **kw)
    for paired in (False, True):
        r = mmd_test(x, y, 49, paired=paired, **kw)
        assert abs(r.statistic - stat) < 1e-6 and r.p_value == pytest.approx(0.02)  # a clear shift
    if jax.device_count() >= 8:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
        assert abs(mmd(x, y, mesh=mesh, chunk_rows=1024, **kw) - stat) < 1e-6


def test_bad_orthogonal_value_is_refused():
    with pytest.raises(ConfigError, match="orthogonal"):
        rff_frequencies(8, 16, [1.0], orthogonal="sorf")


def test_score_command_with_structured_frequencies(tmp_path):
    from vfm_align.cli import main

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = (x + 0.3 * rng.standard_normal((300, 8)) + np.eye(8)[0] * 0.4).astype(np.float32)
    np.save(tmp_path / "before.npy", x)
    np.save(tmp_path / "after.npy", y)
    assert main(["score", "--before-bank", str(tmp_path / "before.npy"), "--after-bank", str(tmp_path / "after.npy"),
                 "--frequencies", "structured", "--num-features", "512", "--permutations", "19",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    r = json.loads((tmp_path / "out" / "score.json").read_text())
    assert r["frequencies"] == "structured"
    want = mmd(x, y, sigma=median_sigma(x, None), method="rff", num_features=512, orthogonal="structured")
    assert abs(r["mmd2"] - want) < 1e-9
    assert r["mmd2"] != mmd(x, y, sigma=median_sigma(x, None), method="rff", num_features=512)
