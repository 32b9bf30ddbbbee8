"""The study's view of a cohort: every case preprocessed once, and per-task (input, target) arrays.

Tasks, their inputs, targets and metrics are those of :mod:`vfm_align.data.tasks`; this module only
stacks them into in-memory arrays for the short fine-tuning runs of the study and turns raw model
outputs into what each task's ``evaluate`` expects.
"""

from __future__ import annotations

import os

import numpy as np

from vfm_align.data.augment import crop_or_pad
from vfm_align.data.cache import Recipe, preprocess_case
from vfm_align.data.cohort import read_manifest
from vfm_align.data.preprocess_profound import plan_center_crop_pad
from vfm_align.data.tasks import TASKS, get_task
from vfm_align.errors import DataError

__all__ = ["TASKS", "load_cohort", "make_task_data", "fit_task_data", "evaluate"]


def _center_crop(a: np.ndarray, hw) -> np.ndarray:
    h, w = a.shape[1:3]
    if hw[0] > h or hw[1] > w:
        raise DataError(f"crop {tuple(hw)} is larger than the in-plane size {(h, w)}")
    y0, x0 = (h - hw[0]) // 2, (w - hw[1]) // 2
    return np.ascontiguousarray(a[:, y0:y0 + hw[0], x0:x0 + hw[1]])


def load_cohort(manifest: str | os.PathLike, *, crop=None, grid=None, spacing=None) -> dict:
    """Every case of a manifest, preprocessed (RAS+, per-channel non-zero z-score) and stacked.

    ``spacing`` (D, H, W) mm: resample every case to it first (None: keep each case's grid).
    ``grid`` (D, H, W): then centre crop / zero pad every case to it (a real cohort's cases differ in size).
    ``crop`` (H, W): keep the in-plane centre only (the gland sits near the centre of the field of
    view), so small models see it at full resolution.
    """
    cohort = read_manifest(os.fspath(manifest))
    recipe = Recipe(spacing=tuple(float(v) for v in spacing) if spacing else None)
    samples = []
    for case in cohort.cases:
        p = preprocess_case(case, recipe)
        if grid:
            p = crop_or_pad(p, grid)
        if crop:
            p = {**p, **{k: _center_crop(p[k], crop) for k in ("image", "gland", "lesion")}}
        samples.append({"image": p["image"], "gland": p["gland"], "lesion": p["lesion"], "labels": dict(case.labels),
                        "case_id": case.case_id, "spacing": tuple(p["meta"]["spacing"]), "split": case.split})
    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise DataError(f"{manifest}: the study needs every case on one grid; found shapes {sorted(shapes)} "
                        "(resample with a preprocessing recipe first)")
    return {
        "samples": samples,
        "image": np.stack([s["image"] for s in samples]),
        "lesion": np.stack([s["lesion"] for s in samples]),
        "split": np.array([s["split"] for s in samples]),
        "case_id": np.array([s["case_id"] for s in samples]),
    }


def make_task_data(cohort: dict, task: str, *, seed: int = 0) -> dict:
    """{"train": {"image", "target"}, "val" and "test": {"image", "target", "gland"}}, by the manifest's split.

    Validation drives the evaluation curves (and so convergence); test gives the final metric, once.
    """
    t = get_task(task, seed=seed)
    split = cohort["split"]
    missing = [s for s in ("train", "val", "test") if not (split == s).any()]
    if missing:
        raise DataError(f"the fine-tuning cohort needs train, val and test cases (manifest 'split' column); "
                        f"none in {missing}")
    made = [t.make(s) for s in cohort["samples"]]
    x = np.stack([m[0] for m in made])
    y = np.stack([np.asarray(m[1]) for m in made])
    gland = np.stack([s["gland"] for s in cohort["samples"]])
    out = {"train": {"image": x[split == "train"], "target": y[split == "train"]}}
    for s in ("val", "test"):
        out[s] = {"image": x[split == s], "target": y[split == s], "gland": gland[split == s]}
    return out


def fit_task_data(data: dict, shape) -> dict:
    """:func:`make_task_data`'s arrays centre cropped / zero padded to a backbone's input ``shape`` (D, H, W):
    images and every voxel-wise target or mask; labels are left as they are."""
    shape = tuple(int(s) for s in shape)
    out = {}
    for split, arrays in data.items():
        grid = tuple(arrays["image"].shape[1:4])
        if grid == shape:
            out[split] = arrays
            continue
        plan = plan_center_crop_pad(grid, shape)
        out[split] = {k: (np.stack([plan.apply(a) for a in v]) if v.ndim >= 4 and v.shape[1:4] == grid else v)
                      for k, v in arrays.items()}
    return out


def evaluate(task: str, out: np.ndarray, val: dict, *, seed: int = 0) -> float:
    """The task's primary metric from raw model outputs (logits or restored volumes) on one split's data."""
    t = get_task(task, seed=seed)
    preds = t.predictions(np.asarray(out, np.float32))
    return float(t.evaluate(preds, val["target"], val["gland"])[t.primary])
