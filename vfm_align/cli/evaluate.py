"""``vfm-align evaluate``: score a folder of ``vfm-align infer`` outputs against a manifest's references.

Targets are built exactly as fine-tuning builds them (the preprocessing cache's recipe, then the
task's ``make``), and predictions are read from each case's outputs and reoriented the same way, so
the headline numbers are the task's own ``evaluate`` on these predictions (``task_metrics``).

Conventions (every JSON number is finite; a metric that is undefined is written as null):

* segmentation, per case and class: Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN); a
  class absent from both prediction and reference scores 1.0 for both (nothing to find, nothing
  found), so per-case means never hold NaN. ``task_metrics`` are the task's Dice pooled over cases;
* classification: bootstrap over cases (resampled with replacement, ``--bootstrap`` times, seeded),
  95% percentile intervals; resamples with a single class are skipped for AUROC.
"""

from __future__ import annotations

import math
import os


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score vfm-align infer outputs against a manifest (nnU-Net summary.json, picai_eval metrics, ...)",
        description=(
            "Read each case's prediction (PRED/<case_id>/prediction.json and its maps) and the manifest's reference, "
            "and write: segmentation summary.json (nnU-Net layout: per case and mean Dice, IoU, TP/FP/FN/TN, n_pred, "
            "n_ref per class); detection metrics.json (picai_eval AP, AUROC, ranking score, PR/ROC/FROC curves); "
            "classification metrics.json (AUROC, balanced accuracy, bootstrap 95%% intervals); restoration "
            "metrics.json (PSNR, SSIM, NCC inside the gland); and a PNG figure."
        ),
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="output folder of vfm-align infer --data")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="the cohort manifest with the references")
    p.add_argument("--task", required=True, help="segmentation, detection, classification, super_resolution or "
                                                 "distortion_correction")
    p.add_argument("--split", default="test", help="manifest split (default test; 'all' for every case)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the metrics (default: --pred)")
    p.add_argument("--bootstrap", type=int, default=1000, help="classification bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _finite(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers, recursively."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def load_cases(pred_dir, data, task, split="all", progress=False):
    """[(case_id, prediction sidecar, prediction on the training grid, target, gland)] for the cases of ``split``."""
    import numpy as np
    from tqdm.auto import tqdm

    from vfm_align.data.cache import Recipe, preprocess_case
    from vfm_align.data.cohort import read_manifest
    from vfm_align.data.nifti import load_volume
    from vfm_align.errors import DataError
    from vfm_align.infer.outputs import read_sidecar
    from vfm_align.infer.volume import to_canonical_array

    cohort = read_manifest(data)
    cases = cohort.cases if split == "all" else cohort.split(split)
    if not cases:
        raise DataError(f"{data}: no cases in split '{split}'")
    rows = []
    for c in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        case_dir = os.path.join(pred_dir, c.case_id)
        side = read_sidecar(case_dir)
        sample = preprocess_case(c, Recipe(), cohort.classes)
        sample = {**sample, "labels": dict(c.labels), "case_id": c.case_id, "spacing": sample["meta"]["spacing"]}
        target = task.make(sample)[1]
        role = {"segmentation": "label", "detection": "likelihood"}.get(task.name, "restored")
        if task.kind == "classification":
            if "probabilities" not in side:
                raise DataError(f"{case_dir}: the prediction has no class probabilities (task {side.get('task')})")
            pred = np.asarray(side["probabilities"], np.float64)
        else:
            if role not in side.get("outputs", {}):
                raise DataError(f"{case_dir}: the prediction has no '{role}' map for the {task.name} task "
                                f"(it holds {sorted(side.get('outputs', {}))})")
            vol = load_volume(os.path.join(case_dir, side["outputs"][role]), kind=f"{role} prediction")
            arr = vol.data
            if role == "restored":
                import nibabel as nib

                arr = np.asarray(nib.load(vol.path).dataobj, np.float32).transpose(2, 1, 0, 3)
            arr = to_canonical_array(arr, vol.affine)
            if arr.shape[:3] != np.shape(target)[:3]:
                raise DataError(f"{vol.path}: prediction grid {arr.shape[:3]} differs from case '{c.case_id}' "
                                f"reference {np.shape(target)[:3]}")
            pred = arr
        rows.append((c.case_id, side, pred, target, sample["gland"]))
    return rows


def segmentation_summary(rows, task) -> dict:
    """nnU-Net's summary.json layout, plus the task's own pooled metrics."""
    import numpy as np

    from vfm_align.data import metrics as M

    classes = list(range(1, task.num_outputs))
    per_case = []
    for cid, side, pred, target, _ in rows:
        conf = M.confusion_per_class(pred, target, classes)
        dice = M.dice_per_class(pred, target, classes)
        m = {}
        for k in classes:
            c = conf[k]
            empty = c["TP"] + c["FP"] + c["FN"] == 0
            iou = 1.0 if empty else c["TP"] / (c["TP"] + c["FP"] + c["FN"])
            m[str(k)] = {"Dice": 1.0 if empty else dice[k], "IoU": iou,
                         **c}
        per_case.append({"case_id": cid, "prediction_file": side["outputs"]["label"], "metrics": m})
    keys = ("Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref")
    mean = {str(k): {key: float(np.mean([c["metrics"][str(k)][key] for c in per_case])) for key in keys}
            for k in classes}
    fg = {key: float(np.mean([mean[str(k)][key] for k in classes])) for key in keys}
    task_metrics = task.evaluate([r[2] for r in rows], [r[3] for r in rows])
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": fg, "task_metrics": task_metrics,
            "conventions": "class absent from prediction and reference: Dice = IoU = 1; task_metrics: Dice pooled "
                           "over all cases' voxels (the task's own evaluate)"}


def detection_metrics(rows, task) -> tuple[dict, object]:
    from vfm_align.data import metrics as M

    preds, targets = [r[2] for r in rows], [r[3] for r in rows]
    m = M.picai_metrics(preds, targets)
    out = {"task_metrics": task.evaluate(preds, targets), "AP": m.AP, "auroc": m.auroc, "ranking_score": m.score,
           "num_cases": m.num_cases, "num_lesions": m.num_lesions,
           "curves": {"precision": list(m.precision), "recall": list(m.recall), "case_FPR": list(m.case_FPR),
                      "case_TPR": list(m.case_TPR), "lesion_FPR": list(m.lesion_FPR),
                      "lesion_TPR": list(m.lesion_TPR)},
           "case_scores": {r[0]: r[1].get("case_score") for r in rows}}
    return out, m


def classification_metrics(rows, task, n_boot: int, seed: int) -> dict:
    import numpy as np

    probs = np.stack([r[2] for r in rows])
    y = np.asarray([int(r[3]) for r in rows])
    base = task.evaluate(probs, y)
    rng = np.random.default_rng(seed)
    boot = {k: [] for k in base}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        for k, v in task.evaluate(probs[idx], y[idx]).items():
            if math.isfinite(v):
                boot[k].append(v)
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None for k, v in boot.items()}
    return {"task_metrics": base, "ci95": ci, "bootstrap": {"resamples": n_boot, "used": len(boot["auroc"]),
                                                             "seed": seed},
            "cases": {r[0]: {"label": int(r[3]), "probabilities": [float(p) for p in r[2]]} for r in rows}}


def restoration_metrics(rows, task) -> dict:
    per_case = {r[0]: task.evaluate([r[2]], [r[3]], [r[4]]) for r in rows}
    return {"task_metrics": task.evaluate([r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]),
            "per_case": per_case}


def _figure(path, task, result, rows, picai):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vfm_align.atomic import atomic_file

    if task.name == "detection":
        fig, ax = plt.subplots(1, 2, figsize=(9, 4))
        ax[0].plot(picai.lesion_FPR, picai.lesion_TPR)
        ax[0].set(xscale="log", xlabel="false positives per case", ylabel="sensitivity", title="FROC (lesion)")
        ax[1].plot(picai.case_FPR, picai.case_TPR)
        ax[1].plot([0, 1], [0, 1], ":", color="grey")
        ax[1].set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (case), AUROC {picai.auroc:.3f}")
    elif task.name == "segmentation":
        fig, ax = plt.subplots(figsize=(5, 4))
        classes = list(result["mean"])
        ax.boxplot([[c["metrics"][k]["Dice"] for c in result["metric_per_case"]] for k in classes])
        ax.set_xticks(range(1, len(classes) + 1), [f"class {k}" for k in classes])
        ax.set(ylabel="Dice per case", title="Segmentation")
    elif task.kind == "classification":
        p = np.stack([r[2] for r in rows])[:, -1 if task.num_outputs == 2 else 0]
        y = np.asarray([int(r[3]) for r in rows]) == (1 if task.num_outputs == 2 else 0)
        order = np.argsort(-p, kind="stable")
        tpr = np.concatenate([[0], np.cumsum(y[order]) / max(y.sum(), 1)])
        fpr = np.concatenate([[0], np.cumsum(~y[order]) / max((~y).sum(), 1)])
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (case)")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = ("psnr", "ssim", "ncc")
        ax.boxplot([[v[n] for v in result["per_case"].values()] for n in names])
        ax.set_xticks(range(1, 4), names)
        ax.set(title=f"{task.name} per case")
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def run(args) -> int:
    from vfm_align.atomic import write_json
    from vfm_align.data.tasks import get_task
    from vfm_align.errors import ConfigError

    task = get_task(args.task)
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    out = args.out or args.pred
    rows = load_cases(args.pred, args.data, task, args.split, progress=not args.quiet)
    picai = None
    if task.name == "segmentation":
        result, name = segmentation_summary(rows, task), "summary.json"
    elif task.name == "detection":
        (result, picai), name = detection_metrics(rows, task), "metrics.json"
    elif task.kind == "classification":
        result, name = classification_metrics(rows, task, args.bootstrap, args.seed), "metrics.json"
    else:
        result, name = restoration_metrics(rows, task), "metrics.json"
    result = _finite({"task": task.name, "num_cases": len(rows), **result})
    write_json(os.path.join(out, name), result)
    png = os.path.join(out, f"{task.name}.png")
    _figure(png, task, result, rows, picai)
    tm = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["task_metrics"].items())
    print(f"{task.name}: {len(rows)} case(s): {tm}; wrote {os.path.join(out, name)} and {png}")
    return 0
