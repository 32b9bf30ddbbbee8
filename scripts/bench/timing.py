"""The one timing loop the benchmarks share: wall-clock samples of an already-compiled call.

``fn`` must block until its result is ready (``jax.block_until_ready`` / a torch call), so a
sample measures the work and not the async dispatch.
"""

import time

import numpy as np


def sample_times(fn, reps: int) -> np.ndarray:
    """``reps`` wall-clock times (s) of ``fn()``."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)
