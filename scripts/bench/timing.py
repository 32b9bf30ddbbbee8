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


def interleaved_times(fns: dict, reps: int) -> dict[str, np.ndarray]:
    """``reps`` wall-clock times of each of several calls, taken in turn (A B A B ...).

    On a shared or frequency-scaling CPU the machine's speed drifts over a minute; timing one
    implementation after the other puts that drift into the ratio, alternating spreads it evenly.
    """
    out = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {name: np.asarray(ts) for name, ts in out.items()}
