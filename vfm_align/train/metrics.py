"""Validation metrics computed on the host from gathered predictions, one primary metric per task kind.

(A minimal set for monitoring fine-tuning; the study's full per-task metrics live with the tasks.)
"""

from __future__ import annotations

import numpy as np

from vfm_align.data.metrics import auroc, dice_per_class

PRIMARY = {"label": "accuracy", "dense": "dice", "restore": "psnr"}


def evaluate(kind: str, pred: np.ndarray, target: np.ndarray) -> dict:
    pred = np.asarray(pred, np.float64)
    if kind == "label":
        out = {"accuracy": float((pred.argmax(-1) == target).mean())}
        if pred.shape[-1] == 2:
            out["auc"] = auroc(pred[:, 1] - pred[:, 0], target)
        return out
    if kind == "dense":
        k = pred.shape[-1]
        per_class = dice_per_class(pred.argmax(-1), target, range(1 if k > 1 else 0, k))
        dices = [d for d in per_class.values() if not np.isnan(d)]
        return {"dice": float(np.mean(dices)) if dices else float("nan")}
    if kind == "restore":
        err = pred - np.asarray(target, np.float64)
        mse = float(np.mean(err**2))
        rng = float(np.ptp(target)) or 1.0
        return {"psnr": float(10 * np.log10(rng**2 / max(mse, 1e-20))), "l1": float(np.abs(err).mean())}
    raise ValueError(f"unknown task kind '{kind}'")
