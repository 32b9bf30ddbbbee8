#!/usr/bin/env python3
"""ProViCNet per-sequence model, full size, this project vs PyTorch on the same weights (CPU).

Builds a compact PyTorch twin of the network (ViT-S/14, 4 registers, 12 blocks, MLP 1536,
6 heads, slice-position tokens, conv_head8) with the reference state_dict key names and random
weights, converts that state_dict with ``converters.convert_state_dict`` (so the full-size
converter is exercised too), checks both outputs agree, then times both side by side in one
run: compile time apart, medians and IQR over --reps calls taken in turn (JAX, PyTorch, JAX, ...),
same thread count, float32.

    python3 scripts/bench/bench_provicnet.py [--batch 8] [--reps 5] [--threads N] [--depth 12]

Needs torch (the ``bench`` extra). CPU timings on a shared machine are noisy; the ratio measured
in one run is the number to read.

Last runs (idle 2-core machines, jax 0.10.2, torch 2.13 with 2 threads, interleaved):
AMD EPYC (AVX2), two runs: encoder 1.02x / 0.95x (8.95 s / 9.61 s vs 9.11 s / 9.13 s), full model 1.04x /
1.04x (9.67 s / 9.57 s vs 10.04 s / 9.95 s), with the blocks run slice by slice for inference (batched
they gave 0.90x / 0.98x there). An earlier machine, batched blocks: encoder 4.66 s vs 4.98 s (1.07x),
full model 4.54 s vs 4.89 s (1.08x). Outputs agree to ~6e-6 (tokens) and ~9e-7 (logits).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import machine
import numpy as np
from timing import interleaved_times
from torch_twins import torch_provicnet


def _fmt(ts: np.ndarray) -> str:
    q1, med, q3 = np.percentile(ts, [25, 50, 75])
    return f"{med:7.3f} s (IQR {q1:.3f}-{q3:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--attention", choices=("default", "xla"), default="default",
                    help="'xla': swap the CPU blocked attention for jax.nn.dot_product_attention (the naive baseline)")
    ap.add_argument("--only", choices=("encoder", "full"), default=None, help="time one of the two networks")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from converters import convert_state_dict

    if args.attention == "xla":
        import vfm_align.models.layers as layers

        layers.blocked_attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)

    torch.set_num_threads(args.threads)
    net = torch_provicnet(args.depth)
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    model, info = convert_state_dict(sd, num_heads=6)
    cfg = info["config"]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32)
    z = 20.0
    pos = np.stack([np.arange(args.batch, dtype=np.float32) % z, np.full(args.batch, z, np.float32)], 1)
    x_t, pos_t = torch.from_numpy(x), torch.from_numpy(pos)
    x_j, pos_j = jax.device_put(jnp.asarray(x.transpose(0, 2, 3, 1))), jax.device_put(jnp.asarray(pos))

    graphdef, state = nnx.split(model)

    def jax_logits(state, x, pos):
        return nnx.merge(graphdef, state)(x, pos)

    def jax_tokens(state, x, pos):
        return nnx.merge(graphdef, state).tokens(x, pos)[0]

    attention = "jax.nn.dot_product_attention (naive baseline)" if args.attention == "xla" else "project default"
    print(f"attention: {attention}")
    print(f"ProViCNet full size: depth {cfg.depth}, width {cfg.embed_dim}, MLP {cfg.mlp_hidden}, "
          f"{cfg.num_heads} heads, "
          f"{cfg.num_registers} registers; batch {args.batch} x {args.size}x{args.size}x3 float32")
    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__} ({jax.default_backend()}, {len(jax.devices())} device(s)), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    cases = [("encoder", "encoder (normed tokens)", jax_tokens, net.tokens),
             ("full", "full model (logits)", jax_logits, net)]
    for key, name, jfn, tfn in cases:
        if args.only and key != args.only:
            continue
        t0 = time.perf_counter()
        compiled = jax.jit(jfn).lower(state, x_j, pos_j).compile()
        compile_s = time.perf_counter() - t0
        with torch.inference_mode():
            ref = tfn(x_t, pos_t).numpy()
            tfn(x_t, pos_t)
            out = np.asarray(jax.block_until_ready(compiled(state, x_j, pos_j)))
            jax.block_until_ready(compiled(state, x_j, pos_j))
            # Defaults bind this case's executable and module (the calls all happen in this iteration anyway).
            ts = interleaved_times({"jax": lambda c=compiled: jax.block_until_ready(c(state, x_j, pos_j)),
                                    "torch": lambda f=tfn: f(x_t, pos_t)}, args.reps)
        t_jax, t_torch = ts["jax"], ts["torch"]
        if out.ndim == 4:
            out = out.transpose(0, 3, 1, 2)
        err = float(np.abs(out - ref).max())
        ratio = np.median(t_torch) / np.median(t_jax)
        rows.append((name, t_jax, t_torch, ratio))
        print(f"\n{name}: max |jax - torch| = {err:.2e} (scale {np.abs(ref).max():.2f}); jax compile {compile_s:.1f} s")
        print(f"  vfm-align (JAX) {_fmt(t_jax)}")
        print(f"  PyTorch         {_fmt(t_torch)}")
        print(f"  throughput ratio (torch time / jax time) = {ratio:.2f}x  [{args.batch / np.median(t_jax):.2f} vs "
              f"{args.batch / np.median(t_torch):.2f} slices/s]")


if __name__ == "__main__":
    main()
