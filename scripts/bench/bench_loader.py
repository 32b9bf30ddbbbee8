"""Loader throughput (cold and cached) and whether a jitted train step waits on the loader.

    python scripts/bench/bench_loader.py [--cases 48] [--shape 32,96,96] [--batch 8] [--threads 2] [--workers 0]

Prints, measured in one run:
  1. phantom generation time (not part of loading);
  2. cold: preprocessing into an empty cache + one pass of the loader, volumes/s;
  3. warm: one pass of the loader from the cache, with and without augmentation, volumes/s;
  4. the project's smallest model (the --recipe backbone's tiny recipe) in its own jitted train
     step (compile timed apart), fed (a) one batch already on device, (b) the augmenting loader
     (random crops to the recipe's shape, host batch -> device each step); the ratio b/a shows how
     much the step waits on the loader. On a CPU-only machine the loader's threads and the step
     share the same cores, so b/a also contains that contention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import machine


def _pass(loader, epoch=0):
    n, t0 = 0, time.perf_counter()
    for b in loader.epoch(epoch):
        n += len(b["case_id"])
    return n, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--shape", default="32,96,96")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="loader worker processes (0: threads only)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--task", default="segmentation")
    ap.add_argument("--recipe", default="profound_mae", help="backbone whose tiny recipe is the stepped model")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))

    import jax

    from vfm_align.data.augment import AugmentConfig
    from vfm_align.data.cache import PreprocessCache, Recipe
    from vfm_align.data.cohort import read_manifest
    from vfm_align.data.loader import Loader
    from vfm_align.data.phantom import make_phantom
    from vfm_align.data.tasks import get_task

    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__}, devices {jax.devices()}, cpus {os.cpu_count()} "
          "(on a shared machine timings are noisy)")
    print(f"cases {args.cases}, shape {shape}, batch {args.batch}, loader threads {args.threads}, "
          f"workers {args.workers}, task {args.task}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = make_phantom(os.path.join(tmp, "ph"), args.cases, shape=shape, seed=0, progress=False)
        print(f"phantom: {args.cases} cases in {time.perf_counter() - t0:.2f} s")
        cohort = read_manifest(manifest)
        cases = cohort.cases
        task = get_task(args.task)
        cache = PreprocessCache(os.path.join(tmp, "cache"), Recipe())

        def make(aug, train=True):
            return Loader(cases, cache, task, batch_size=args.batch, seed=0, train=train, augment_cfg=aug,
                          num_threads=args.threads, prefetch=4, workers=args.workers, process_index=0, process_count=1)

        # Cold: every case is read from NIfTI, reoriented, normalised and written to the cache on first touch.
        n, dt = _pass(make(None, train=False))
        cold = n / dt
        n, dt = _pass(make(None, train=False))
        warm = n / dt
        n, dt = _pass(make(AugmentConfig()), epoch=1)
        warm_aug = n / dt
        print(f"{'loader pass':<34}{'volumes/s':>10}")
        print(f"{'cold (NIfTI -> cache -> batch)':<34}{cold:>10.1f}")
        print(f"{'warm from cache, no augmentation':<34}{warm:>10.1f}   x{warm / cold:.1f} vs cold")
        print(f"{'warm from cache, augmented':<34}{warm_aug:>10.1f}")

        # The project's smallest recipe model and its own jitted, donated train step, fed at the
        # recipe's input shape (random crops of the augmented cases).
        from vfm_align.data.tasks import get_task
        from vfm_align.train import mesh as M
        from vfm_align.train.loop import build_task_model
        from vfm_align.train.optim import make_optimizer
        from vfm_align.train.recipes import base_config
        from vfm_align.train.state import create_state
        from vfm_align.train.step import jit_train_step, make_train_step, task_objective

        cfg = base_config(args.recipe, args.task, "tiny")
        crop = tuple(cfg.data.shape)
        task = get_task(args.task)
        mesh = M.make_mesh(-1, 1)
        gdef, _, state, sh, tx = create_state(lambda: build_task_model(cfg, crop + (3,)),
                                              lambda p: make_optimizer(cfg.optim, p, 1000)[0], mesh,
                                              min_size=int(cfg.mesh.fsdp_min_size))
        step = jit_train_step(make_train_step(gdef, task_objective(task.head, task.loss), tx, seed=0), sh, mesh)

        def fed_loader(epoch):
            return Loader(cases, cache, task, batch_size=args.batch, seed=0, train=True, augment_cfg=AugmentConfig(),
                          shape=crop, num_threads=args.threads, prefetch=4, workers=args.workers,
                          process_index=0, process_count=1).epoch(epoch)

        def put(b):
            return M.global_batch({"image": b["image"], "target": b["target"]}, mesh)

        first = put(next(fed_loader(0)))
        t0 = time.perf_counter()
        compiled = step.lower(state, first).compile()
        print(f"{args.recipe} (tiny recipe, {crop}) train step compile: {time.perf_counter() - t0:.2f} s")
        for _ in range(2):
            state, metrics = compiled(state, first)
        jax.block_until_ready(metrics)
        synth = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, first)
            jax.block_until_ready(metrics)
            synth.append(time.perf_counter() - t0)
        fed = []
        it, epoch = fed_loader(2), 2
        for _ in range(args.steps):
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                epoch += 1
                it = fed_loader(epoch)
                b = next(it)
            state, metrics = compiled(state, put(b))
            jax.block_until_ready(metrics)
            fed.append(time.perf_counter() - t0)
        ms, mf = statistics.median(synth), statistics.median(fed)
        print(f"{'train step (median of ' + str(args.steps) + ')':<34}{'s/step':>10}")
        print(f"{'synthetic batch on device':<34}{ms:>10.3f}")
        print(f"{'fed by the loader (augmented)':<34}{mf:>10.3f}   x{mf / ms:.2f} of synthetic")
        print("the step waits on the loader" if mf > 1.15 * ms else "the loader keeps up with the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
