"""ProFound-Conv encoder (ConvNeXtV2-Tiny 3D: depths 3,3,9,3, dims 96..768) forward at 64x224x224,
batch 1, float32, on this machine: the JAX port vs a compact PyTorch reimplementation of the same
network holding the same weights (agreement is checked before timing).

    python scripts/bench/bench_profound_conv.py [--reps 5] [--size 64,224,224] [--dwconv-impl auto]

JAX compile time is reported apart; run times are medians over --reps calls after a warm-up.
PyTorch runs with all cores, under inference_mode, in its default (NCDHW) layout and in
channels_last_3d; the ratio is against the faster of the two. Needs torch (the 'bench' extra).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
from flax import nnx
from timing import sample_times
from torch_twins import torch_convnext

from vfm_align.models.convnext3d import ConvNeXt3DConfig
from vfm_align.models.registry import build_model


def median_time(fn, reps):
    ts = sample_times(fn, reps)
    return float(np.median(ts)), float(np.percentile(ts, 25)), float(np.percentile(ts, 75))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", default="64,224,224")
    ap.add_argument("--dwconv-impl", default="auto")
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.split(","))
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = ConvNeXt3DConfig.tiny(dwconv_impl=a.dwconv_impl)
    model = build_model("profound_conv", cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # non-trivial GRN and norms so no layer is an identity
    rng = np.random.default_rng(0)
    for s, depth in enumerate(cfg.depths):
        for b in range(depth):
            for name in ("gamma", "beta"):
                grn = params["stages"][s][b]["grn"]
                grn[name] = jnp.asarray(rng.normal(0, 0.3, grn[name].shape), jnp.float32)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    graphdef, st = nnx.split(model)

    @jax.jit
    def forward(st, x):
        return nnx.merge(graphdef, st)(x)

    xn = rng.standard_normal((1, *size, 3)).astype(np.float32)
    x = jax.device_put(jnp.asarray(xn))
    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__} backend {jax.default_backend()} dwconv_impl {a.dwconv_impl}; "
          f"torch {torch.__version__} "
          f"threads {torch.get_num_threads()}; cpus {os.cpu_count()}; input 1x3x{size[0]}x{size[1]}x{size[2]} float32")
    t0 = time.perf_counter()
    compiled = forward.lower(st, x).compile()
    comp = time.perf_counter() - t0
    out_j = np.asarray(compiled(st, x).block_until_ready())
    tj = median_time(lambda: compiled(st, x).block_until_ready(), a.reps)

    net = torch_convnext(params, cfg)
    xt = torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 4, 1, 2, 3)))
    res = {}
    with torch.inference_mode():
        for name, mf in (("torch NCDHW", torch.contiguous_format), ("torch channels_last_3d", torch.channels_last_3d)):
            net.mf = mf
            out_t = net(xt).numpy()
            err = float(np.abs(out_t - out_j).max())
            res[name] = (median_time(lambda: net(xt), a.reps), err)
    print(f"  jax    compile {comp:6.2f} s   run median {tj[0]:7.3f} s (IQR {tj[1]:.3f}-{tj[2]:.3f})")
    for name, ((m, lo, hi), err) in res.items():
        print(f"  {name:22s} run median {m:7.3f} s (IQR {lo:.3f}-{hi:.3f})   "
              f"max|jax - torch| on the embedding {err:.1e}")
    best = min(v[0][0] for v in res.values())
    print(f"  ratio jax / fastest torch: {tj[0] / best:.2f}x")


if __name__ == "__main__":
    main()
