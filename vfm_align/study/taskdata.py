"""The study's five tasks on an in-memory cohort: inputs, targets and one primary metric each.

A stand-in for ``vfm_align.data.tasks`` (not yet in the package) so the study can run end to end;
it reads the phantom cohort (or any cohort with the same manifest columns) with
``vfm_align.data.nifti``. Every metric is "higher is better", so gains and convergence are read the
same way for all tasks.

Inputs are channels-last (N, D, H, W, 3) volumes [T2w, ADC, DWI], each channel z-scored over its
non-zero voxels (ProFound's normalisation).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vfm_align.errors import DataError

TASKS = ("classification", "segmentation", "detection", "super_resolution", "distortion_correction")
SEQUENCES = ("t2w", "adc", "dwi")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "label" | "dense" | "restore" (vfm_align.models.task_model kinds)
    loss: str  # a key of vfm_align.train.losses.LOSSES
    num_outputs: int
    metric: str


SPECS = {
    "classification": TaskSpec("classification", "label", "ce", 2, "auroc"),
    "segmentation": TaskSpec("segmentation", "dense", "dice_ce", 3, "dice"),
    "detection": TaskSpec("detection", "dense", "dice_ce", 2, "average_precision"),
    "super_resolution": TaskSpec("super_resolution", "restore", "l1", 3, "psnr"),
    "distortion_correction": TaskSpec("distortion_correction", "restore", "l1", 3, "psnr"),
}


def get_spec(task: str) -> TaskSpec:
    if task not in SPECS:
        raise DataError(f"unknown task '{task}'; known: {list(TASKS)}")
    return SPECS[task]


def _zscore_nonzero(v: np.ndarray) -> np.ndarray:
    nz = v[v != 0]
    if nz.size < 2:
        return np.zeros_like(v, np.float32)
    return ((v - nz.mean()) / max(float(nz.std()), 1e-6)).astype(np.float32) * (v != 0)


def load_cohort(manifest: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every case of a cohort manifest into arrays: image (N,D,H,W,3), gland, lesion, cspca, split."""
    from vfm_align.data.nifti import load_volume

    manifest = os.fspath(manifest)
    root = os.path.dirname(os.path.abspath(manifest))
    try:
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise DataError(f"{manifest}: cohort manifest not found") from None
    if not rows:
        raise DataError(f"{manifest}: no cases")
    need = {*SEQUENCES, "gland", "lesion", "cspca", "split", "case_id"}
    missing = need - set(rows[0])
    if missing:
        raise DataError(f"{manifest}: missing columns {sorted(missing)}")
    images, gland, lesion = [], [], []
    for row in rows:
        vols = [load_volume(os.path.join(root, row[s])).data for s in SEQUENCES]
        shape = vols[0].shape
        if any(v.shape != shape for v in vols) and True:
            raise DataError(f"{manifest}: case {row['case_id']} has sequences of different shapes")
        images.append(np.stack([_zscore_nonzero(v) for v in vols], axis=-1))
        gland.append(load_volume(os.path.join(root, row["gland"]), kind="label").data.astype(np.int32))
        lesion.append(load_volume(os.path.join(root, row["lesion"]), kind="label").data.astype(np.int32))
    try:
        return {
            "image": np.stack(images), "gland": np.stack(gland), "lesion": np.stack(lesion),
            "cspca": np.array([int(r["cspca"]) for r in rows], np.int32),
            "split": np.array([r["split"] for r in rows]),
            "case_id": np.array([r["case_id"] for r in rows]),
        }
    except ValueError as exc:
        raise DataError(f"{manifest}: cases have different grids ({exc})") from exc


def _degrade_resolution(img: np.ndarray) -> np.ndarray:
    """x2 in-plane average pooling then nearest upsampling: the low-resolution acquisition."""
    n, d, h, w, c = img.shape
    low = img.reshape(n, d, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5))
    return np.repeat(np.repeat(low, 2, axis=2), 2, axis=3).astype(np.float32)


def _distort(img: np.ndarray, seed: int, amplitude: float = 2.5) -> np.ndarray:
    """EPI-like distortion: a smooth per-case displacement along H (the phase-encode axis), in voxels."""
    rng = np.random.default_rng(seed)
    n, d, h, w, c = img.shape
    out = np.empty_like(img)
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        a, f1, f2, ph = rng.uniform(0.5, 1.0) * amplitude, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
        disp = a * np.sin(2 * np.pi * f1 * yy / h + ph) * np.cos(np.pi * f2 * (xx / w - 0.5))
        for ch in range(c):
            out[i, ..., ch] = ndimage.map_coordinates(img[i, ..., ch], [zz, yy + disp, xx], order=1, mode="nearest")
    return out


def make_task_data(cohort: dict[str, np.ndarray], task: str, *, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{"train": {"image", "target"}, "val": {...}} for ``task``; validation = the non-train cases."""
    get_spec(task)
    img = cohort["image"]
    if task == "classification":
        x, y = img, cohort["cspca"]
    elif task == "segmentation":
        x, y = img, np.where(cohort["lesion"] > 0, 2, np.where(cohort["gland"] > 0, 1, 0)).astype(np.int32)
    elif task == "detection":
        x, y = img, (cohort["lesion"] >= 2).astype(np.int32)  # ISUP >= 2: clinically significant
    elif task == "super_resolution":
        x, y = _degrade_resolution(img), img
    else:
        x, y = _distort(img, seed), img
    train = cohort["split"] == "train"
    if train.all() or not train.any():
        raise DataError("cohort needs both training and held-out cases (manifest 'split' column)")
    return {"train": {"image": x[train], "target": y[train]}, "val": {"image": x[~train], "target": y[~train]}}


# ---- metrics (numpy; predictions are the model outputs on the validation set) -------------------------

def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half; 0.5 when only one class is present."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each positive (sklearn's AP)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] == 1
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def dice_foreground(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in target or prediction."""
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        denom = p.sum() + t.sum()
        if denom:
            scores.append(2.0 * (p & t).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    rng = float(target.max() - target.min())
    mse = float(np.mean((pred - target) ** 2))
    return float(10 * np.log10(rng ** 2 / max(mse, 1e-12)))


def evaluate(task: str, out: np.ndarray, target: np.ndarray) -> float:
    """The task's primary metric from raw model outputs (logits or restored volumes)."""
    spec = get_spec(task)
    out = np.asarray(out, np.float64)
    if spec.metric == "auroc":
        return auroc(out[:, 1] - out[:, 0], target)
    if spec.metric == "dice":
        return dice_foreground(out.argmax(-1), target, spec.num_outputs)
    if spec.metric == "average_precision":
        return average_precision((out[..., 1] - out[..., 0]).reshape(-1), target.reshape(-1))
    return psnr(out, target)
