#!/usr/bin/env python3
"""Whole-volume inference throughput and memory, per backbone at its released size (random weights, CPU).

For each model: a model directory is written (random weights, released configuration), a synthetic
NIfTI case of the given size is predicted through the same path as ``vfm-align infer`` (load,
preprocess, sliding windows or 2.5D slices, NIfTI/PI-CAI outputs), once to compile and then
``--cases`` more times. Printed: seconds of the first case (with compilation), seconds per case after
it, cases per minute, the process's peak resident memory (each model runs in its own subprocess),
and for the sliding-window models (UperNet, MAE-ViT) the memory XLA plans for one window batch plus
the whole-volume accumulators of the ``--volume-shape`` case, and the resident memory after loading.
The MAE-ViT is a ``task_model`` directory (released MAE-ViT + segmentation head, as a fine-tuning export).

    python3 scripts/bench/bench_infer.py [--models upernet cls mae_vit provicnet] [--cases 1]
        [--volume-shape 30 224 224] [--slice-shape 20 256 256]
    python3 scripts/bench/bench_infer.py --models upernet --cases 0 --volume-shape 30 640 640   # the 4 GB case

On a shared CPU the timings are noisy; read them as orders of magnitude.
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

MODELS = ("upernet", "cls", "mae_vit", "provicnet")


def _model_dir(name: str, tmp: str) -> tuple[str, str]:
    """(arch, directory) of a released-size model with random weights, in the converted (safe) format.

    The released MAE-ViT has no task head: it is benched as a fine-tuning export would hold it, the
    ``task_model`` arch (MAE-ViT backbone at its released size, 64x256x256 windows, + the segmentation
    head of the default recipe), the model directory ``vfm-align finetune`` writes to ``<workdir>/model``.
    """
    from flax import nnx

    from vfm_align.model_io import save_model
    from vfm_align.models.registry import build_model

    if name == "mae_vit":
        from vfm_align.models.task_model import TASK_MODEL_ARCH, TaskModelConfig
        from vfm_align.train.recipes import base_config

        rc = base_config("profound_mae", "segmentation")
        arch = TASK_MODEL_ARCH
        cfg = TaskModelConfig(backbone_arch=rc.model.arch, backbone_config=dict(rc.model.config), task="segmentation",
                              input_shape=(64, 256, 256, 3), num_outputs=3, head_hidden=int(rc.model.head_hidden))
        from vfm_align.infer.volume import finetune_recipe

        extra = {"task": "segmentation", "preprocessing": finetune_recipe()}
    else:
        arch, cfg = {"upernet": ("profound_conv_upernet", {"out_channels": 9}),
                     "cls": ("profound_conv_cls", {}),
                     "provicnet": ("provicnet", {"cl_out": 0})}[name]
        extra = None
    return arch, save_model(build_model(arch, cfg, rngs=nnx.Rngs(0)), arch, cfg, os.path.join(tmp, "model"),
                            extra=extra)


def _write_case(path, shape_dhw, seed):
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1000, shape_dhw[::-1]).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0])), path)
    return path


def one(name: str, cases: int, volume_shape, slice_shape) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from vfm_align.infer.loading import load_for_inference
    from vfm_align.infer.outputs import write_case
    from vfm_align.infer.sliding_window import accumulator_bytes, plan_windows

    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    arch, model_dir = _model_dir(name, tmp)
    model = load_for_inference(model_dir)
    shape = slice_shape if name == "provicnet" else volume_shape
    out = {}
    if name in ("upernet", "mae_vit"):  # planned memory of one window batch, and of this volume's accumulators
        from vfm_align.infer.sliding_window import _host_step
        from vfm_align.infer.volume import _predictor

        predict, state = _predictor(model)
        step = _host_step(predict)
        roi = model.roi
        mem = step.lower(state, jax.ShapeDtypeStruct((1, *roi, 3), jnp.float32),
                         jax.ShapeDtypeStruct((1, *roi), jnp.float32)).compile().memory_analysis()
        step_bytes = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        k = jax.eval_shape(lambda x: predict(state, x), jax.ShapeDtypeStruct((1, *roi, 3), jnp.float32)).shape[-1]
        plan = plan_windows(shape, roi, 0.5)
        acc = accumulator_bytes(plan.shape, k, 3)  # the host path (CPU) holds them on the input grid
        out["window"] = list(roi)
        out["window_step_gb"] = step_bytes / 2 ** 30
        out["est_volume_gb"] = (step_bytes + acc) / 2 ** 30  # the weights are among the step arguments
        out["windows"] = len(plan.starts)
    print(json.dumps({"planned": out}), flush=True)  # before running: survives a stop for memory
    rss_after_load = _rss_gb()
    times = []
    for i in range(cases + 1):
        img = _write_case(os.path.join(tmp, f"case{i}.nii.gz"), shape, i)
        t0 = time.perf_counter()
        if name == "provicnet":
            from vfm_align.infer.provicnet import predict_sequence

            p = predict_sequence(model.module, img, None, progress=False)
            write_case(os.path.join(tmp, f"out{i}"), "detection", p.reference, {"likelihood": p.prob}, {},
                       threshold=0.4)
        else:
            from vfm_align.infer.volume import predict_volume

            p = predict_volume(model, {"t2w": img})
            write_case(os.path.join(tmp, f"out{i}"), p.task, p.reference, p.arrays, {}, threshold=0.5)
        times.append(time.perf_counter() - t0)
    out = {**out, "model": name, "arch": arch, "shape": list(shape), "first_case_s": times[0],
           "rss_after_load_gb": rss_after_load,
           "per_case_s": float(np.median(times[1:])) if cases else None,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    out["cases_per_min"] = 60.0 / out["per_case_s"] if cases else None
    return out


def _rss_gb() -> float:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 2 ** 20


def _run_watched(cmd, max_gb):
    """Run ``cmd``, polling its resident memory; stop it above ``max_gb``. (stdout, peak GB, stopped)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, stopped = 0.0, False
    while proc.poll() is None:
        try:
            status = open(f"/proc/{proc.pid}/status").read()
            rss = int(status.split("VmRSS:")[1].split()[0]) / 2 ** 20
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) / 2 ** 20)
        except (OSError, IndexError, ValueError):
            rss = 0.0
        if rss > max_gb:
            proc.kill()
            stopped = True
            break
        time.sleep(0.2)
    stdout = proc.communicate()[0]
    return stdout, peak, stopped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--cases", type=int, default=1, help="timed cases after the compiling one (default 1)")
    ap.add_argument("--volume-shape", type=int, nargs=3, default=(30, 224, 224), metavar=("D", "H", "W"))
    ap.add_argument("--slice-shape", type=int, nargs=3, default=(20, 256, 256), metavar=("D", "H", "W"))
    ap.add_argument("--max-gb", type=float, default=8.0, help="stop a model whose resident memory passes this (GB)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.cases, tuple(args.volume_shape), tuple(args.slice_shape))))
        return
    import jax

    print(f"{machine.describe(jax)}; random weights, released sizes")
    print(f"{'model':10s} {'case D,H,W':>14s} {'1st case s':>10s} {'s/case':>8s} {'cases/min':>9s} {'peak GB':>8s}")
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--cases", str(args.cases),
               "--volume-shape", *map(str, args.volume_shape), "--slice-shape", *map(str, args.slice_shape)]
        stdout, peak, stopped = _run_watched(cmd, args.max_gb)
        lines = [json.loads(x) for x in stdout.strip().splitlines() if x.startswith("{")]
        r = lines[-1] if lines and "planned" not in lines[-1] else None
        if r is None:
            what = f"stopped at {peak:.1f} GB resident (--max-gb {args.max_gb})" if stopped else "failed"
            print(f"{name:10s} {what}")
            r = lines[0]["planned"] if lines else {}
        else:
            per = f"{r['per_case_s']:8.1f} {r['cases_per_min']:9.2f}" if r["per_case_s"] else f"{'-':>8s} {'-':>9s}"
            print(f"{name:10s} {'x'.join(map(str, r['shape'])):>14s} {r['first_case_s']:10.1f} {per} {peak:8.2f}")
        if "est_volume_gb" in r:
            print(f"{'':10s} one {'x'.join(map(str, r['window']))} window planned by XLA: {r['window_step_gb']:.2f} GB;"
                  f" the {'x'.join(map(str, args.volume_shape))} volume ({r['windows']} windows at overlap 0.5) with "
                  f"its accumulators: {r['est_volume_gb']:.2f} GB planned"
                  + (f"; resident after loading {r['rss_after_load_gb']:.2f} GB" if "rss_after_load_gb" in r else ""))


if __name__ == "__main__":
    main()
