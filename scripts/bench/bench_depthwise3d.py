"""Depthwise 7x7x7 Conv3d on the four ProFound-Conv stage shapes (64x224x224 input, batch 1):
JAX formulations side by side with PyTorch on this machine, forward and forward+backward.

    python scripts/bench/bench_depthwise3d.py [--reps 5] [--stages 0,1,2,3] [--impls shift,fft,lax] [--no-backward]

Compile time is reported apart; run times are medians over --reps calls after a warm-up, each
ending in block_until_ready. Every JAX result is checked against the first candidate. Needs torch
(the 'bench' extra) for the baseline columns.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
from timing import sample_times

from vfm_align.models.ops3d import depthwise_conv3d

STAGES = [(96, 16, 56, 56), (192, 8, 28, 28), (384, 4, 14, 14), (768, 4, 14, 14)]


def fft_dwconv(x, k, padding=(3, 3, 3)):
    """Candidate: per-channel FFT convolution end to end (forward slower than 'shift' on CPU; the
    package's 'shift' takes its backward from this formulation)."""
    _, d, h, w, _ = x.shape
    s = (d + 6, h + 6, w + 6)
    xf = jnp.fft.rfftn(jnp.moveaxis(x, -1, 1), s=s, axes=(2, 3, 4))
    kf = jnp.fft.rfftn(jnp.moveaxis(k[::-1, ::-1, ::-1], -1, 0), s=s, axes=(1, 2, 3))
    y = jnp.fft.irfftn(xf * kf[None], s=s, axes=(2, 3, 4))
    return jnp.moveaxis(y[:, :, 3:3 + d, 3:3 + h, 3:3 + w], 1, -1)


IMPLS = {
    "shift": lambda x, k: depthwise_conv3d(x, k, impl="shift"),
    "lax": lambda x, k: depthwise_conv3d(x, k, impl="lax"),
    "fft": fft_dwconv,
}


def timeit(fn, reps):
    ts = sample_times(fn, reps)
    return float(np.median(ts))


def jax_case(name, x, k, g, reps, backward):
    f = IMPLS[name]
    fwd = jax.jit(f)
    t0 = time.perf_counter()
    fwd_c = fwd.lower(x, k).compile()
    comp = time.perf_counter() - t0
    out = fwd_c(x, k).block_until_ready()
    t_f = timeit(lambda: fwd_c(x, k).block_until_ready(), reps)
    t_b = None
    if backward:
        vg = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * g), argnums=(0, 1)))
        vg_c = vg.lower(x, k).compile()
        jax.block_until_ready(vg_c(x, k))
        t_b = timeit(lambda: jax.block_until_ready(vg_c(x, k)), reps)
    return out, comp, t_f, t_b


def torch_case(xn, kn, gn, reps, backward):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    c = xn.shape[-1]
    conv = torch.nn.Conv3d(c, c, 7, padding=3, groups=c, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kn.transpose(3, 0, 1, 2)[:, None])))
    conv = conv.to(memory_format=torch.channels_last_3d)  # torch's fastest CPU layout here
    x = torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 4, 1, 2, 3)))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        out = conv(x)
        t_f = timeit(lambda: conv(x), reps)
    t_b = None
    if backward:
        gt = torch.from_numpy(np.ascontiguousarray(gn.transpose(0, 4, 1, 2, 3)))
        xg = x.clone().requires_grad_(True)

        def step():
            conv.zero_grad()
            y = conv(xg)
            (y * gt).sum().backward()

        step()
        t_b = timeit(step, reps)
    return out.numpy().transpose(0, 2, 3, 4, 1), t_f, t_b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--impls", default="shift,fft,lax", help="lax is very slow on CPU for the first two stages")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__} backend {jax.default_backend()} cpus {os.cpu_count()} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} float32 batch 1")
    rng = np.random.default_rng(0)
    for s in map(int, a.stages.split(",")):
        c, d, h, w = STAGES[s]
        xn = rng.standard_normal((1, d, h, w, c)).astype(np.float32)
        kn = (rng.standard_normal((7, 7, 7, c)) / 18).astype(np.float32)
        gn = rng.standard_normal((1, d, h, w, c)).astype(np.float32)
        x, k, g = map(jnp.asarray, (xn, kn, gn))
        print(f"\nstage {s}: C={c} {d}x{h}x{w}")
        ref_t = None
        if not a.no_torch:
            ref_out, tf, tb = torch_case(xn, kn, gn, a.reps, not a.no_backward)
            ref_t = (tf, tb)
            print(f"  {'torch':6s} fwd {tf * 1e3:9.1f} ms" + (f"  fwd+bwd {tb * 1e3:9.1f} ms" if tb else ""))
        for name in a.impls.split(","):
            with jax.default_matmul_precision("highest"):
                out, comp, tf, tb = jax_case(name, x, k, g, a.reps, not a.no_backward)
            err = float(np.abs(np.asarray(out) - ref_out).max()) if ref_t else float("nan")
            line = f"  {name:6s} fwd {tf * 1e3:9.1f} ms"
            if ref_t:
                line += f" ({tf / ref_t[0]:5.2f}x torch)"
            if tb is not None:
                line += f"  fwd+bwd {tb * 1e3:9.1f} ms"
                if ref_t and ref_t[1]:
                    line += f" ({tb / ref_t[1]:5.2f}x torch)"
            print(line + f"  compile {comp:.2f}s  max|diff| vs torch {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
