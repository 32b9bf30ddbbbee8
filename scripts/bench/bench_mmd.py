"""Side-by-side timings of the alignment engine (run: python scripts/bench/bench_mmd.py [--parts abcd]).

(a) RFF MMD^2, n = m = 100,000, d = 768, 2,048 frequencies, vs the two feature matmuls it needs: written to
    fresh memory, and reduced in place (a max over each product, fused with the matmul: the roofline).
(b) RFF MMD^2 of 1,000,000 vs 1,000,000 rows (d = 768) streamed from .npy memmaps on disk: time, peak RSS,
    with structured orthogonal features (SORF) and, side by side, with dense Gaussian frequencies.
(c) exact unbiased MMD^2, n = m = 10,000, d = 768: tiled JAX vs a full-matrix PyTorch computation
    (torch.cdist on the pooled sample, alibi-detect style).
(d) a 1,000-permutation RFF test at n = m = 10,000, d = 768.

Each part runs in its own process so its peak RSS is its own. Compile time is reported apart;
timings are medians of repeated runs ending in block_until_ready. On a shared machine expect noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import machine
import numpy as np
from timing import interleaved_times, sample_times

D = 768


def _median_time(fn, reps):
    ts = sample_times(fn, reps)
    return float(np.median(ts))


def _median_cpu(fn, reps):
    """Process CPU seconds per call: less sensitive than wall time when other jobs share the cores."""
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return float(np.median(ts))


def part_a(reps=3):
    import jax
    import jax.numpy as jnp

    from vfm_align.align import feature_sums, mmd2_from_sums, rff_frequencies

    n, f = 100_000, 2048
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, D), jnp.float32)
    y = jax.random.normal(ky, (n, D), jnp.float32) + 0.01
    w = rff_frequencies(D, f, [np.sqrt(D)], seed=0)
    wd = jnp.asarray(w)
    hi = jax.lax.Precision.HIGHEST
    mm = jax.jit(lambda a, b: jnp.dot(a, b, precision=hi))
    # The true roofline: the same product reduced in place. XLA:CPU fuses dot + max into one kernel, so the
    # (n, F) product is never written out; a max (unlike a sum) cannot be rewritten as a smaller matmul.
    mm_max = jax.jit(lambda a, b: jnp.max(jnp.dot(a, b, precision=hi), axis=0))
    hlo = mm_max.lower(x, wd).compile().as_text()
    assert "dot(" in hlo, "XLA optimised the in-place baseline's matmul away"
    t0 = time.perf_counter()
    jax.block_until_ready(mm(x, wd))
    compile_mm = time.perf_counter() - t0
    jax.block_until_ready(mm_max(x, wd))

    def bare():
        jax.block_until_ready(mm(x, wd))
        jax.block_until_ready(mm(y, wd))

    def in_place():
        jax.block_until_ready(mm_max(x, wd))
        jax.block_until_ready(mm_max(y, wd))

    def rff():
        sx, sy = feature_sums(x, w), feature_sums(y, w)
        return mmd2_from_sums(sx, sy, n, n, k0=1)

    t0 = time.perf_counter()
    rff()
    first = time.perf_counter() - t0

    naive_fn = jax.jit(lambda a, b: jnp.concatenate([jnp.cos(jnp.dot(a, b, precision="highest")).sum(0),
                                                     jnp.sin(jnp.dot(a, b, precision="highest")).sum(0)]))
    jax.block_until_ready(naive_fn(x, wd))

    def naive():
        jax.block_until_ready(naive_fn(x, wd))
        jax.block_until_ready(naive_fn(y, wd))

    # Taken in turn (A B C D A B C D ...) so drift on a shared CPU spreads over all four.
    ts = interleaved_times({"bare": bare, "in_place": in_place, "rff": rff, "naive": naive}, reps)
    t_bare, t_in, t_rff, t_naive = (float(np.median(ts[k])) for k in ("bare", "in_place", "rff", "naive"))
    c_bare, c_in, c_rff = _median_cpu(bare, reps), _median_cpu(in_place, reps), _median_cpu(rff, reps)
    return {"part": "a", "bare_matmuls_s": t_bare, "in_place_matmuls_s": t_in, "rff_mmd_s": t_rff,
            "ratio_rff_over_bare": t_rff / t_bare, "ratio_rff_over_in_place": t_rff / t_in,
            "bare_matmuls_cpu_s": c_bare, "in_place_matmuls_cpu_s": c_in, "rff_mmd_cpu_s": c_rff,
            "cpu_ratio_rff_over_bare": c_rff / c_bare, "cpu_ratio_rff_over_in_place": c_rff / c_in,
            "naive_cos_sin_s": t_naive, "ratio_naive_over_bare": t_naive / t_bare,
            "first_call_incl_compile_s": first, "matmul_compile_s": compile_mm}


def _write_bank(path, n, seed, shift):
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    rng = np.random.default_rng(seed)
    step = 50_000
    for s in range(0, n, step):
        blk = rng.standard_normal((min(step, n - s), D), dtype=np.float32)
        blk[:, 0] += shift
        out[s:s + step] = blk
    out.flush()
    del out


def part_b(n=1_000_000):
    from vfm_align.align import mmd, open_bank

    d = os.environ.get("VFM_ALIGN_BENCH_DIR") or tempfile.mkdtemp(prefix="vfm_align_bench_")
    px, py = os.path.join(d, "x.npy"), os.path.join(d, "y.npy")
    t0 = time.perf_counter()
    for p, seed, shift in ((px, 1, 0.0), (py, 2, 0.05)):
        if not (os.path.exists(p) and np.load(p, mmap_mode="r").shape == (n, D)):
            # Written by a child process: dirty page-cache pages of the writer would count in our peak RSS.
            code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_mmd as b; " \
                   f"b._write_bank({p!r}, {n}, {seed}, {shift})"
            subprocess.run([sys.executable, "-c", code], check=True)
    t_write = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bx, by = open_bank(px).data, open_bank(py).data
    out = {"part": "b", "rows_each": n, "bank_write_s": t_write, "bank_bytes_each": n * D * 4,
           "rss_before_run_mb": rss_before}
    for label, orthogonal in (("structured", "structured"), ("gaussian", False)):
        kw = dict(method="rff", num_features=2048, orthogonal=orthogonal)
        # Warm-up compile on a small bank (same chunk shape), then the timed full run.
        t0 = time.perf_counter()
        mmd(bx[:40_000], by[:40_000], sigma=float(np.sqrt(D)), **kw)
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        val = mmd(bx, by, sigma="median", **kw)
        out[label] = {"mmd2": val, "time_s": time.perf_counter() - t0, "warmup_incl_compile_s": t_compile,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return out


def part_c(n=10_000, reps=2):
    import torch

    from vfm_align.align import exact_mmd2

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, D), dtype=np.float32)
    y = rng.standard_normal((n, D), dtype=np.float32) + 0.02
    sigma = float(np.sqrt(D))

    t0 = time.perf_counter()
    ours = exact_mmd2(x, y, [sigma])
    first = time.perf_counter() - t0
    t_ours = _median_time(lambda: exact_mmd2(x, y, [sigma]), reps)

    def torch_full():
        # alibi-detect's pytorch mmd2: pooled kernel matrix, U-statistic.
        with torch.inference_mode():
            z = torch.from_numpy(np.concatenate([x, y]))
            k = torch.exp(-torch.cdist(z, z) ** 2 / (2 * sigma ** 2))
            kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
            return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                         - 2 * kxy.mean())

    ref = torch_full()
    t_torch = _median_time(torch_full, reps)
    return {"part": "c", "n": n, "ours_s": t_ours, "torch_full_matrix_s": t_torch, "speedup": t_torch / t_ours,
            "ours_first_call_incl_compile_s": first, "ours_mmd2": ours, "torch_mmd2": ref,
            "ours_tile_bytes": 1024 * 1024 * 4, "torch_matrix_bytes": (2 * n) ** 2 * 4}


def part_d(n=10_000, perms=1000):
    from vfm_align.align import mmd_test

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, D), dtype=np.float32)
    y = rng.standard_normal((n, D), dtype=np.float32)
    y[:, 0] += 0.05
    t0 = time.perf_counter()
    mmd_test(x[:4096], y[:4096], perms, num_features=2048)  # compile the chunk function
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = mmd_test(x, y, perms, num_features=2048)
    t_run = time.perf_counter() - t0
    return {"part": "d", "n": n, "permutations": perms, "time_s": t_run, "p_value": r.p_value,
            "statistic": r.statistic, "warmup_incl_compile_s": t_compile}


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="abcd")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(PARTS[args.child]()))
        return
    import jax

    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__}, devices {jax.devices()}, cpus {os.cpu_count()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    for p in args.parts:
        out = subprocess.run([sys.executable, __file__, "--child", p], capture_output=True, text=True)
        if out.returncode:
            print(f"part {p} failed:\n{out.stderr[-3000:]}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res))
        if p == "a":
            print(f"(a) RFF MMD 100k vs 100k, d=768, 2048 freqs: {res['rff_mmd_s']:.2f} s vs matmuls written out "
                  f"{res['bare_matmuls_s']:.2f} s -> {res['ratio_rff_over_bare']:.2f}x, vs matmuls reduced in place "
                  f"{res['in_place_matmuls_s']:.2f} s -> {res['ratio_rff_over_in_place']:.2f}x (naive cos/sin: "
                  f"{res['ratio_naive_over_bare']:.2f}x of written out); CPU time "
                  f"{res['cpu_ratio_rff_over_bare']:.2f}x / {res['cpu_ratio_rff_over_in_place']:.2f}x")
        elif p == "b":
            st, ga = res["structured"], res["gaussian"]
            print(f"(b) 1M vs 1M from disk, 2048 freqs: structured {st['time_s']:.1f} s (MMD2 {st['mmd2']:.3e}) vs "
                  f"Gaussian {ga['time_s']:.1f} s (MMD2 {ga['mmd2']:.3e}) -> {ga['time_s'] / st['time_s']:.2f}x; "
                  f"peak RSS {ga['peak_rss_mb']:.0f} MB")
        elif p == "c":
            print(f"(c) exact U 10k vs 10k: ours {res['ours_s']:.2f} s vs torch full matrix "
                  f"{res['torch_full_matrix_s']:.2f} s -> {res['speedup']:.2f}x faster")
        elif p == "d":
            print(f"(d) 1000-permutation RFF test 10k vs 10k: {res['time_s']:.2f} s")


if __name__ == "__main__":
    main()
