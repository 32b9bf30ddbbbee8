"""Input checks shared by the alignment measures: bad banks raise DataError, never return a number."""

from __future__ import annotations

import numpy as np

from vfm_align.align.stream import read_rows
from vfm_align.errors import DataError

# Rows scanned at a time when checking a (possibly memory-mapped) bank for NaN/inf.
CHECK_CHUNK = 1 << 16


def check_pair(x, y, *, names=("x", "y"), min_rows: int = 1, check_finite: bool = True):
    """Validate two feature banks: 2-D, same width, at least ``min_rows`` rows each, finite values."""
    for arr, name in ((x, names[0]), (y, names[1])):
        shape = getattr(arr, "shape", None)
        if shape is None or len(shape) != 2:
            raise DataError(f"{name}: expected a 2-D feature bank (rows, width), got shape {shape}")
        if shape[0] < min_rows:
            what = "empty" if shape[0] == 0 else f"has {shape[0]} row(s)"
            raise DataError(f"{name}: bank {what}; need at least {min_rows}")
        if shape[1] == 0:
            raise DataError(f"{name}: bank has width 0")
    if x.shape[1] != y.shape[1]:
        raise DataError(f"{names[0]} and {names[1]} have different widths: {x.shape[1]} vs {y.shape[1]}")
    if check_finite:
        for arr, name in ((x, names[0]), (y, names[1])):
            check_finite_rows(arr, name)


def check_finite_rows(arr, name: str) -> None:
    """Raise DataError naming the first row holding NaN or inf; reads memmaps chunk by chunk."""
    for start in range(0, arr.shape[0], CHECK_CHUNK):
        block = np.asarray(read_rows(arr, start, start + CHECK_CHUNK))
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            row = start + int(np.argmin(ok))
            raise DataError(f"{name}: non-finite feature value (NaN or inf) in row {row}")
