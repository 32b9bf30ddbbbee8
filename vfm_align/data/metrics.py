"""Task metrics on host numpy arrays (evaluation runs once per epoch, outside jit).

Conventions:

* AUROC is the Mann-Whitney statistic with average ranks for ties (equal to the area under the
  empirical ROC curve with ties counted one half). Macro AUROC averages one-vs-rest AUROCs over the
  classes that occur among the labels (a class absent from the labels has no defined AUROC).
* Balanced accuracy is the mean recall over classes present in the labels.
* Dice of a class absent from both prediction and target is NaN and left out of means.
* PSNR, SSIM and NCC are computed on a volume but averaged inside a mask (the gland):
  PSNR = 10 log10(R^2 / MSE) with R the target's range (max - min) inside the mask; NCC is the
  Pearson correlation of the masked voxels; SSIM is 3D with a Gaussian window (sigma 1.5 voxels,
  truncated at 3.5 sigma, as in Wang et al. 2004 and scikit-image's ``gaussian_weights=True``),
  K1 = 0.01, K2 = 0.03, data range R as for PSNR, local statistics with population variance,
  averaged over the mask's voxels.
* Detection follows PI-CAI: each likelihood map becomes a detection map of lesion candidates
  (``report_guided_annotation.extract_lesion_candidates``), then ``picai_eval.evaluate`` matches
  candidates to ground-truth lesions (IoU > 0.1) and gives lesion-level average precision and
  case-level AUROC (case score = max of the map); the PI-CAI score is their mean.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata


def auroc(scores, labels) -> float:
    """Binary AUROC; ``labels`` in {0, 1}. NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(probs, labels) -> float:
    """One-vs-rest AUROC averaged over the classes present in ``labels``; ``probs`` is (N, K)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).ravel()
    vals = [auroc(p[:, k], y == k) for k in np.unique(y)]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def balanced_accuracy(pred, labels) -> float:
    pred = np.asarray(pred).ravel()
    y = np.asarray(labels).ravel()
    return float(np.mean([np.mean(pred[y == k] == k) for k in np.unique(y)]))


def dice_per_class(pred, target, classes) -> dict:
    """{class: Dice} for integer label maps; NaN when the class is absent from both."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = {}
    for k in classes:
        p, t = pred == k, target == k
        denom = p.sum() + t.sum()
        out[int(k)] = float(2.0 * np.logical_and(p, t).sum() / denom) if denom else float("nan")
    return out


def _range_in(target, mask):
    vals = target[mask]
    return float(vals.max() - vals.min())


def psnr(pred, target, mask, data_range: float | None = None) -> float:
    mask = np.asarray(mask, bool)
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    r = _range_in(target, mask) if data_range is None else float(data_range)
    mse = float(np.mean((pred[mask] - target[mask]) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(r * r / mse))


def ncc(pred, target, mask) -> float:
    mask = np.asarray(mask, bool)
    a = np.asarray(pred, np.float64)[mask]
    b = np.asarray(target, np.float64)[mask]
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def ssim_map(pred, target, data_range: float, sigma: float = 1.5, truncate: float = 3.5,
             k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Voxel-wise 3D SSIM with a Gaussian window (see the module docstring)."""
    x, y = np.asarray(pred, np.float64), np.asarray(target, np.float64)

    def blur(a):
        return ndimage.gaussian_filter(a, sigma, truncate=truncate, mode="reflect")

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(pred, target, mask, data_range: float | None = None, **kw) -> float:
    mask = np.asarray(mask, bool)
    r = _range_in(np.asarray(target, np.float64), mask) if data_range is None else float(data_range)
    return float(ssim_map(pred, target, r, **kw)[mask].mean())


def picai_metrics(likelihoods, targets, *, extract: bool = True):
    """The ``picai_eval.Metrics`` object (AP, AUROC, score and their curves) of per-case maps.

    ``likelihoods``: per case (D, H, W) maps in [0, 1] (or detection maps with ``extract=False``);
    ``targets``: per case binary csPCa lesion masks.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # both packages print citation banners on import
        from picai_eval import evaluate
        from report_guided_annotation import extract_lesion_candidates
    if extract:
        dets = [extract_lesion_candidates(np.asarray(p, np.float32))[0] for p in likelihoods]
    else:
        dets = [np.asarray(p, np.float32) for p in likelihoods]
    truths = [(np.asarray(t) > 0).astype(np.int32) for t in targets]
    return evaluate(y_det=dets, y_true=truths, num_parallel_calls=1)


def picai_detection(likelihoods, targets, *, extract: bool = True) -> dict:
    """PI-CAI lesion-level AP, case-level AUROC and their mean ("score"); arguments as :func:`picai_metrics`."""
    m = picai_metrics(likelihoods, targets, extract=extract)
    return {"ap": float(m.AP), "auroc": float(m.auroc), "picai_score": float(m.score)}


def confusion_per_class(pred, target, classes) -> dict:
    """{class: {"TP", "FP", "FN", "TN", "n_pred", "n_ref"}} voxel counts of integer label maps."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = {}
    for k in classes:
        p, t = pred == k, target == k
        tp, fp, fn = int(np.sum(p & t)), int(np.sum(p & ~t)), int(np.sum(~p & t))
        out[int(k)] = {"TP": tp, "FP": fp, "FN": fn, "TN": int(p.size - tp - fp - fn), "n_pred": int(p.sum()),
                       "n_ref": int(t.sum())}
    return out
