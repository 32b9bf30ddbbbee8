#!/usr/bin/env python3
"""Whole-volume inference throughput and memory, per backbone at its released size (random weights, CPU).

For each model: a model directory is written (random weights, released configuration), a synthetic
NIfTI case of the given size is predicted through the same path as ``vfm-align infer`` (load,
preprocess, sliding windows or 2.5D slices, NIfTI/PI-CAI outputs), once to compile and then
``--cases`` more times. Printed: seconds of the first case (with compilation), seconds per case after
it, cases per minute, the process's peak resident memory (each model runs in its own subprocess),
and for volume models the memory XLA plans for one window batch plus the whole-volume accumulators
of a 30x640x640 volume (the estimated peak for that size, from the compiled step, without running it).

    python3 scripts/bench/bench_infer.py [--models upernet cls provicnet] [--cases 1]
        [--volume-shape 30 224 224] [--slice-shape 20 256 256]

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

MODELS = ("upernet", "cls", "provicnet")



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
    from flax import nnx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from vfm_align.infer.loading import load_for_inference
    from vfm_align.infer.outputs import write_case
    from vfm_align.infer.sliding_window import accumulator_bytes, plan_windows
    from vfm_align.model_io import save_model
    from vfm_align.models.registry import build_model

    arch, cfg = {"upernet": ("profound_conv_upernet", {"out_channels": 9}),
                 "cls": ("profound_conv_cls", {}),
                 "provicnet": ("provicnet", {"cl_out": 0})}[name]
    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    model_dir = save_model(build_model(arch, cfg, rngs=nnx.Rngs(0)), arch, cfg, os.path.join(tmp, "model"))
    model = load_for_inference(model_dir)
    shape = slice_shape if name == "provicnet" else volume_shape
    out = {}
    if name == "upernet":  # planned memory of one window batch, and of a 30x640x640 volume's accumulators
        from vfm_align.infer.sliding_window import _host_step
        from vfm_align.infer.volume import _predictor

        predict, state = _predictor(model)
        step = _host_step(predict)
        roi = model.roi
        mem = step.lower(state, jax.ShapeDtypeStruct((1, *roi, 3), jnp.float32),
                         jax.ShapeDtypeStruct((1, *roi), jnp.float32)).compile().memory_analysis()
        step_bytes = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        plan = plan_windows((30, 640, 640), roi, 0.5)
        acc = accumulator_bytes(plan.shape, 9, 3)  # the host path (CPU) holds them on the input grid
        out["window_step_gb"] = step_bytes / 2 ** 30
        out["est_30x640x640_gb"] = (step_bytes + acc) / 2 ** 30  # the weights are among the step arguments
        out["windows_30x640x640"] = len(plan.starts)
    print(json.dumps({"planned": out}), flush=True)  # before running: survives a stop for memory
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
           "per_case_s": float(np.median(times[1:])) if cases else None,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    out["cases_per_min"] = 60.0 / out["per_case_s"] if cases else None
    return out


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
        if "est_30x640x640_gb" in r:
            print(f"{'':10s} one 64x224x224 window planned by XLA: {r['window_step_gb']:.2f} GB; a 30x640x640 volume "
                  f"({r['windows_30x640x640']} windows at overlap 0.5): estimated peak {r['est_30x640x640_gb']:.2f} GB")


if __name__ == "__main__":
    main()
