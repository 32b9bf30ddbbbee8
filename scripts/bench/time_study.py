"""Wall time of `vfm-align study`, per phase and in total, with the machine it ran on.

    python scripts/bench/time_study.py                                  # configs/study_default.py
    python scripts/bench/time_study.py configs/study_quick.py --out /tmp/q --config.finetune.steps=8

Runs the study as a user would (a fresh output folder, the CLI in a subprocess) and reads the phases
from the times its outputs were written: cohorts and pretraining (until the last pretrained model
directory), fine-tuning (until the last run file; per backbone, the span from the end of pretraining
to its last run file, spans overlap since pairs run ``workers`` at a time), and statistics and report
(until report.html). Prints the machine line (scripts/bench/machine.py) and the peak RSS of the study.
Give the figures with the load of the machine: on a shared CPU they are not an idle measurement.
"""

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402


def _mtime(path: str) -> float:
    return os.stat(path).st_mtime


def _fmt(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:4.1f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/study_default.py")
    p.add_argument("--out", default=None, help="output folder (default: a fresh temporary folder, removed after)")
    args, overrides = p.parse_known_args()
    out = args.out or tempfile.mkdtemp(prefix="time_study_")
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"{out}: not empty; the timing needs a fresh study")
    load0 = os.getloadavg()[0]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "vfm_align", "study", "--config", args.config, "--out", out,
                    "--no-progress", *overrides], check=True)
    total = time.time() - t0
    import jax
    import numpy

    pretrained = glob.glob(os.path.join(out, "pretrained", "*"))
    t_pre = max((_mtime(d) for d in pretrained), default=t0)
    runs = glob.glob(os.path.join(out, "runs", "*.json"))
    t_fine = max(_mtime(r) for r in runs)
    t_report = _mtime(os.path.join(out, "report.html"))
    print(describe(jax, numpy))
    print(f"load average (1 min) at the start: {load0:.2f}; after: {os.getloadavg()[0]:.2f}")
    print(f"config: {args.config} {' '.join(overrides)}")
    print(f"cohorts + pretraining ({len(pretrained)} backbones): {_fmt(t_pre - t0)}")
    print(f"fine-tuning ({len(runs)} runs):                  {_fmt(t_fine - t_pre)}")
    by = {}
    for r in runs:
        by.setdefault(json.load(open(r))["backbone"], []).append(_mtime(r))
    for b, ts in by.items():
        print(f"  {b}: last run file {_fmt(max(ts) - t_pre)} after pretraining ({len(ts)} runs)")
    print(f"statistics + report:                    {_fmt(t_report - t_fine)}")
    print(f"total:                                  {_fmt(total)}")
    print(f"peak RSS of the study: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GB")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
