"""Kernels, squared distances and the median-heuristic bandwidth shared by every MMD path.

Conventions (see README "Alignment scoring"):
  rbf        k(x, y) = exp(-||x - y||^2 / (2 sigma^2))
  laplacian  k(x, y) = exp(-||x - y|| / sigma)
A list of sigmas means the SUM of the kernels (so k(x, x) = len(sigmas)); divide the MMD^2 by
len(sigmas) for alibi-detect's mean convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vfm_align.align.stream import gather_rows
from vfm_align.errors import ConfigError, DataError

KERNELS = ("rbf", "laplacian")

# Points used for the median heuristic when the pooled sample is larger (seeded subsample).
MEDIAN_MAX_POINTS = 2000


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel '{kernel}'; expected one of {', '.join(KERNELS)}")
    return kernel


def sq_dists(a: jax.Array, b: jax.Array, a_sq: jax.Array | None = None, b_sq: jax.Array | None = None) -> jax.Array:
    """Pairwise squared Euclidean distances (rows of a vs rows of b), clamped at 0 (the expansion can dip below)."""
    if a_sq is None:
        a_sq = jnp.sum(a * a, axis=-1)
    if b_sq is None:
        b_sq = jnp.sum(b * b, axis=-1)
    ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * ab, 0.0)


def kernel_from_sq_dists(d2: jax.Array, sigmas: jax.Array, kernel: str) -> jax.Array:
    """Sum over the bandwidths in ``sigmas`` (a 1-D array) of the kernel evaluated at squared distances ``d2``."""
    out = jnp.zeros_like(d2)
    for u in range(sigmas.shape[0]):
        s = sigmas[u]
        if kernel == "rbf":
            out = out + jnp.exp(d2 * (-0.5 / (s * s)))
        else:
            out = out + jnp.exp(-jnp.sqrt(d2) / s)
    return out


def median_sigma(x, y=None, *, max_points: int = MEDIAN_MAX_POINTS, seed: int = 0) -> float:
    """Median-heuristic bandwidth, alibi-detect's convention: sigma^2 = median(d^2) / 2, so k = exp(-d^2 / median d^2).

    The median runs over the off-diagonal pairs of the pooled sample x ∪ y. Above ``max_points``
    pooled rows, a seeded uniform subsample of ``max_points`` rows (without replacement) is used.
    """
    pooled_n = len(x) + (0 if y is None else len(y))
    if pooled_n < 2:
        raise DataError(f"median heuristic needs at least 2 pooled samples, got {pooled_n}")
    rng = np.random.default_rng(seed)
    if pooled_n > max_points:
        idx = np.sort(rng.choice(pooled_n, size=max_points, replace=False))
    else:
        idx = np.arange(pooled_n)
    nx = len(x)
    ix, iy = idx[idx < nx], idx[idx >= nx] - nx
    parts = [np.asarray(gather_rows(x, ix), dtype=np.float64)]
    if y is not None and len(iy):
        parts.append(np.asarray(gather_rows(y, iy), dtype=np.float64))
    z = np.concatenate(parts, axis=0)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    med = float(np.median(d2[np.triu_indices(len(z), k=1)]))
    if not np.isfinite(med) or med <= 0.0:
        raise DataError(f"median heuristic failed: median squared distance is {med} (constant or non-finite features?)")
    return float(np.sqrt(med / 2.0))


def resolve_sigmas(sigma, x, y, *, seed: int = 0, max_points: int = MEDIAN_MAX_POINTS) -> tuple[float, ...]:
    """'median' -> the heuristic; a float -> itself; a list -> each entry (entries may be 'median')."""
    items: Sequence = sigma if isinstance(sigma, (list, tuple, np.ndarray)) else [sigma]
    if len(items) == 0:
        raise ConfigError("sigma list is empty")
    med = None
    out = []
    for s in items:
        if isinstance(s, str):
            if s != "median":
                raise ConfigError(f"sigma must be a positive number or 'median', got '{s}'")
            if med is None:
                med = median_sigma(x, y, max_points=max_points, seed=seed)
            out.append(med)
        else:
            s = float(s)
            if not np.isfinite(s) or s <= 0:
                raise ConfigError(f"sigma must be a positive number or 'median', got {s}")
            out.append(s)
    return tuple(out)
