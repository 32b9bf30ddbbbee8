#!/usr/bin/env python3
"""ProViCNet with and without the true gland mask: agreement of the cancer labels on phantom cases.

Without ``--gland``, ``vfm-align infer`` normalises with whole-volume statistics, takes the voxels the
first pass predicts as gland or cancer as the mask, and runs a second pass (a deviation from the
reference, which needs the mask). This script predicts phantom T2w volumes both ways with a converted
ProViCNet and prints, per case, the Dice of the two cancer labels (prob > 0.4), the largest
probability difference, and the Dice of the predicted gland against the true one.

    python3 scripts/bench/provicnet_gland_agreement.py [--model DIR | --checkpoint T2_best.pth] [--cases 4]

Default model: the synthetic test fixture /work/shared/fixtures/provicnet_t2.pth (random weights, 2 blocks);
its agreement says how the two paths differ mechanically, not how a trained model behaves.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def _dice(a, b):
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="converted ProViCNet per-sequence model directory")
    ap.add_argument("--checkpoint", default="/work/shared/fixtures/provicnet_t2.pth")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--shape", default="20,96,96")
    args = ap.parse_args()

    from vfm_align.cli import main as cli
    from vfm_align.data.cohort import read_manifest
    from vfm_align.data.nifti import load_volume
    from vfm_align.infer.provicnet import predict_sequence

    tmp = tempfile.mkdtemp(prefix="gland_agreement_")
    model = args.model
    if model is None:
        model = os.path.join(tmp, "model")
        assert cli(["convert", args.checkpoint, "--out", model, "--set", "num_heads=6"]) == 0
    assert cli(["phantom", "--out", os.path.join(tmp, "phantom"), "--cases", str(args.cases), "--shape", args.shape,
                "--workers", "1", "--quiet"]) == 0
    cohort = read_manifest(os.path.join(tmp, "phantom", "manifest.csv"))
    print(f"model {model}; {len(cohort.cases)} phantom cases of {args.shape}")
    print(f"{'case':8s} {'cancer Dice':>11s} {'max |dp|':>9s} {'gland Dice':>10s} {'voxels with/without':>20s}")
    dices = []
    for c in cohort.cases:
        a = predict_sequence(model, c.paths["t2w"], c.paths["gland"], progress=False, gland_labels=(1, 2))
        b = predict_sequence(model, c.paths["t2w"], None, progress=False)
        gland = load_volume(c.paths["gland"]).data > 0
        gd = _dice(b.gland > 0, gland) if b.gland is not None else float("nan")
        d = _dice(a.label > 0, b.label > 0)
        dices.append(d)
        print(f"{c.case_id:8s} {d:11.3f} {np.abs(a.prob - b.prob).max():9.3f} {gd:10.3f} "
              f"{int(a.label.sum()):>9d}/{int(b.label.sum()):<9d}  ({b.gland_source})")
    print(f"mean cancer-label Dice with vs without the true gland: {np.mean(dices):.3f}")


if __name__ == "__main__":
    main()
