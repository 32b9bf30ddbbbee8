"""Time of each transferability score on 10,000 x 768 features (run: python scripts/bench/bench_transferability.py).

Features: 3 Gaussian classes (plus an offset) in float32, the size of a released ProFound/ProViCNet pooled bank
of 10,000 cases. Each score is called through its public function (validation, the jitted float32 pass over the
rows, the jitted float64 d x d step, the result back on the host). The first call is reported apart (it
compiles); the figure is the median of the next calls, interleaved with the bare X^T X (HIGHEST precision) that
every score needs, as a side-by-side reference. On a shared machine expect noise: read the ratios.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times

from vfm_align import align


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, a.rows)
    x = (rng.normal(size=(3, a.width))[labels] + rng.normal(size=(a.rows, a.width)) + 0.5).astype(np.float32)
    xj = jnp.asarray(x)
    gram = jax.jit(lambda v: jnp.dot(v.T, v, precision=jax.lax.Precision.HIGHEST))
    fns = {
        "X^T X (reference)": lambda: jax.block_until_ready(gram(xj)),
        "logme": lambda: align.logme(x, labels),
        "hscore": lambda: align.hscore(x, labels),
        "transrate": lambda: align.transrate(x, labels),
        "rankme": lambda: align.rankme(x),
    }
    model = platform.processor() or platform.machine()
    if platform.system() == "Linux":
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    print(f"{a.rows} x {a.width} float32, 3 classes; jax {jax.__version__} on {jax.default_backend()} ({model}, "
          f"{jax.device_count()} device(s))")
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    # CPU time of this process beside the wall time: on a shared machine the wall time also counts the waits for
    # a core; the CPU time does not, but it also counts the XLA thread pool's spinning, so read both with care.
    cpu = {}
    for name, fn in fns.items():
        c0 = time.process_time()
        for _ in range(a.reps):
            fn()
        cpu[name] = (time.process_time() - c0) / a.reps
    times = interleaved_times(fns, a.reps)
    ref = float(np.median(times["X^T X (reference)"]))
    print(f"{'score':<20}{'first call (s)':>16}{'median wall (s)':>17}{'x X^T X':>9}{'CPU (s)':>9}")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:<20}{first[name]:>16.3f}{med:>17.3f}{med / ref:>9.1f}{cpu[name]:>9.3f}")


if __name__ == "__main__":
    main()
