"""Random Fourier feature MMD^2: paired cos/sin features, streamed in chunks and optionally sharded.

z(x) = [cos(W^T x), sin(W^T x)] / sqrt(F) per bandwidth, with F = ``num_features`` frequencies per
bandwidth (so 2F outputs and ||z(x)||^2 = 1 exactly; several bandwidths concatenate blocks, giving
the sum of kernels). W is a dense (d, F) matrix (Gaussian or orthogonal rows) or, with
``orthogonal="structured"``, a :class:`~vfm_align.align.sorf.StructuredFrequencies` applied as fast
Hadamard-sign transforms; every function here takes either. MMD^2 needs only the column sums Sx,
Sy, which are accumulated chunk by chunk
(compensated float32 on the device within a chunk, float64 across chunks on the host), so a bank may be a
``np.memmap`` that never fits in memory. With a ``mesh`` the rows of each chunk are sharded over
all its devices through ``jax.shard_map`` and the partial sums are combined with ``psum``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vfm_align.align import sorf
from vfm_align.align.stream import read_rows
from vfm_align.errors import ConfigError, DataError

DEFAULT_CHUNK_ROWS = 1 << 15  # rows per host->device transfer
SUB_ROWS = 256  # rows per in-device step; keeps the (rows, F) angle block cache-sized
SORF_SUB_ROWS = 128  # the structured transform's intermediates are wider (measured best at d = 768)

# 2*pi split so that k * _TWO_PI_HI is exact in float32 for the multiples k that occur (Cody-Waite).
_TWO_PI_HI = np.float32(6.28125)
_TWO_PI_LO = np.float32(2 * np.pi - 6.28125)


def _fit_half_angle_polys(num_terms: int = 5) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Odd (sin) and even (cos) polynomial coefficients on |h| <= pi/2, least squares on Chebyshev nodes.

    Near-minimax: 5 terms each give |error| < 1e-7 in float64 after the double-angle step, as good as
    the float32 argument reduction, with 4 fewer multiply-adds per angle than 7-term Taylor series.
    """
    h = np.cos(np.pi * (np.arange(2000) + 0.5) / 2000) * (np.pi / 2)
    odd = np.stack([h ** (2 * i + 1) for i in range(num_terms)], 1)
    even = np.stack([h ** (2 * i) for i in range(num_terms)], 1)
    cs = np.linalg.lstsq(odd, np.sin(h), rcond=None)[0]
    cc = np.linalg.lstsq(even, np.cos(h), rcond=None)[0]
    return tuple(float(c) for c in cs), tuple(float(c) for c in cc)


_SIN_COEFS, _COS_COEFS = _fit_half_angle_polys()


def _horner(h2: jax.Array, coefs: tuple[float, ...]) -> jax.Array:
    acc = jnp.full_like(h2, coefs[-1])
    for c in coefs[-2::-1]:
        acc = acc * h2 + np.float32(c)
    return acc


def sincos(th: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of ``th`` in one pass: ~3x cheaper on CPU than jnp.cos + jnp.sin, max abs error < 1e-6.

    Reduce to r in [-pi, pi], evaluate sin and cos of h = r/2 by fitted polynomials (|h| <= pi/2),
    then cos r = 1 - 2 sin^2 h and sin r = 2 sin h cos h. Only multiply-adds, so XLA fuses it into
    the reduction that consumes it. Accurate for the |angles| < ~1e3 that random features produce.
    """
    k = jnp.round(th * np.float32(1.0 / (2.0 * np.pi)))
    h = ((th - k * _TWO_PI_HI) - k * _TWO_PI_LO) * 0.5
    h2 = h * h
    s = h * _horner(h2, _SIN_COEFS)
    c = _horner(h2, _COS_COEFS)
    return 1 - 2 * s * s, 2 * s * c


def _orthogonal_gaussian(rng: np.random.Generator, rows: int, d: int) -> np.ndarray:
    """Rows distributed like Gaussian rows but orthogonal within each block of d (Yu et al. 2016)."""
    blocks = []
    for _ in range(-(-rows // d)):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))[None, :]  # Haar-distributed
        norms = np.sqrt(rng.chisquare(d, size=d))
        blocks.append(q.T * norms[:, None])
    return np.concatenate(blocks, axis=0)[:rows]


def rff_frequencies(d: int, num_features: int, sigmas, *, kernel: str = "rbf", seed: int = 0,
                    orthogonal: bool | str = False):
    """Frequencies W for ``len(sigmas) * num_features`` angles, drawn on the host from ``seed``.

    rbf: w ~ N(0, I / sigma^2). laplacian (exp(-||x - y|| / sigma)): its spectral density is the
    multivariate Cauchy, w = g / (sigma |u|) with g ~ N(0, I), u ~ N(0, 1).
    orthogonal=False: i.i.d. Gaussian rows; True: orthogonal random features (rows orthogonal
    within blocks of d, chi(d) norms), both as a dense (d, K * F) float32 array.
    orthogonal="structured": SORF (:mod:`vfm_align.align.sorf`), far fewer multiply-adds per row.
    """
    if num_features < 1:
        raise ConfigError(f"num_features must be >= 1, got {num_features}")
    if kernel not in ("rbf", "laplacian"):
        raise ConfigError(f"unknown kernel '{kernel}' for random features")
    if not (isinstance(orthogonal, bool) or orthogonal == "structured"):
        raise ConfigError(f"orthogonal must be False, True or 'structured', got {orthogonal!r}")
    rng = np.random.default_rng(seed)
    sigmas = [float(s) for s in np.atleast_1d(np.asarray(sigmas, np.float64))]
    if orthogonal == "structured":
        return sorf.draw(rng, d, num_features, sigmas, cauchy=kernel == "laplacian")
    blocks = []
    for s in sigmas:
        g = _orthogonal_gaussian(rng, num_features, d) if orthogonal else rng.standard_normal((num_features, d))
        if kernel == "laplacian":
            g = g / np.abs(rng.standard_normal((num_features, 1)))
        blocks.append(g / s)
    return np.ascontiguousarray(np.concatenate(blocks, axis=0).T.astype(np.float32))


def num_angles(freqs) -> int:
    """Number of angles (frequencies over all bandwidths) of dense or structured frequencies."""
    return freqs.num_angles if isinstance(freqs, sorf.StructuredFrequencies) else freqs.shape[1]


def to_device(freqs, sharding=None):
    """Frequencies as device arrays (float32), optionally placed with ``sharding``."""
    if not isinstance(freqs, sorf.StructuredFrequencies):
        freqs = jnp.asarray(freqs, jnp.float32)
    return freqs if sharding is None else jax.device_put(freqs, sharding)


def angles(x: jax.Array, freqs) -> jax.Array:
    """x @ W for dense or structured frequencies: (rows, num_angles)."""
    if isinstance(freqs, sorf.StructuredFrequencies):
        return sorf.angles(x, freqs)
    return jnp.dot(x, freqs, precision=jax.lax.Precision.HIGHEST)


def _angle_sums(x: jax.Array, freqs) -> jax.Array:
    """[sum cos, sum sin] of the angles over the rows of x, (2 * num_angles,), fused with the trig."""
    if isinstance(freqs, sorf.StructuredFrequencies):
        c, s = sincos(sorf.angle_blocks(x, freqs))  # (blocks, a, rows, b)
        # One reduction over the rows of the stacked pair: 1.6x faster than two separate sums.
        return sorf.columns(jnp.stack([c, s]).sum(axis=3), freqs).reshape(-1)
    c, s = sincos(angles(x, freqs))
    # One reduction over the rows of the stacked pair, as above: XLA:CPU fuses the polynomial into a single
    # reduction, where two separate sums split it into several materialised (sub, F) passes (1.1x slower in
    # all at d = 768, F = 2048, bench_mmd.py part a).
    return jnp.stack([c, s]).sum(axis=1).reshape(-1)


def features(x: jax.Array, freqs, *, num_bandwidths: int = 1) -> jax.Array:
    """Per-row random features z(x) of shape (rows, 2 * num_angles); ||z(x)||^2 = num_bandwidths."""
    scale = 1.0 / np.sqrt(num_angles(freqs) // num_bandwidths)
    return jnp.concatenate(sincos(angles(x, freqs)), axis=-1) * scale


def _local_sums(x, freqs):
    """Unscaled [sum cos, sum sin] over the rows of x, float32, and an all-finite flag.

    Padding rows are zeros, whose angles are exactly 0: each adds exactly 1 to every cos sum and 0
    to the sin sums, so the caller subtracts the padding count instead of weighting every row.
    A non-finite input value makes every column sum NaN (its angles are inf or NaN for any
    non-zero frequency), so finiteness is read off the sums without another pass over x.
    """
    rows = x.shape[0]
    sub = min(SORF_SUB_ROWS if isinstance(freqs, sorf.StructuredFrequencies) else SUB_ROWS, rows)
    full = rows // sub

    def step(carry, i):
        # Slicing inside the loop rather than reshaping x: x may be a whole in-memory sample, not copied.
        # Compensated (Kahan) accumulation: a whole sample is thousands of blocks, and plain float32 sums
        # would lose digits with the block count.
        acc, comp = carry
        v = _angle_sums(jax.lax.dynamic_slice_in_dim(x, i * sub, sub), freqs) - comp
        t = acc + v
        return (t, (t - acc) - v), None

    zero = jnp.zeros((2 * num_angles(freqs),), jnp.float32)
    (acc, _), _ = jax.lax.scan(step, (zero, zero), jnp.arange(full))
    if rows > full * sub:  # a ragged tail (whole-array calls only): one shorter block
        acc = acc + _angle_sums(x[full * sub:], freqs)
    return acc, jnp.all(jnp.isfinite(acc))


@functools.cache
def _sums_fn(mesh):
    if mesh is None:
        return jax.jit(_local_sums)
    axes = tuple(mesh.axis_names)

    def sharded(x, freqs):
        acc, finite = _local_sums(x, freqs)
        acc = jax.lax.psum(acc, axes)
        finite = jax.lax.psum(finite.astype(jnp.int32), axes) == jax.lax.psum(1, axes)
        return acc, finite

    return jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P(axes, None), P()),
                                 out_specs=(P(), P()), check_vma=False))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def feature_sums(x, freqs, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, mesh=None, name: str = "x") -> np.ndarray:
    """Column sums of [cos(xW), sin(xW)] over all rows of ``x`` (array, memmap or jax array), float64.

    Streams ``chunk_rows`` rows at a time; the next chunk is read while the device works on the
    previous one (async dispatch). A jax array (already in memory, single device) is summed in one call.
    Raises DataError naming the row if a value is NaN or inf.
    """
    n = x.shape[0]
    ndev = 1 if mesh is None else mesh.devices.size
    # Balanced chunks: as many as chunk_rows asks for, all of one size (one compile) and padded
    # by less than SUB_ROWS * ndev rows in total. Fixed-size chunks would pad the last one to
    # full size, e.g. 100,000 rows in 32,768-row chunks computes 131,072 rows.
    num_chunks = max(1, -(-n // max(chunk_rows, 1)))
    step = _round_up(-(-n // num_chunks), SUB_ROWS * ndev)
    if mesh is None:
        put_x, f = jax.device_put, to_device(freqs)
    else:
        axes = tuple(mesh.axis_names)
        sx = NamedSharding(mesh, P(axes, None))
        put_x, f = (lambda a: jax.device_put(a, sx)), to_device(freqs, NamedSharding(mesh, P()))
    fn = _sums_fn(mesh)
    if mesh is None and isinstance(x, jax.Array) and n:
        # Already in memory: one call over all rows, no chunk copies or padding (10% of the time at n = 1e5).
        return _collect((fn(x.astype(jnp.float32), f), 0), x, n, name)
    acc = np.zeros(2 * num_angles(freqs), np.float64)
    pending = None
    for start in range(0, n, step):
        blk = read_rows(x, start, start + step)
        rows = blk.shape[0]
        if isinstance(blk, jax.Array):
            blk = jnp.pad(blk.astype(jnp.float32), ((0, step - rows), (0, 0)))
        else:
            if rows < step:
                blk = np.concatenate([blk, np.zeros((step - rows, blk.shape[1]), np.float32)])
        out = fn(put_x(blk), f)
        if pending is not None:
            acc += _collect(pending, x, step, name)
        pending = (out, start)
    acc += _collect(pending, x, step, name)
    padded = -(-n // step) * step - n
    acc[: num_angles(freqs)] -= padded  # the zero padding rows' cos = 1 (see _local_sums)
    return acc


def _collect(pending, x, step, name):
    (s, finite), start = pending
    if not bool(finite):  # rare path: locate the offending row on the host for the message
        block = read_rows(x, start, start + step)
        row = start + int(np.argmin(np.isfinite(block).all(axis=1)))
        raise DataError(f"{name}: non-finite feature value (NaN or inf) in row {row}")
    return np.asarray(s, np.float64)


def _combine(xx, yy, xy, n: int, m: int, k0: int, estimator: str):
    """MMD^2 from the (1/F-scaled) inner products of the feature sums; numpy or jax scalars."""
    if estimator == "unbiased":
        return (xx - n * k0) / (n * (n - 1)) + (yy - m * k0) / (m * (m - 1)) - 2.0 * xy / (n * m)
    if estimator == "biased":
        return xx / n**2 + yy / m**2 - 2.0 * xy / (n * m)
    raise ConfigError(f"estimator '{estimator}' is not available with random features (use 'unbiased' or 'biased')")


def mmd2_from_sums(sx, sy, n: int, m: int, *, k0: int, estimator: str = "unbiased",
                   num_features: int | None = None) -> float:
    """MMD^2 from unscaled feature sums. k0 = number of bandwidths; F = frequencies per bandwidth."""
    sx = np.asarray(sx, np.float64)
    sy = np.asarray(sy, np.float64)
    f = num_features if num_features is not None else sx.shape[-1] // (2 * k0)
    return float(_combine(sx @ sx / f, sy @ sy / f, sx @ sy / f, n, m, k0, estimator))


def rff_sums(x: jax.Array, freqs) -> jax.Array:
    """Jittable column sums [sum cos(xW), sum sin(xW)] over the rows of an in-memory ``x`` (float32)."""
    if isinstance(freqs, sorf.StructuredFrequencies):
        return _angle_sums(x, freqs)
    c, s = sincos(jnp.dot(x, freqs, precision=jax.lax.Precision.HIGHEST))
    # A ones-vector product, not jnp.sum(axis=0): XLA:CPU turns two such column reductions in one
    # jit into a slow fused loop (two 2048 x 512 blocks: 27 ms, against 4.5 ms this way).
    return jnp.dot(jnp.ones((x.shape[0],), jnp.float32), jnp.concatenate([c, s], axis=1),
                   precision=jax.lax.Precision.HIGHEST)


def rff_mmd2_from_sums(sx, sy, n: int, m: int, *, num_features: int, num_bandwidths: int = 1,
                       estimator: str = "unbiased"):
    """Jittable MMD^2 from :func:`rff_sums` of the two samples (one side may be computed once and reused)."""
    f = num_features
    return _combine(sx @ sx / f, sy @ sy / f, sx @ sy / f, n, m, num_bandwidths, estimator)


def rff_mmd2(x, y, freqs, *, num_bandwidths: int = 1, estimator: str = "unbiased"):
    """Jittable, differentiable RFF MMD^2 for training loops: arrays and fixed frequencies in, jax scalar out.

    ``freqs`` comes from :func:`rff_frequencies`; ``num_bandwidths`` is the number of sigmas it was drawn for.
    """
    f = num_angles(freqs) // num_bandwidths
    return rff_mmd2_from_sums(rff_sums(x, freqs), rff_sums(y, freqs), x.shape[0], y.shape[0], num_features=f,
                              num_bandwidths=num_bandwidths, estimator=estimator)
