"""Contrastive pair sampling: jitted fixed-size JAX sampler vs a per-anchor Python loop over torch tensors.

The loop form is how a PyTorch training script typically draws ProViCNet's pairs (nonzero anchors,
3x3 windows, python lists, then random undersampling); the JAX form runs inside the jitted step.
Shapes as ProViCNet trains: 72 slices per chunk, 256x256 labels, 8x8 blocks (32x32 token grid).

    python scripts/bench/bench_study_pairs.py

Timings on a shared CPU are noisy; both sides run here in one process, back to back.
"""

import random
import time

import jax
import numpy as np
from scipy import ndimage

from vfm_align.study.pairs import sample_pairs


def labels(n=72, size=256, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), np.int32)
    for s in range(n):
        for _ in range(rng.integers(0, 3)):
            cy, cx = rng.integers(40, size - 40, 2)
            r = rng.uniform(10, 35)
            yy, xx = np.ogrid[:size, :size]
            out[s][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
        out[s] = ndimage.binary_closing(out[s]).astype(np.int32)
    return out


def torch_loop(lab, hi=62, lo=2, max_pair=30):
    import torch

    t = torch.from_numpy(lab)
    counts = t.unfold(1, 8, 8).unfold(2, 8, 8).sum(dim=(-1, -2))
    g = counts.shape[1]
    pos, neg = [], []
    for s, y, x in zip(*torch.where(counts >= hi)):
        s, y, x = int(s), int(y), int(x)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if (dy or dx) and 0 <= ny < g and 0 <= nx < g:
                    c = int(counts[s, ny, nx])
                    if c >= hi:
                        pos.append((s, y, x, ny, nx))
                    fy, fx = y + 2 * dy, x + 2 * dx
                    if c <= lo and 0 <= fy < g and 0 <= fx < g and int(counts[s, fy, fx]) <= lo:
                        neg.append((s, y, x, fy, fx))
    k = min(len(pos), len(neg), max_pair)
    return random.sample(pos, k), random.sample(neg, k)


def main():
    lab = labels()
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        p, n = torch_loop(lab)
    t_torch = (time.perf_counter() - t0) / reps
    x = jax.device_put(lab)
    f = jax.jit(sample_pairs)
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, jax.random.key(0)))
    t_compile = time.perf_counter() - t0
    times = []
    for i in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, jax.random.key(i)))
        times.append(time.perf_counter() - t0)
    t_jax = float(np.median(times))
    print(f"labels {lab.shape}, {len(p)} pairs of each kind")
    print(f"torch loop : {t_torch * 1e3:8.2f} ms/batch")
    print(f"jax jit    : {t_jax * 1e3:8.2f} ms/batch (median of 20; compile {t_compile:.2f} s)")
    print(f"ratio      : {t_torch / t_jax:8.1f}x")


if __name__ == "__main__":
    main()
