"""Train-step time and throughput for each backbone's recipe, and the in-loop alignment overhead.

    python scripts/bench/bench_train_step.py [--variant tiny|default] [--task segmentation] [--reps 10]

For every backbone: compile time of the jitted, donated train step (AOT, apart), median and IQR
of the step time over --reps calls (each ending in block_until_ready), images/s, and the time of
one alignment-monitor call (features on the probe set + RFF MMD^2, CKA, drift); the overhead is
that time divided by (align.every x step time), as the loop runs it. No PyTorch baseline: the
reference repositories have no comparable fine-tuning step for these heads.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import machine
import numpy as np

from vfm_align.data.tasks import get_task
from vfm_align.train import mesh as M
from vfm_align.train.loop import build_task_model
from vfm_align.train.monitor import AlignmentMonitor
from vfm_align.train.optim import make_optimizer
from vfm_align.train.recipes import base_config
from vfm_align.train.state import create_state
from vfm_align.train.step import jit_train_step, make_feature_step, make_train_step, task_objective


def bench(backbone, task, variant, reps):
    cfg = base_config(backbone, task, variant)
    kind, loss = get_task(task).head, get_task(task).loss
    shape = tuple(cfg.data.shape) + (3,)
    b = int(cfg.train.batch_size)
    mesh = M.make_mesh(-1, 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, *shape)).astype(np.float32)
    if kind == "label":
        y = rng.integers(0, 2, b).astype(np.int32)
    elif kind == "dense":
        y = rng.integers(0, 2, (b, *shape[:3])).astype(np.int32)
    else:
        y = x.copy()
    gdef, gdef_eval, state, sh, tx = create_state(lambda: build_task_model(cfg, shape),
                                                  lambda p: make_optimizer(cfg.optim, p, 1000)[0], mesh,
                                                  min_size=int(cfg.mesh.fsdp_min_size))
    step = jit_train_step(make_train_step(gdef, task_objective(kind, loss), tx, seed=0), sh, mesh)
    batch = M.global_batch({"image": x, "target": y}, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    q1, q3 = np.percentile(times, [25, 75])

    a = cfg.align
    probe = M.global_batch({"x": rng.normal(size=(int(a.probe_cases), *shape)).astype(np.float32)}, mesh)["x"]
    mon = AlignmentMonitor(make_feature_step(gdef_eval, sh, mesh, tuple(a.sites)), probe, a.sites,
                           num_features=int(a.num_features), max_rows=int(a.max_rows))
    mon.bank(state)
    mon(state)  # compile
    at = []
    for _ in range(reps):
        t = time.perf_counter()
        mon(state)
        at.append(time.perf_counter() - t)
    t_align = float(np.median(at))
    return dict(backbone=backbone, compile=t_compile, step=med, iqr=(q3 - q1), img_s=b / med, align=t_align,
                every=int(a.every), overhead=t_align / (int(a.every) * med))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="tiny", choices=("tiny", "default"))
    ap.add_argument("--task", default="segmentation")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backbones", default="profound_conv,provicnet")
    args = ap.parse_args()
    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{platform.processor() or platform.machine()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, float32, variant {args.variant}, task {args.task}; "
          "no persistent compilation cache")
    print(f"{'backbone':<15}{'compile s':>10}{'step ms':>10}{'IQR ms':>9}{'img/s':>8}"
          f"{'align ms':>10}{'K':>6}{'overhead':>10}")
    for bb in args.backbones.split(","):
        r = bench(bb, args.task, args.variant, args.reps)
        print(f"{r['backbone']:<15}{r['compile']:>10.1f}{r['step'] * 1e3:>10.1f}{r['iqr'] * 1e3:>9.1f}"
              f"{r['img_s']:>8.2f}"
              f"{r['align'] * 1e3:>10.1f}{r['every']:>6}{r['overhead'] * 100:>9.2f}%")


if __name__ == "__main__":
    main()
