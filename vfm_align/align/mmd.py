"""Exact MMD^2 by tiled Gram sums (memory O(block^2), never O(n^2)), and the public ``mmd`` entry point.

The Gram matrices are visited tile by tile with ``lax.map``; Kxx and Kyy only over their upper
triangle of tiles (off-diagonal tiles counted twice), which halves their cost. Diagonal entries are
excluded explicitly and added back as k(0) = number of kernels, so the U- and V-statistics differ
exactly by their diagonal terms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vfm_align.align.kernels import check_kernel, kernel_from_sq_dists, resolve_sigmas, sq_dists
from vfm_align.align.validate import check_pair
from vfm_align.errors import ConfigError, DataError

ESTIMATORS = ("unbiased", "biased", "linear")
METHODS = ("exact", "rff")
DEFAULT_BLOCK = 1024


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _tile_plan(nb_a: int, nb_b: int, symmetric: bool):
    """Tile index pairs, their weights (2 for mirrored off-diagonal tiles) and diagonal flags."""
    if symmetric:
        ii, jj = np.triu_indices(nb_a)
    else:
        ii, jj = (g.ravel() for g in np.meshgrid(np.arange(nb_a), np.arange(nb_b), indexing="ij"))
    w = np.where(ii == jj, 1.0, 2.0) if symmetric else np.ones(len(ii))
    diag = (ii == jj) if symmetric else np.zeros(len(ii), bool)
    return ii.astype(np.int32), jj.astype(np.int32), w.astype(np.float32), diag


def _tile_sums(a, na, b, nb, sigmas, *, kernel: str, block: int, symmetric: bool):
    """Per-tile sums of k(a_i, b_j) over valid rows; on a symmetric pass the diagonal i == j is excluded.

    ``a`` and ``b`` are zero-padded to a multiple of ``block`` rows; ``na``/``nb`` are the true counts.
    """
    nba, nbb = a.shape[0] // block, b.shape[0] // block
    ii, jj, w, diag = _tile_plan(nba, nbb, symmetric)
    a_sq = jnp.sum(a * a, axis=1)
    b_sq = jnp.sum(b * b, axis=1)
    rows = jnp.arange(block)
    eye = rows[:, None] == rows[None, :]

    def tile(args):
        i, j, wt, is_diag = args
        ai = jax.lax.dynamic_slice_in_dim(a, i * block, block)
        bj = jax.lax.dynamic_slice_in_dim(b, j * block, block)
        ai_sq = jax.lax.dynamic_slice_in_dim(a_sq, i * block, block)
        bj_sq = jax.lax.dynamic_slice_in_dim(b_sq, j * block, block)
        k = kernel_from_sq_dists(sq_dists(ai, bj, ai_sq, bj_sq), sigmas, kernel)
        valid = ((i * block + rows) < na)[:, None] & ((j * block + rows) < nb)[None, :]
        valid = valid & ~(is_diag & eye)
        return wt * jnp.sum(jnp.where(valid, k, 0.0))

    return jax.lax.map(tile, (jnp.asarray(ii), jnp.asarray(jj), jnp.asarray(w), jnp.asarray(diag)))


@functools.partial(jax.jit, static_argnames=("kernel", "block"))
def _exact_tile_sums(x, y, sigmas, *, kernel: str, block: int):
    n, m = x.shape[0], y.shape[0]
    xp = jnp.pad(x, ((0, _round_up(n, block) - n), (0, 0)))
    yp = jnp.pad(y, ((0, _round_up(m, block) - m), (0, 0)))
    sxx = _tile_sums(xp, n, xp, n, sigmas, kernel=kernel, block=block, symmetric=True)
    syy = _tile_sums(yp, m, yp, m, sigmas, kernel=kernel, block=block, symmetric=True)
    sxy = _tile_sums(xp, n, yp, m, sigmas, kernel=kernel, block=block, symmetric=False)
    return sxx, syy, sxy


def _combine(sxx, syy, sxy, n, m, k0, estimator):
    """MMD^2 from off-diagonal Gram sums; k0 = k(x, x) (= number of kernels)."""
    if estimator == "unbiased":
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)
    return (sxx + n * k0) / (n * n) + (syy + m * k0) / (m * m) - 2.0 * sxy / (n * m)


def mmd_fn(x, y, sigmas, *, kernel: str = "rbf", estimator: str = "unbiased", block: int = DEFAULT_BLOCK):
    """Jittable exact MMD^2 for training loops: arrays in, fixed bandwidths (1-D array), jax scalar out.

    Tiled like :func:`mmd`; sums are float32 (use :func:`mmd` for float64 host accumulation).
    Differentiable with respect to x and y.
    """
    sigmas = jnp.atleast_1d(jnp.asarray(sigmas, jnp.float32))
    if estimator == "linear":
        return _linear_mmd2(x, y, sigmas, kernel)
    block = min(block, _round_up(max(x.shape[0], y.shape[0]), 8))
    sxx, syy, sxy = _exact_tile_sums(x, y, sigmas, kernel=kernel, block=block)
    return _combine(sxx.sum(), syy.sum(), sxy.sum(), x.shape[0], y.shape[0], sigmas.shape[0], estimator)


def _pair_kernel(a, b, sigmas, kernel):
    d2 = jnp.maximum(jnp.sum((a - b) ** 2, axis=1), 0.0)
    return kernel_from_sq_dists(d2, sigmas, kernel)


@functools.partial(jax.jit, static_argnames=("kernel",))
def _linear_mmd2(x, y, sigmas, kernel):
    """Linear-time estimate: mean over disjoint pairs (2i, 2i+1) of k(x,x') + k(y,y') - k(x,y') - k(x',y)."""
    h = x.shape[0] // 2
    x1, x2, y1, y2 = x[0:2 * h:2], x[1:2 * h:2], y[0:2 * h:2], y[1:2 * h:2]
    terms = (_pair_kernel(x1, x2, sigmas, kernel) + _pair_kernel(y1, y2, sigmas, kernel)
             - _pair_kernel(x1, y2, sigmas, kernel) - _pair_kernel(x2, y1, sigmas, kernel))
    return jnp.mean(terms)


def check_estimator(estimator: str, n: int, m: int, names=("x", "y")) -> None:
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{estimator}'; expected one of {', '.join(ESTIMATORS)}")
    if estimator in ("unbiased", "linear") and min(n, m) < 2:
        raise DataError(f"the {estimator} estimator needs at least 2 rows per bank, got {names[0]}={n}, {names[1]}={m}")
    if estimator == "linear" and n != m:
        raise DataError(f"the linear estimator needs banks of equal size, got {names[0]}={n} and {names[1]}={m}")


def exact_mmd2(x, y, sigmas, *, kernel: str = "rbf", estimator: str = "unbiased", block: int = DEFAULT_BLOCK) -> float:
    """Exact MMD^2 with float64 accumulation of the per-tile sums (inputs already validated)."""
    sig = jnp.asarray(np.asarray(sigmas, np.float32))
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if estimator == "linear":
        return float(_linear_mmd2(x, y, sig, kernel))
    n, m = x.shape[0], y.shape[0]
    block = min(block, _round_up(max(n, m), 8))
    sxx, syy, sxy = (np.asarray(s, np.float64).sum() for s in _exact_tile_sums(x, y, sig, kernel=kernel, block=block))
    return float(_combine(sxx, syy, sxy, n, m, len(sigmas), estimator))


def mmd(x, y, *, kernel: str = "rbf", sigma="median", estimator: str = "unbiased", method: str = "exact",
        num_features: int = 4096, seed: int = 0, orthogonal: bool | str = False, block: int = DEFAULT_BLOCK,
        mesh=None, chunk_rows: int | None = None) -> float:
    """MMD^2 between feature banks ``x`` (n, d) and ``y`` (m, d), as a Python float.

    kernel: "rbf" or "laplacian". sigma: "median" (sigma^2 = median pooled d^2 / 2), a float, or a
    list (sum of kernels). estimator: "unbiased" (U), "biased" (V) or "linear" (n == m, exact only).
    method: "exact" (tiled Gram sums) or "rff" (``num_features`` random frequencies, cos and sin
    each; ``seed`` fixes them; ``orthogonal=True`` for orthogonal random features, "structured" for
    SORF (as accurate, several times faster at large widths); streams memmapped
    banks in ``chunk_rows`` chunks and shards rows over ``mesh`` when given).
    """
    check_kernel(kernel)
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")
    check_pair(x, y, check_finite=False)
    check_estimator(estimator, len(x), len(y))
    if method == "rff" and estimator == "linear":
        raise ConfigError("the linear estimator is exact-only; random features are already linear-time")
    if method == "exact":
        check_pair(x, y)
        sigmas = resolve_sigmas(sigma, x, y, seed=seed)
        return exact_mmd2(x, y, sigmas, kernel=kernel, estimator=estimator, block=block)
    from vfm_align.align import rff

    # The streaming pass checks finiteness chunk by chunk.
    sigmas = resolve_sigmas(sigma, x, y, seed=seed)
    freqs = rff.rff_frequencies(x.shape[1], num_features, sigmas, kernel=kernel, seed=seed, orthogonal=orthogonal)
    kw = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    sx = rff.feature_sums(x, freqs, mesh=mesh, name="x", **kw)
    sy = rff.feature_sums(y, freqs, mesh=mesh, name="y", **kw)
    return rff.mmd2_from_sums(sx, sy, len(x), len(y), k0=len(sigmas), estimator=estimator)
