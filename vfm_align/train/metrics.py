"""Validation metrics computed on the host from gathered predictions, one primary metric per task kind.

(A minimal set for monitoring fine-tuning; the study's full per-task metrics live with the tasks.)
"""

from __future__ import annotations

import numpy as np

PRIMARY = {"label": "accuracy", "dense": "dice", "restore": "psnr"}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    from scipy.stats import rankdata

    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def evaluate(kind: str, pred: np.ndarray, target: np.ndarray) -> dict:
    pred = np.asarray(pred, np.float64)
    if kind == "label":
        out = {"accuracy": float((pred.argmax(-1) == target).mean())}
        if pred.shape[-1] == 2:
            out["auc"] = _auc(pred[:, 1] - pred[:, 0], target)
        return out
    if kind == "dense":
        k = pred.shape[-1]
        lab = pred.argmax(-1)
        dices = []
        for c in range(1 if k > 1 else 0, k):
            a, b = lab == c, target == c
            denom = a.sum() + b.sum()
            if denom:
                dices.append(2.0 * np.logical_and(a, b).sum() / denom)
        return {"dice": float(np.mean(dices)) if dices else float("nan")}
    if kind == "restore":
        err = pred - np.asarray(target, np.float64)
        mse = float(np.mean(err**2))
        rng = float(np.ptp(target)) or 1.0
        return {"psnr": float(10 * np.log10(rng**2 / max(mse, 1e-20))), "l1": float(np.abs(err).mean())}
    raise ValueError(f"unknown task kind '{kind}'")
