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


def _dice_iou(c: dict) -> dict:
    """Dice and IoU of one class's voxel counts; both 1.0 when the class is absent from prediction and reference."""
    union = c["TP"] + c["FP"] + c["FN"]
    if union == 0:
        return {"Dice": 1.0, "IoU": 1.0}
    return {"Dice": 2 * c["TP"] / (union + c["TP"]), "IoU": c["TP"] / union}


def segmentation_summary(rows, task) -> dict:
    """nnU-Net's summary.json layout, plus the task's own pooled metrics."""
    import numpy as np

    from vfm_align.data import metrics as M

    classes = list(range(1, task.num_outputs))
    per_case = []
    for cid, side, pred, target, _ in rows:
        conf = M.confusion_per_class(pred, target, classes)
        m = {str(k): {**_dice_iou(conf[k]), **conf[k]} for k in classes}
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


def case_scores(task, result, rows) -> dict:
    """{case_id: score} ranking the cases for the worst/best overlays (higher is better).

    * segmentation: the case's Dice averaged over the foreground classes (``summary.json``'s per-case Dice);
    * detection: the Dice of the case's lesion label (likelihood > the threshold its prediction was made with)
      against the reference csPCa mask, 1.0 when both are empty; a missed lesion and a false positive in a
      lesion-free case both score 0. This is the case-level view of what the overlay shows; picai_eval's
      lesion-level matching has no per-case score to rank by;
    * restoration: PSNR inside the gland (averaged over the restored channels).
    """
    import numpy as np

    from vfm_align.data import metrics as M

    if task.name == "segmentation":
        return {c["case_id"]: float(np.mean([m["Dice"] for m in c["metrics"].values()]))
                for c in result["metric_per_case"]}
    if task.name == "detection":
        out = {}
        for cid, side, pred, target, _ in rows:
            label = (np.asarray(pred) > float(side.get("threshold", 0.5))).astype(np.int32)
            out[cid] = _dice_iou(M.confusion_per_class(label, np.asarray(target), (1,))[1])["Dice"]
        return out
    if task.kind == "dense_regression":
        return {cid: v["psnr"] for cid, v in result["per_case"].items()}
    return {}


def worst_and_best(scores: dict) -> tuple[str, str] | None:
    """(worst, best) case ids: arg-min and arg-max of ``scores`` (first in case order on ties; undefined scores
    skipped); None when no case has a defined score."""
    import numpy as np

    ids = list(scores)
    v = np.asarray([np.nan if scores[i] is None else scores[i] for i in ids], np.float64)
    if not ids or np.all(np.isnan(v)):
        return None
    return ids[int(np.nanargmin(v))], ids[int(np.nanargmax(v))]


def slice_centre(mask) -> tuple:
    """(d, h, w) where the three orthogonal slices cross: the foreground voxel nearest the foreground's centroid
    (so every slice cuts the lesion, even a crescent-shaped one), the volume centre when ``mask`` is empty."""
    import numpy as np

    mask = np.asarray(mask) > 0
    fg = np.argwhere(mask)
    if not len(fg):
        return tuple(s // 2 for s in mask.shape)
    c = fg.mean(axis=0)
    return tuple(int(i) for i in fg[np.argmin(((fg - c) ** 2).sum(axis=1))])


def _orthogonal(vol, centre):
    """Axial, coronal and sagittal slices of a (D, H, W) RAS+ volume through ``centre`` (rows, cols)."""
    d, h, w = centre
    return [vol[d], vol[:, h, :], vol[:, :, w]]


def _overlay_panels(subfig, panels, spacing, title):
    """``panels``: [(row name, (D,H,W) image, [(mask, colour, linestyle)] contours)], one row of 3 views each."""
    import numpy as np

    sd, sh, sw = spacing
    aspects = (sh / sw, sd / sw, sd / sh)
    views = ("axial", "coronal", "sagittal")
    axes = np.atleast_2d(subfig.subplots(len(panels), 3))
    centre = panels[0][3]
    for r, (name, img, contours, _) in enumerate(panels):
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
        for j, (sl, asp) in enumerate(zip(_orthogonal(img, centre), aspects)):
            ax = axes[r, j]
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", aspect=asp,
                      interpolation="nearest")
            for mask, colour, style in contours:
                m = _orthogonal(mask, centre)[j]
                for k in np.unique(m[m > 0]):
                    ax.contour((m == k).astype(np.float32), levels=[0.5], colors=colour, linestyles=style,
                               linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(views[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    subfig.subplots_adjust(top=0.8 if len(panels) == 1 else 0.9)
    subfig.suptitle(title, fontsize=9)


def _case_inputs(data, case_id, task):
    """(T2w or restoration input channel (D, H, W), spacing) of one manifest case on the RAS+ training grid."""
    import numpy as np

    from vfm_align.data.cache import Recipe, preprocess_case
    from vfm_align.data.cohort import read_manifest

    cohort = read_manifest(data)
    case = next(c for c in cohort.cases if c.case_id == case_id)
    sample = preprocess_case(case, Recipe(), cohort.classes)
    spacing = tuple(float(s) for s in sample["meta"]["spacing"])
    if task.kind == "dense_regression":
        s = {**sample, "labels": dict(case.labels), "case_id": case_id, "spacing": spacing}
        return np.asarray(task.make(s)[0][..., task.restore_from or 0]), spacing
    return np.asarray(sample["image"][..., 0]), spacing


def _summary_plot(subfig, task, result, rows, picai):
    import numpy as np

    if task.name == "detection":
        ax = subfig.subplots(1, 2)
        ax[0].plot(picai.lesion_FPR, picai.lesion_TPR)
        ax[0].set(xscale="log", xlabel="false positives per case", ylabel="sensitivity", title="FROC (lesion)")
        ax[1].plot(picai.case_FPR, picai.case_TPR)
        ax[1].plot([0, 1], [0, 1], ":", color="grey")
        ax[1].set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (case), AUROC {picai.auroc:.3f}")
    elif task.name == "segmentation":
        ax = subfig.subplots()
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
        ax = subfig.subplots()
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (case)")
    else:
        ax = subfig.subplots()
        names = ("psnr", "ssim", "ncc")
        ax.boxplot([[v[n] for v in result["per_case"].values()] for n in names])
        ax.set_xticks(range(1, 4), names)
        ax.set(title=f"{task.name} per case")


def _figure(path, task, result, rows, picai, data):
    """The task's summary plot; for dense tasks, below it, three orthogonal slices of the worst and best case by
    :func:`case_scores`: T2w with the reference (green, solid) and predicted (red, dashed) contours per class,
    through the reference's centre (:func:`slice_centre`; the prediction's when the reference is empty, so a
    false positive is seen; else the volume centre), or a restoration's input, prediction and target through
    the gland's centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vfm_align.atomic import atomic_file

    scores = case_scores(task, result, rows)
    chosen = worst_and_best(scores)
    if chosen is None:
        fig = plt.figure(figsize=(9, 4))
        _summary_plot(fig, task, result, rows, picai)
    else:
        restore = task.kind == "dense_regression"
        n = 3 if restore else 1
        fig = plt.figure(figsize=(9, 4 + 2 * 2.6 * n))
        top, *cases = fig.subfigures(3, 1, height_ratios=[4, 2.6 * n, 2.6 * n])
        _summary_plot(top, task, result, rows, picai)
        by_id = {r[0]: r for r in rows}
        metric = "PSNR" if restore else "Dice"
        for sub, which, cid in zip(cases, ("worst", "best"), chosen):
            _, _, pred, target, gland = by_id[cid]
            image, spacing = _case_inputs(data, cid, task)
            title = f"{which} case {cid}: {metric} {scores[cid]:.3f}"
            if not restore:
                title += " (reference green, prediction red dashed)"
            if restore:
                centre = slice_centre(gland)
                panels = [("input", image, [], centre), ("prediction", np.asarray(pred)[..., 0], [], centre),
                          ("target", np.asarray(target)[..., 0], [], centre)]
            else:
                target = np.asarray(target)
                label = np.asarray(pred)
                if task.name == "detection":
                    label = (label > float(by_id[cid][1].get("threshold", 0.5))).astype(np.int32)
                centre = slice_centre(target if np.any(target) else label)  # a false positive shows
                panels = [("T2w", image, [(target, "lime", "solid"), (label, "red", "dashed")], centre)]
            _overlay_panels(sub, panels, spacing, title)
    if chosen is None:
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
    _figure(png, task, result, rows, picai, args.data)
    tm = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["task_metrics"].items())
    print(f"{task.name}: {len(rows)} case(s): {tm}; wrote {os.path.join(out, name)} and {png}")
    return 0
