"""Paired measures between before/after banks of the same inputs: linear CKA and per-row drift.

Linear CKA (Kornblith et al. 2019), feature form:
    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),  Xc, Yc column-centred.
It is streamed: per chunk the products X^T X, Y^T Y, Y^T X and column sums are computed on the
device (float32, highest precision) and accumulated on the host in float64; centring happens at
the end (Xc^T Yc = X^T Y - n mu_x mu_y^T). Rows are shifted by the first chunk's means before the
products, which keeps the final centring free of catastrophic cancellation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vfm_align.align.stream import read_rows
from vfm_align.align.validate import check_pair
from vfm_align.errors import DataError

CHUNK_ROWS = 1 << 14


@jax.jit
def _chunk_stats(x, y, x_shift, y_shift):
    hi = jax.lax.Precision.HIGHEST
    xs, ys = x - x_shift, y - y_shift
    xx = jnp.dot(xs.T, xs, precision=hi)
    yy = jnp.dot(ys.T, ys, precision=hi)
    yx = jnp.dot(ys.T, xs, precision=hi)
    # Drift on the raw rows: cosine similarity and L2 distance of each pair.
    dot = jnp.sum(x * y, axis=1)
    nx, ny = jnp.linalg.norm(x, axis=1), jnp.linalg.norm(y, axis=1)
    cos = dot / jnp.maximum(nx * ny, 1e-12)
    l2 = jnp.linalg.norm(x - y, axis=1)
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))
    return xx, yy, yx, xs.sum(0), ys.sum(0), cos.sum(), l2.sum(), finite


@dataclasses.dataclass
class PairedAccumulator:
    """Streams paired rows (x_i, y_i) and reports linear CKA and drift; ``update`` may be called per chunk."""

    n: int = 0
    _acc: list | None = None
    _shift: tuple | None = None

    def update(self, x, y) -> None:
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.float32)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"paired measures need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = (x.mean(0), y.mean(0))
        out = _chunk_stats(x, y, *self._shift)
        if not bool(out[-1]):
            raise DataError(f"non-finite feature value (NaN or inf) in paired rows {self.n}..{self.n + len(x) - 1}")
        vals = [np.asarray(v, np.float64) for v in out[:-1]]
        self._acc = vals if self._acc is None else [a + v for a, v in zip(self._acc, vals)]
        self.n += x.shape[0]

    def cka(self) -> float:
        if self.n < 2:
            raise DataError(f"linear CKA needs at least 2 paired rows, got {self.n}")
        xx, yy, yx, sx, sy = self._acc[:5]
        n = self.n
        cxx = xx - np.outer(sx, sx) / n
        cyy = yy - np.outer(sy, sy) / n
        cyx = yx - np.outer(sy, sx) / n
        den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        if den <= 0:
            raise DataError("linear CKA undefined: a bank is constant (zero variance)")
        return float(np.sum(cyx * cyx) / den)

    def drift(self) -> dict:
        if self.n < 1:
            raise DataError("drift needs at least one paired row")
        return {"mean_cosine": float(self._acc[5] / self.n), "mean_l2": float(self._acc[6] / self.n)}


def _accumulate(x, y, chunk_rows: int) -> PairedAccumulator:
    check_pair(x, y, names=("before", "after"), check_finite=False)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"paired measures need banks of the same length (row i of each from the same input), "
                        f"got {x.shape[0]} and {y.shape[0]}")
    acc = PairedAccumulator()
    for start in range(0, x.shape[0], chunk_rows):
        acc.update(read_rows(x, start, start + chunk_rows), read_rows(y, start, start + chunk_rows))
    return acc


def linear_cka(x, y, *, chunk_rows: int = CHUNK_ROWS) -> float:
    """Linear CKA of paired banks x, y (n, d); 1 = identical up to rotation and isotropic scale."""
    return _accumulate(x, y, chunk_rows).cka()


def paired_drift(x, y, *, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Mean cosine similarity and mean L2 distance between paired rows x_i, y_i (same width)."""
    return _accumulate(x, y, chunk_rows).drift()


def paired_measures(x, y, *, chunk_rows: int = CHUNK_ROWS) -> dict:
    """CKA and drift in one streamed pass: {'cka', 'mean_cosine', 'mean_l2', 'n'}."""
    acc = _accumulate(x, y, chunk_rows)
    return {"cka": acc.cka(), **acc.drift(), "n": acc.n}


def linear_cka_jax(x: jax.Array, y: jax.Array) -> jax.Array:
    """Jittable in-memory linear CKA (float32, for training loops), feature form:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    hi = jax.lax.Precision.HIGHEST
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    cross = jnp.sum(jnp.square(jnp.dot(yc.T, xc, precision=hi)))
    nx = jnp.linalg.norm(jnp.dot(xc.T, xc, precision=hi))
    ny = jnp.linalg.norm(jnp.dot(yc.T, yc, precision=hi))
    return cross / (nx * ny)
