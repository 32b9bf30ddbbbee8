"""Reading row chunks from (possibly memory-mapped) banks without letting resident memory grow.

Pages of a read-only memmap stay mapped (and counted in RSS) after being read; for a bank larger
than RAM that would push out everything else. ``read_rows`` copies a chunk to ordinary memory and
then tells the kernel, via madvise(MADV_DONTNEED), that the mapped pages of that chunk are no
longer needed, so streaming a 3 GB bank keeps RSS at about one chunk. ``gather_rows`` does the same
for scattered rows (a subsample): with large page-cache folios one faulted row can map megabytes of
its neighbours, so 2,000 random rows of two 3 GB banks otherwise left ~3 GB resident.
"""

from __future__ import annotations

import mmap

import numpy as np


def _base_memmap(a):
    while a is not None and not isinstance(getattr(a, "_mmap", None), mmap.mmap):
        a = getattr(a, "base", None)
        if not isinstance(a, np.ndarray):
            return None
    return a


def read_rows(bank, start: int, stop: int) -> np.ndarray:
    """bank[start:stop] as a float32 array in ordinary memory (a jax array is returned as is)."""
    blk = bank[start:stop]
    if not isinstance(blk, np.ndarray):  # jax arrays and other array types: no paging to manage
        return blk
    out = np.array(blk, dtype=np.float32, copy=True)
    base = _base_memmap(bank)
    if base is not None and bank.flags.c_contiguous and blk.size:
        _drop_pages(base, blk)
    return out


def gather_rows(bank, rows: np.ndarray, *, group: int = 64) -> np.ndarray:
    """bank[rows] (an integer index array) in ordinary memory, leaving no mapped pages resident.

    Rows are read ``group`` at a time and the mapping's pages dropped after each group, so the
    transient footprint stays at a few groups' folios rather than the whole bank.
    """
    base = _base_memmap(bank) if isinstance(bank, np.ndarray) else None
    if base is None:
        return np.array(bank[rows], copy=True)
    rows = np.asarray(rows)
    out = np.empty((len(rows),) + tuple(bank.shape[1:]), bank.dtype)
    for i in range(0, len(rows), group):
        out[i: i + group] = bank[rows[i: i + group]]
        _madvise_dontneed(base._mmap, 0, len(base._mmap))
    return out


def _drop_pages(base, blk) -> None:
    mm = base._mmap
    # Byte range of blk inside the mapping: offset of blk's data from the mapped region's start.
    region_start = base.__array_interface__["data"][0] - (base.offset % mmap.ALLOCATIONGRANULARITY)
    lo = blk.__array_interface__["data"][0] - region_start
    hi = lo + blk.nbytes
    page = mmap.PAGESIZE
    lo = (lo // page) * page
    _madvise_dontneed(mm, lo, min(hi, len(mm)) - lo)


def _madvise_dontneed(mm: mmap.mmap, start: int, length: int) -> None:
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, length)
    except (AttributeError, ValueError, OSError):  # platform without madvise: pages are simply kept
        pass
