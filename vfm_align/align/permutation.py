"""Permutation two-sample tests for MMD^2: pooled shuffles or within-pair swaps, p = (1 + #{T_perm >= T}) / (1 + P).

Random features (default): a permuted statistic needs only the permuted feature sums, so each
chunk of rows contributes one GEMM, (P x rows assignment matrix) @ (rows x 2F features); no Gram
matrix and no recomputation of features. A uniformly random n-subset of the pooled N rows is drawn
chunk by chunk: the number of X rows falling in each chunk is hypergeometric (numpy, seeded) and
the rows within the chunk are a uniform subset of that size (numpy row shuffles, seeded), which is exactly
the distribution of a full shuffle while keeping memory O(P * (chunk + F)).

Exact (small banks only): the pooled Gram matrix K is built once and every permuted statistic is
a quadratic form a^T K a, batched as one (N x N) @ (N x P) GEMM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vfm_align.align import rff
from vfm_align.align.kernels import check_kernel, kernel_from_sq_dists, resolve_sigmas, sq_dists
from vfm_align.align.mmd import check_estimator
from vfm_align.align.stream import read_rows
from vfm_align.align.validate import check_pair
from vfm_align.errors import ConfigError, DataError

PERM_CHUNK_ROWS = 4096
EXACT_MAX_POOLED = 8192


@dataclasses.dataclass(frozen=True)
class TestResult:
    """Outcome of :func:`mmd_test`; ``null`` holds the permuted statistics."""

    statistic: float
    p_value: float
    null: np.ndarray
    num_permutations: int
    paired: bool
    method: str
    estimator: str
    sigmas: tuple
    n: int
    m: int


def p_value(statistic: float, null: np.ndarray) -> float:
    """(1 + #{T_perm >= T}) / (1 + P): never zero, valid at any P (Phipson and Smyth 2010)."""
    null = np.asarray(null)
    return float((1 + np.count_nonzero(null >= statistic)) / (1 + null.size))


def _stat_from_sums(sx, sy, n, m, k0, f, estimator):
    """Vectorised MMD^2 over rows of unscaled feature sums (float64)."""
    xx = np.einsum("...i,...i->...", sx, sx) / f
    yy = np.einsum("...i,...i->...", sy, sy) / f
    xy = np.einsum("...i,...i->...", sx, sy) / f
    if estimator == "unbiased":
        return (xx - n * k0) / (n * (n - 1)) + (yy - m * k0) / (m * (m - 1)) - 2.0 * xy / (n * m)
    return xx / n**2 + yy / m**2 - 2.0 * xy / (n * m)


def _raw_features(x, freqs):
    return jnp.concatenate(rff.sincos(rff.angles(x, freqs)), axis=-1)


@jax.jit
def _pooled_chunk(x, valid, freqs, assign):
    """Feature sums of the valid rows, and per permutation the sum over its assigned rows (one GEMM)."""
    z = _raw_features(x, freqs) * valid[:, None]
    a = assign.astype(jnp.float32)
    return z.sum(0), jnp.dot(a, z, precision=jax.lax.Precision.HIGHEST), jnp.all(jnp.isfinite(x))


def _subset_rows(rng: np.random.Generator, counts: np.ndarray, size: int, rows: int) -> np.ndarray:
    """(P, rows) uint8: row p marks a uniform random subset of counts[p] of the first ``size`` rows.

    numpy shuffles each row in place (Fisher-Yates, O(P * rows)); far cheaper than a sort on the device.
    """
    mask = np.zeros((len(counts), rows), np.uint8)
    mask[:, :size] = np.arange(size)[None, :] < counts[:, None]
    mask[:, :size] = rng.permuted(mask[:, :size], axis=1)
    return mask


@functools.partial(jax.jit, static_argnames=("num_perm",))
def _paired_chunk(x, y, valid, freqs, key, num_perm):
    """Feature sums of x and y, and per permutation the sum of z(y_i) - z(x_i) over swapped pairs."""
    zx = _raw_features(x, freqs) * valid[:, None]
    zy = _raw_features(y, freqs) * valid[:, None]
    swap = jax.random.bernoulli(key, 0.5, (num_perm, x.shape[0])).astype(jnp.float32)
    delta = jnp.dot(swap, zy - zx, precision=jax.lax.Precision.HIGHEST)
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))
    return zx.sum(0), zy.sum(0), delta, finite


def _chunk(bank, start, rows):
    blk = np.asarray(read_rows(bank, start, start + rows), np.float32)
    valid = np.zeros(rows, np.float32)
    valid[:len(blk)] = 1.0
    if len(blk) < rows:
        blk = np.concatenate([blk, np.zeros((rows - len(blk), blk.shape[1]), np.float32)])
    return blk, valid


def _rff_null(x, y, freqs, num_perm, paired, seed, chunk_rows):
    """Observed sums (float64) and the P permuted X-sums (float64, P x 2F)."""
    n, m = len(x), len(y)
    key = jax.random.key(seed)
    f_dev = rff.to_device(freqs)
    width = 2 * rff.num_angles(freqs)
    sx, sy = np.zeros(width), np.zeros(width)
    if paired:
        delta = np.zeros((num_perm, width))
        rows = min(chunk_rows, n)
        for c, start in enumerate(range(0, n, rows)):
            bx, valid = _chunk(x, start, rows)
            by, _ = _chunk(y, start, rows)
            zx, zy, d, ok = _paired_chunk(bx, by, valid, f_dev, jax.random.fold_in(key, c), num_perm=num_perm)
            if not bool(ok):
                raise DataError(f"non-finite feature value (NaN or inf) in pairs starting at row {start}")
            sx += np.asarray(zx, np.float64)
            sy += np.asarray(zy, np.float64)
            delta += np.asarray(d, np.float64)
        return sx, sy, sx[None, :] + delta
    rng = np.random.default_rng(seed)
    left_x = np.full(num_perm, n, np.int64)  # X slots still to fill, per permutation
    left = n + m
    perm_sx = np.zeros((num_perm, width))
    pending = None

    def collect(p):
        (s, a, ok), name, start, acc = p
        if not bool(ok):
            raise DataError(f"{name}: non-finite feature value (NaN or inf) in rows starting at {start}")
        acc += np.asarray(s, np.float64)
        perm_sx[...] += np.asarray(a, np.float64)

    for bank, name, acc in ((x, "x", sx), (y, "y", sy)):
        rows = min(chunk_rows, len(bank))
        for start in range(0, len(bank), rows):
            # Host work for this chunk (read, draw assignments) overlaps the device's previous chunk.
            blk, valid = _chunk(bank, start, rows)
            size = int(valid.sum())
            counts = rng.hypergeometric(left_x, left - left_x, size) if left > size else left_x.copy()
            left_x -= counts
            left -= size
            out = _pooled_chunk(blk, valid, f_dev, _subset_rows(rng, counts, size, rows))
            if pending is not None:
                collect(pending)
            pending = (out, name, start, acc)
    collect(pending)
    return sx, sy, perm_sx


@functools.partial(jax.jit, static_argnames=("kernel",))
def _pooled_gram(z, sigmas, kernel):
    return kernel_from_sq_dists(sq_dists(z, z), sigmas, kernel)


def _exact_null(x, y, sigmas, kernel, estimator, num_perm, paired, seed):
    n, m = len(x), len(y)
    if n + m > EXACT_MAX_POOLED:
        raise ConfigError(f"exact permutation test needs the pooled Gram matrix; {n + m} rows exceed "
                          f"{EXACT_MAX_POOLED}: use method='rff'")
    z = jnp.asarray(np.concatenate([np.asarray(x, np.float32), np.asarray(y, np.float32)]))
    kmat = np.asarray(_pooled_gram(z, jnp.asarray(np.asarray(sigmas, np.float32)), kernel), np.float64)
    rng = np.random.default_rng(seed)
    a = np.zeros((num_perm + 1, n + m))
    a[0, :n] = 1.0  # row 0: the observed assignment
    for p in range(1, num_perm + 1):
        if paired:
            swap = rng.random(n) < 0.5
            a[p, :n] = ~swap
            a[p, n:] = swap
        else:
            a[p, rng.permutation(n + m)[:n]] = 1.0
    ka = kmat @ a.T  # (N, P+1)
    k0 = len(sigmas)
    total = kmat.sum()
    sxx_full = np.einsum("np,pn->p", ka, a)
    sx_row = ka.sum(0)  # sum_i,j a_j K_ij = 1^T K a
    sxy = sx_row - sxx_full
    syy_full = total - 2 * sx_row + sxx_full
    sxx, syy = sxx_full - n * k0, syy_full - m * k0
    if estimator == "unbiased":
        stats = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    else:
        stats = (sxx + n * k0) / n**2 + (syy + m * k0) / m**2 - 2 * sxy / (n * m)
    return float(stats[0]), stats[1:]


def mmd_test(x, y, num_permutations: int = 1000, paired: bool = False, *, kernel: str = "rbf", sigma="median",
             estimator: str = "unbiased", method: str = "rff", num_features: int = 2048, seed: int = 0,
             orthogonal: bool | str = False, chunk_rows: int = PERM_CHUNK_ROWS) -> TestResult:
    """Permutation test of P = Q with the MMD^2 statistic.

    paired=False shuffles the pooled sample (valid for independent banks). paired=True needs n == m
    and swaps x_i <-> y_i independently with probability 1/2 (valid for before/after features of
    the same inputs, under the null that each pair is exchangeable). The bandwidth is fitted once
    on the unpermuted pooled sample and kept fixed across permutations.
    """
    check_kernel(kernel)
    if num_permutations < 1:
        raise ConfigError(f"num_permutations must be >= 1, got {num_permutations}")
    if estimator not in ("unbiased", "biased"):
        raise ConfigError(f"mmd_test supports the 'unbiased' and 'biased' estimators, not '{estimator}'")
    check_pair(x, y, check_finite=False)
    check_estimator(estimator, len(x), len(y))
    if paired and len(x) != len(y):
        raise DataError(
            f"paired test needs banks of equal size (row i of x pairs with row i of y), got {len(x)} and {len(y)}")
    n, m = len(x), len(y)
    sigmas = resolve_sigmas(sigma, x, y, seed=seed)
    if method == "exact":
        check_pair(x, y)
        stat, null = _exact_null(x, y, sigmas, kernel, estimator, num_permutations, paired, seed)
    elif method == "rff":
        freqs = rff.rff_frequencies(x.shape[1], num_features, sigmas, kernel=kernel, seed=seed, orthogonal=orthogonal)
        sx, sy, perm_sx = _rff_null(x, y, freqs, num_permutations, paired, seed, chunk_rows)
        k0, f = len(sigmas), num_features
        stat = float(_stat_from_sums(sx, sy, n, m, k0, f, estimator))
        null = _stat_from_sums(perm_sx, (sx + sy)[None, :] - perm_sx, n, m, k0, f, estimator)
    else:
        raise ConfigError(f"unknown method '{method}'; expected 'rff' or 'exact'")
    return TestResult(statistic=stat, p_value=p_value(stat, null), null=np.asarray(null),
                      num_permutations=num_permutations, paired=paired, method=method, estimator=estimator,
                      sigmas=tuple(sigmas), n=n, m=m)
