"""Benchmark: full-size ProFound MAE-ViT-B encoder forward (unmasked), JAX vs PyTorch, same weights.

mae_vit_base_patch16: volume 64x256x256x3, patch 16x32x32 -> 256 tokens, 768 wide, 12 blocks,
12 heads. PyTorch runs a compact reimplementation of the reference encoder (Conv3d patch embed,
pre-norm blocks with scaled_dot_product_attention) loaded with the same random weights; both
outputs are checked against each other before timing. Compile time is reported apart; run times
are medians (and IQR) over --reps calls taken in turn (JAX, PyTorch, JAX, ...), each ending in
block_until_ready.

    python scripts/bench/bench_mae_vit.py --batch 1 4 --reps 10

Last run (idle 2-core machine, jax 0.10.2, torch 2.13 with 2 threads, --reps 7): batch 1 589 ms vs
PyTorch 713 ms (1.21x), batch 4 1757 ms vs 2083 ms (1.19x); outputs agree to 2e-5. The patch
embedding as a strided convolution (instead of patchify + matmul) took batch 4 from 0.89x to 1.19x.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
from flax import nnx
from timing import interleaved_times, sample_times
from torch_twins import IMG, C, random_state_dict, torch_encoder

import converters.profound_mae as pm


def _summary(times):
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return med, q3 - q1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-torch", action="store_true", help="time JAX only")
    args = ap.parse_args()

    sd = random_state_dict()
    model, info = pm.convert(sd, {}, pm.ARCH, "<random mae_vit_base_patch16>")
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__}, devices {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"python {platform.python_version()}, float32, reps {args.reps}")
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        t_fwd = torch_encoder(sd)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, inference_mode")

    print(f"{'batch':>5} {'compile s':>9} {'jax ms':>10} {'(iqr)':>7} "
          f"{'torch ms':>10} {'(iqr)':>7} {'torch/jax':>9} {'max|diff|':>9}")
    for n in args.batch:
        x = np.random.default_rng(n).standard_normal((n, *IMG, C)).astype(np.float32)
        xj = jax.device_put(jnp.asarray(x))
        t0 = time.perf_counter()
        compiled = encode.lower(state, xj).compile()
        t_compile = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(state, xj))
        jax.block_until_ready(compiled(state, xj))

        def run_jax(compiled=compiled, xj=xj):  # defaults bind this batch's executable and input
            return jax.block_until_ready(compiled(state, xj))

        if args.no_torch:
            j_med, j_iqr = _summary(sample_times(run_jax, args.reps))
        row = f"{n:>5} {t_compile:>9.2f} "
        if not args.no_torch:
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
            with torch.inference_mode():
                ref = t_fwd(xt).numpy()
                t_fwd(xt)
                ts = interleaved_times({"jax": run_jax, "torch": lambda xt=xt: t_fwd(xt)}, args.reps)
            (j_med, j_iqr), (t_med, t_iqr) = _summary(ts["jax"]), _summary(ts["torch"])
        row += f"{j_med * 1e3:>10.1f} {j_iqr * 1e3:>7.1f}"
        if not args.no_torch:
            diff = float(np.abs(np.asarray(out) - ref).max())
            row += f" {t_med * 1e3:>10.1f} {t_iqr * 1e3:>7.1f} {t_med / j_med:>9.2f} {diff:>9.2e}"
            if diff > 1e-3:
                raise SystemExit(f"JAX and PyTorch disagree (max abs diff {diff:.3g}); timings are meaningless")
        print(row, flush=True)


if __name__ == "__main__":
    main()
