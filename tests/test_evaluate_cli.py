"""`vfm-align evaluate`: its numbers equal the task's own evaluate on the same predictions."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from vfm_align.cli import main as cli_main
from vfm_align.cli.evaluate import case_scores, load_cases, slice_centre, worst_and_best
from vfm_align.data.nifti import load_volume
from vfm_align.data.tasks import get_task
from vfm_align.infer.outputs import write_case

SHAPE_XYZ = (13, 11, 5)
LAS = np.array([[-0.6, 0, 0, 10.0], [0, 0.7, 0, -5.0], [0, 0, 3.0, 0.0], [0, 0, 0, 1]])


def _write(path, data_xyz):
    nib.save(nib.Nifti1Image(np.asarray(data_xyz), LAS), str(path))
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 cases: T2w/DWI/ADC, zonal gland masks (case c2 has no PZ), lesion grades; a CSV manifest."""
    d = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        gland = np.zeros(SHAPE_XYZ, np.uint8)
        gland[3:10, 2:9, 1:4] = 1
        if i != 2:
            gland[3:10, 2:4, 1:4] = 2
        lesion = np.zeros(SHAPE_XYZ, np.uint8)
        if i != 1:
            lesion[5:8, 5:8, 2:4] = 3 if i == 0 else 1
        paths = {n: _write(d / f"c{i}_{n}.nii.gz", rng.integers(10, 500, SHAPE_XYZ).astype(np.float32))
                 for n in ("t2w", "dwi", "adc")}
        paths["gland"] = _write(d / f"c{i}_gland.nii.gz", gland)
        paths["lesion"] = _write(d / f"c{i}_lesion.nii.gz", lesion)
        rows.append({"case_id": f"c{i}", "split": "test", **paths, "cspca": int(i == 0)})
    manifest = d / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"manifest": str(manifest), "rows": rows, "dir": d}


def _png_height(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[0]


def _chosen(tmp_path, manifest, task_name, result):
    """worst_and_best as `evaluate` computes it, from the written predictions and metrics."""
    task = get_task(task_name)
    return worst_and_best(case_scores(task, result, load_cases(str(tmp_path), manifest, task, "all")))


def _masks(row, name):
    return np.asarray(nib.load(row[name]).dataobj).transpose(2, 1, 0).astype(np.int32)  # (D, H, W), native grid


def test_segmentation_summary(cohort, tmp_path):
    rng = np.random.default_rng(1)
    preds, targets = [], []
    for row in cohort["rows"]:
        ref = load_volume(row["t2w"])
        target = _masks(row, "gland")
        label = np.where(rng.random(target.shape) < 0.1, rng.integers(0, 3, target.shape), target)
        if row["case_id"] == "c2":
            label[label == 2] = 0  # PZ absent from both: the empty-empty convention
        prob = np.eye(3, dtype=np.float32)[label]
        write_case(str(tmp_path / row["case_id"]), "segmentation", ref, {"prob": prob}, {"case_id": row["case_id"]},
                   threshold=0.5)
        preds.append(label)
        targets.append(target)
    assert cli_main(["evaluate", "--pred", str(tmp_path), "--data", cohort["manifest"], "--task", "segmentation",
                     "--quiet"]) == 0
    s = json.load(open(tmp_path / "summary.json"))
    expected = get_task("segmentation").evaluate(preds, targets)
    assert s["task_metrics"] == pytest.approx(expected, abs=1e-12)
    for case, p, t in zip(s["metric_per_case"], preds, targets):
        for k in ("1", "2"):
            m = case["metrics"][k]
            tp, fp, fn = int(np.sum((p == int(k)) & (t == int(k)))), int(np.sum((p == int(k)) & (t != int(k)))), \
                int(np.sum((p != int(k)) & (t == int(k))))
            assert (m["TP"], m["FP"], m["FN"]) == (tp, fp, fn)
            assert m["Dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
            assert m["IoU"] == pytest.approx(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
    assert s["metric_per_case"][2]["metrics"]["2"]["Dice"] == 1.0
    assert s["mean"]["1"]["Dice"] == pytest.approx(np.mean([c["metrics"]["1"]["Dice"] for c in s["metric_per_case"]]))
    assert _png_height(tmp_path / "segmentation.png") > 400  # the box plot and two rows of overlays below it
    # the overlaid worst / best cases: arg-min / arg-max of the per-case mean foreground Dice, computed here
    dice = []
    for p, t in zip(preds, targets):
        per_class = [2 * np.sum((p == k) & (t == k)) / (np.sum(p == k) + np.sum(t == k))
                     if np.sum(p == k) + np.sum(t == k) else 1.0 for k in (1, 2)]
        dice.append(np.mean(per_class))
    ids = [r["case_id"] for r in cohort["rows"]]
    assert len(set(np.round(dice, 12))) == 3  # distinct, so the choice is unambiguous
    assert _chosen(tmp_path, cohort["manifest"], "segmentation", s) == (ids[int(np.argmin(dice))],
                                                                         ids[int(np.argmax(dice))])


def test_detection_and_classification(cohort, tmp_path):
    rng = np.random.default_rng(2)
    liks, targets, probs, labels = [], [], [], []
    det_dir, cls_dir = tmp_path / "det", tmp_path / "cls"
    for i, row in enumerate(cohort["rows"]):
        ref = load_volume(row["t2w"])
        target = (_masks(row, "lesion") >= 2).astype(np.int32)
        lik = 0.2 * rng.random(target.shape)
        if i == 0:  # part of the lesion found: 0 < Dice < 1
            lik += 0.7 * target * rng.random(target.shape)
        if i == 2:  # a false positive in a case without csPCa: Dice 0 (c1, with nothing in either, scores 1)
            lik[1, 2:4, 2:4] = 0.9
        lik = lik.astype(np.float32)
        write_case(str(det_dir / row["case_id"]), "detection", ref, {"likelihood": lik}, {"case_id": row["case_id"]},
                   threshold=0.5)
        p = np.array([1 - 0.3 * (i + 1), 0.3 * (i + 1)])
        write_case(str(cls_dir / row["case_id"]), "classification", ref, {"probs": p}, {"case_id": row["case_id"]},
                   threshold=0.5)
        liks.append(lik)
        targets.append(target)
        probs.append(p)
        labels.append(row["cspca"])
    for d, task in ((det_dir, "detection"), (cls_dir, "classification")):
        assert cli_main(["evaluate", "--pred", str(d), "--data", cohort["manifest"], "--task", task, "--quiet",
                         "--bootstrap", "50"]) == 0
        assert os.path.getsize(d / f"{task}.png") > 0
    det = json.load(open(det_dir / "metrics.json"))
    assert _png_height(det_dir / "detection.png") > 400  # FROC/ROC and two rows of overlays
    # worst / best detection case: the Dice of (likelihood > 0.5) against the reference, 1 when both are empty
    dice = []
    for lik, t in zip(liks, targets):
        p = lik > 0.5
        denom = p.sum() + t.sum()
        dice.append(2 * np.sum(p & (t > 0)) / denom if denom else 1.0)
    assert len(set(np.round(dice, 12))) == 3
    ids = [r["case_id"] for r in cohort["rows"]]
    assert _chosen(det_dir, cohort["manifest"], "detection", det) == (ids[int(np.argmin(dice))],
                                                                       ids[int(np.argmax(dice))])
    expected = get_task("detection").evaluate(liks, targets)
    assert det["task_metrics"] == pytest.approx(expected, abs=1e-12)
    assert det["AP"] == pytest.approx(expected["ap"]) and det["ranking_score"] == pytest.approx(expected["picai_score"])
    assert len(det["curves"]["case_TPR"]) == len(det["curves"]["case_FPR"]) > 1
    cls = json.load(open(cls_dir / "metrics.json"))
    expected = get_task("classification").evaluate(np.stack(probs), np.asarray(labels))
    assert cls["task_metrics"] == pytest.approx(expected, abs=1e-12)
    lo, hi = cls["ci95"]["balanced_accuracy"]
    assert lo <= expected["balanced_accuracy"] <= hi


def test_missing_prediction_is_named(cohort, tmp_path, capsys):
    assert cli_main(["evaluate", "--pred", str(tmp_path), "--data", cohort["manifest"], "--task", "segmentation",
                     "--quiet"]) == 1
    assert "c0" in capsys.readouterr().err


def test_restoration_metrics(cohort, tmp_path):
    from vfm_align.data.cache import Recipe, preprocess_case
    from vfm_align.data.cohort import read_manifest
    from vfm_align.infer.volume import from_canonical_array

    task = get_task("super_resolution")
    rng = np.random.default_rng(3)
    preds, targets, glands = [], [], []
    noise = {"c0": 0.1, "c1": 0.4, "c2": 0.02}  # c1 the worst PSNR by construction, c2 the best
    for c in read_manifest(cohort["manifest"]).cases:
        s = preprocess_case(c, Recipe())
        target = task.make({**s, "labels": {}, "case_id": c.case_id, "spacing": s["meta"]["spacing"]})[1]
        pred = (target + noise[c.case_id] * rng.normal(size=target.shape)).astype(np.float32)  # RAS+ training grid
        ref = load_volume(c.paths["t2w"])
        write_case(str(tmp_path / c.case_id), task.name, ref, {"restored": from_canonical_array(pred, ref.affine)},
                   {"case_id": c.case_id}, threshold=0.5)
        preds.append(pred)
        targets.append(target)
        glands.append(s["gland"])
    assert cli_main(["evaluate", "--pred", str(tmp_path), "--data", cohort["manifest"], "--task", task.name,
                     "--quiet"]) == 0
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["task_metrics"] == pytest.approx(task.evaluate(preds, targets, glands), abs=1e-9)
    assert m["per_case"]["c1"] == pytest.approx(task.evaluate(preds[1:2], targets[1:2], glands[1:2]), abs=1e-9)
    # worst / best by PSNR inside the gland, written out here
    psnr = []
    for p, t, g in zip(preds, targets, glands):
        t, p = t[..., 0][g > 0].astype(np.float64), p[..., 0][g > 0].astype(np.float64)
        psnr.append(10 * np.log10((t.max() - t.min()) ** 2 / np.mean((p - t) ** 2)))
    assert (int(np.argmin(psnr)), int(np.argmax(psnr))) == (1, 2)
    assert _chosen(tmp_path, cohort["manifest"], task.name, m) == ("c1", "c2")
    assert _png_height(tmp_path / f"{task.name}.png") > 400


def test_slice_centre_cuts_the_mask():
    crescent = np.zeros((5, 20, 20), np.uint8)
    yy, xx = np.mgrid[:20, :20]
    ring = ((yy - 10) ** 2 + (xx - 10) ** 2 < 64) & ((yy - 10) ** 2 + (xx - 13) ** 2 >= 36)
    crescent[2] = ring
    d, h, w = slice_centre(crescent)
    assert crescent[d, h, w] == 1  # the centroid itself lies outside a crescent; the chosen voxel does not
    fg = np.argwhere(crescent)
    dist = ((fg - fg.mean(0)) ** 2).sum(1)
    assert ((d - fg.mean(0)[0]) ** 2 + (h - fg.mean(0)[1]) ** 2 + (w - fg.mean(0)[2]) ** 2) == pytest.approx(dist.min())
    assert slice_centre(np.zeros((5, 8, 9))) == (2, 4, 4)
