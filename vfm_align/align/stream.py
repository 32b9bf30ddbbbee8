"""Reading row chunks from (possibly memory-mapped) banks without letting resident memory grow.

Pages of a read-only memmap stay mapped (and counted in RSS) after being read; for a bank larger
than RAM that would push out everything else. ``read_rows`` copies a chunk to ordinary memory and
then tells the kernel, via madvise(MADV_DONTNEED), that the mapped pages of that chunk are no
longer needed, so streaming a 3 GB bank keeps RSS at about one chunk.
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


def _drop_pages(base, blk) -> None:
    mm = base._mmap
    # Byte range of blk inside the mapping: offset of blk's data from the mapped region's start.
    region_start = base.__array_interface__["data"][0] - (base.offset % mmap.ALLOCATIONGRANULARITY)
    lo = blk.__array_interface__["data"][0] - region_start
    hi = lo + blk.nbytes
    page = mmap.PAGESIZE
    lo = (lo // page) * page
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(mm)) - lo)
    except (AttributeError, ValueError, OSError):  # platform without madvise: pages are simply kept
        pass
