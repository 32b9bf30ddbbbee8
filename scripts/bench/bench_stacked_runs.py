"""Study fine-tunes completed per minute: one at a time, two threads at a time, and R runs stacked in one step.

    python scripts/bench/bench_stacked_runs.py [--backbone reconstruction] [--task segmentation]
                                               [--steps 30] [--runs 6] [--stack 2,4,6]

The runs are those of the default study (configs/study_default.py: its volumes, batch, model sizes,
fine-tuning recipe and evaluation every tenth of the run) for one (backbone, task): ``--runs`` runs,
half from "pretrained" weights (a second random backbone stands in for them) and half from random
weights, over ``--runs / 2`` seeds. Each approach first starts once untimed and stops after a step, so
every compile is excluded (a study compiles once per (backbone, task) and group size), then completes
all ``--runs`` runs while timed:

* ``one at a time``: each run alone (a stack of one), in turn;
* ``2 threads``: the study's previous way, two solo runs at a time in threads (``run_concurrently``);
* ``stacked R``: groups of R runs, each group one vmapped step (``vfm_align.study.finetune``).

Timings on a shared CPU are noisy; every approach runs here in one process, back to back, and the
ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import machine

from vfm_align.config_file import default_config_path, load_config
from vfm_align.data.phantom import make_phantom
from vfm_align.errors import Stopped
from vfm_align.study import taskdata
from vfm_align.study.backbones import backbone_config, fresh_backbone
from vfm_align.study.finetune import Run, run_finetunes
from vfm_align.study.pretrain import study_mesh
from vfm_align.study.runner import run_concurrently


class _AfterFirstStep:
    """A stop flag that is set once the loop has run its first step."""

    calls = 0

    def is_set(self):
        self.calls += 1
        return self.calls > 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="reconstruction", help="a backbone name of the default study")
    ap.add_argument("--task", default="segmentation")
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps per run (the default study: 150)")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--stack", default="2,4,6", help="group sizes to time")
    ap.add_argument("--cases", type=int, default=96, help="phantom cases (the default study: 96)")
    args = ap.parse_args()

    cfg = load_config(default_config_path("study_default"))
    b = next(x for x in cfg.backbones if x.name == args.backbone)
    ft = cfg.finetune
    ft.steps = args.steps
    ft.eval_every = max(1, args.steps // 10)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_phantom(os.path.join(tmp, "cohort"), args.cases, shape=tuple(cfg.cohort.shape), seed=0,
                                workers=1, progress=False)
        cohort = taskdata.load_cohort(manifest, crop=tuple(cfg.cohort.crop))
    data = taskdata.make_task_data(cohort, args.task, seed=0)
    probe = cohort["image"][: int(ft.probe_cases)]
    config = backbone_config(b.backbone, b.pretrain.model, tuple(cohort["image"].shape[1:4]))
    pretrained = fresh_backbone(b.backbone, config, 1234)  # stands in for pretrained weights
    mesh = study_mesh(cfg.mesh)
    runs = [Run(pretrained if i % 2 == 0 else None, i // 2) for i in range(args.runs)]

    def group(rs, stop=None):
        return run_finetunes(b.backbone, config, rs, args.task, data, probe, ft, mesh, progress=False, stop=stop)

    def warm_up(rs):
        """Compile a group size: start the group and stop it after its first step."""
        try:
            group(rs, stop=_AfterFirstStep())
        except Stopped:
            pass

    def solo_threads(workers):
        run_concurrently(lambda r, stop: group([r]), [(r,) for r in runs], workers)

    approaches = {"one at a time": (1, lambda: solo_threads(1)), "2 threads": (1, lambda: solo_threads(2))}
    for r in (int(x) for x in args.stack.split(",")):
        approaches[f"stacked {r}"] = (r, lambda r=r: [group(runs[i:i + r]) for i in range(0, len(runs), r)])

    print(f"{machine.describe(jax)}; {args.backbone} ({b.backbone}) / {args.task}, "
          f"{args.runs} runs of {args.steps} steps (batch {ft.batch_size}, volumes {cohort['image'].shape[1:]}, "
          f"evaluation every {ft.eval_every} steps); compiles excluded")
    for seed in dict.fromkeys(r.seed for r in runs):  # every seed's initial state, built (and kept) before timing
        warm_up([Run(None, seed)])
    rate = {}
    for name, (size, fn) in approaches.items():
        t0 = time.perf_counter()
        warm_up(runs[:size])
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        sec = time.perf_counter() - t0
        rate[name] = args.runs * 60 / sec
        print(f"{name:>14}: {sec:7.1f} s for {args.runs} runs = {rate[name]:6.2f} runs/min   (warm-up {warm:.1f} s)")
    base, threads = rate["one at a time"], rate["2 threads"]
    print("runs/min relative to one at a time / to 2 threads:")
    for name, v in rate.items():
        print(f"{name:>14}: {v / base:5.2f}x / {v / threads:5.2f}x")
    print(f"best: {max(rate, key=rate.get)} (CPU shared with other work: noisy)")


if __name__ == "__main__":
    main()
