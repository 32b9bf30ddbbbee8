"""Reading rows from memory-mapped banks: same values as numpy indexing, and no mapped pages left resident."""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from vfm_align.align.stream import gather_rows, read_rows


def _resident_kb(path: Path) -> int:
    """Rss of this process's mappings of ``path``, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.fixture()
def bank(tmp_path):
    path = tmp_path / "bank.npy"
    data = np.random.default_rng(0).standard_normal((20_000, 96)).astype(np.float32)
    np.save(path, data)
    return path, data


def test_rows_match_numpy_indexing(bank):
    path, data = bank
    mm = np.load(path, mmap_mode="r")
    rows = np.sort(np.random.default_rng(1).choice(len(data), 700, replace=False))
    np.testing.assert_array_equal(gather_rows(mm, rows), data[rows])
    np.testing.assert_array_equal(gather_rows(mm[5000:], rows[rows < 15_000]), data[5000:][rows[rows < 15_000]])
    np.testing.assert_array_equal(gather_rows(jnp.asarray(data), rows), data[rows])
    np.testing.assert_array_equal(read_rows(mm, 1234, 9876), data[1234:9876])


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_no_mapped_pages_stay_resident(bank):
    path, data = bank
    rows = np.arange(0, len(data), 37)
    mm = np.load(path, mmap_mode="r")
    _ = np.array(mm[rows])  # plain fancy indexing: the pages it touched stay mapped
    assert _resident_kb(path) > 0
    del mm, _
    mm = np.load(path, mmap_mode="r")
    gather_rows(mm, rows)
    assert _resident_kb(path) == 0
    read_rows(mm, 0, len(data))
    assert _resident_kb(path) == 0
