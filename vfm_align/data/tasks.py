"""The five downstream tasks: the one definition of each (what it predicts, how it is trained and scored).

Every other layer reads a task from here: :class:`~vfm_align.models.task_model.TaskModel` its ``head``
and ``restore_from``, the train step its ``head`` and default ``loss``, recipes and the study its
``num_outputs``, ``primary`` metric, direction and ``ceiling``.

A *sample* is one preprocessed case: ``{"image": (D, H, W, 3) float32 [T2w, DWI, ADC],
"gland": (D, H, W) uint8 zones, "lesion": (D, H, W) uint8 (ISUP grade per voxel or 0/1),
"labels": {name: int}, "case_id": str, "spacing": (D, H, W) mm}``. ``task.make(sample)``
returns ``(input (D, H, W, 3) float32, target)``; ``task.evaluate(preds, targets, glands)``
returns a dict of metrics whose ``task.primary`` entry ranks models (higher is better for all five);
``task.predictions(outputs)`` turns raw model outputs (logits, restored volumes) into what ``evaluate`` takes.
"""

from __future__ import annotations

import abc
import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vfm_align.data import metrics as M
from vfm_align.errors import ConfigError, DataError

TASKS = ("classification", "segmentation", "detection", "super_resolution", "distortion_correction")
KINDS = ("classification", "segmentation", "dense_regression")
# What TaskModel puts on the backbone: one prediction per case from pooled features ("label"), per-voxel
# logits ("dense") or the corrected volume, residual on the degraded input ("restore").
HEADS = ("label", "dense", "restore")


@dataclass(frozen=True)
class Task(abc.ABC):
    """Base of the five tasks.

    name; kind (one of KINDS: what the target is); head (one of HEADS); num_outputs (logits / channels);
    loss (the default training loss, a key of ``vfm_align.train.losses.LOSSES``); primary (the metric that
    ranks models), higher_is_better and ceiling (its best attainable value, None when unbounded);
    restore_from (restore head: first input channel the output corrects, inputs being [T2w, DWI, ADC]);
    seed (of any per-case randomness the task draws; only distortion correction draws any).

    Default losses: cross-entropy for labels, Dice+CE for dense maps (ProFound's segmentation engine),
    MSE for restoration (ProFound's regression loss), whose minimiser is the conditional mean that PSNR
    rewards. L1's is the conditional median, which stays at the identity when the needed correction is
    ~0 on most voxels and large only at edges (as for thick slices). tests/test_train_loop.py's
    super-resolution check, 30 steps at lr 3e-3: L1 +0.3 dB over the degraded input, MSE +1.6 dB.
    """

    name: str = ""
    kind: str = ""
    head: str = ""
    num_outputs: int = 0
    loss: str = ""
    primary: str = ""
    higher_is_better: bool = True
    ceiling: float | None = 1.0
    restore_from: int | None = None
    seed: int = 0

    def predictions(self, outputs):
        """What :meth:`evaluate` takes from raw model outputs: class probabilities (label head), label
        maps (dense head) or the restored volumes themselves."""
        if self.head == "label":
            return _softmax(outputs)
        if self.head == "dense":
            return np.asarray(outputs).argmax(-1)
        return np.asarray(outputs)

    @abc.abstractmethod
    def make(self, sample: dict):
        """(input (D, H, W, C), target) of one case."""

    @abc.abstractmethod
    def evaluate(self, preds, targets, glands=None) -> dict:
        """Task metrics over a set of predictions."""


@dataclass(frozen=True)
class Classification(Task):
    """Case-level csPCa (binary, ``label="cspca"``) or ISUP grade group (``label="grade"``, 6 classes).

    Predictions are per-case class probabilities (N, K). Metrics: AUROC (binary, or macro
    one-vs-rest), balanced accuracy of the arg-max. Primary: AUROC.
    """

    name: str = "classification"
    kind: str = "classification"
    head: str = "label"
    num_outputs: int = 2
    loss: str = "ce"
    primary: str = "auroc"
    label: str = "cspca"

    def make(self, sample):
        if self.label not in sample["labels"]:
            raise DataError(f"case '{sample['case_id']}': no '{self.label}' label for the classification task")
        return np.asarray(sample["image"], np.float32), np.int32(sample["labels"][self.label])

    def evaluate(self, preds, targets, glands=None):
        p = np.asarray(preds, np.float64)
        y = np.asarray(targets).ravel()
        a = M.auroc(p[:, 1], y) if self.num_outputs == 2 else M.macro_auroc(p, y)
        return {"auroc": a, "balanced_accuracy": M.balanced_accuracy(p.argmax(-1), y)}


@dataclass(frozen=True)
class Segmentation(Task):
    """Zonal anatomy: background / transition zone / peripheral zone per voxel.

    Predictions are label maps (D, H, W). Metrics: Dice of TZ and PZ (pooled over the cases),
    primary: their mean.
    """

    name: str = "segmentation"
    kind: str = "segmentation"
    head: str = "dense"
    num_outputs: int = 3
    loss: str = "dice_ce"
    primary: str = "dice_mean"

    def make(self, sample):
        return np.asarray(sample["image"], np.float32), np.asarray(sample["gland"], np.int32)

    def evaluate(self, preds, targets, glands=None):
        d = M.dice_per_class(np.concatenate([np.ravel(p) for p in preds]),
                             np.concatenate([np.ravel(t) for t in targets]), (1, 2))
        return {"dice_tz": d[1], "dice_pz": d[2], "dice_mean": float(np.nanmean([d[1], d[2]]))}


@dataclass(frozen=True)
class Detection(Task):
    """Clinically significant lesion detection (PI-CAI style).

    Target: voxel-wise csPCa lesion map, 1 where the lesion's ISUP grade >= ``min_grade``
    (``lesion_mask="graded"``, the phantom's format), or 1 on every lesion voxel when the cohort's
    masks are already csPCa-only 0/1 maps (``lesion_mask="binary"``). A graded mask holding only
    grade-1 lesions cannot be told from a binary one by its values, hence the explicit option.
    The model outputs 2 logits per voxel; the softmax of
    channel 1 is the lesion likelihood map it is evaluated on. Metrics: lesion-level AP,
    case-level AUROC and the PI-CAI score (their mean, primary).
    """

    name: str = "detection"
    kind: str = "segmentation"
    head: str = "dense"
    num_outputs: int = 2
    loss: str = "dice_ce"
    primary: str = "picai_score"
    min_grade: int = 2
    lesion_mask: str = "graded"

    def predictions(self, outputs):
        return _softmax(outputs)[..., 1]  # the lesion likelihood map

    def make(self, sample):
        les = np.asarray(sample["lesion"])
        if self.lesion_mask == "graded":
            target = les >= self.min_grade
        elif self.lesion_mask == "binary":
            if les.max() > 1:
                raise DataError(f"case '{sample['case_id']}': lesion mask has values up to {int(les.max())} but the "
                                "detection task was told the masks are binary (lesion_mask='binary')")
            target = les > 0
        else:
            raise ConfigError(f"detection lesion_mask must be 'graded' or 'binary', got '{self.lesion_mask}'")
        return np.asarray(sample["image"], np.float32), target.astype(np.int32)

    def evaluate(self, preds, targets, glands=None):
        return M.picai_detection(preds, targets)


def _softmax(logits) -> np.ndarray:
    """Class probabilities over the last axis, in float32 as the model's outputs (XLA's softmax, so the
    study's metrics do not depend on which host library computed them)."""
    import jax

    return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))


def _dense_eval(preds, targets, glands, names):
    """PSNR / SSIM / NCC inside the gland, per channel then averaged over channels and cases."""
    if glands is None:
        raise DataError("dense-regression metrics need the gland masks (they are computed inside the gland)")
    rows = {"psnr": [], "ssim": [], "ncc": []}
    for p, t, g in zip(preds, targets, glands):
        p, t = np.asarray(p), np.asarray(t)
        mask = np.asarray(g) > 0
        for c in range(t.shape[-1]):
            rows["psnr"].append(M.psnr(p[..., c], t[..., c], mask))
            rows["ssim"].append(M.ssim(p[..., c], t[..., c], mask))
            rows["ncc"].append(M.ncc(p[..., c], t[..., c], mask))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def thick_slices(vol: np.ndarray, factor: int) -> np.ndarray:
    """Average groups of ``factor`` consecutive slices along D (the last group may be shorter), then
    repeat each average back over its slices, so the result is on the thin grid."""
    d = vol.shape[0]
    out = np.empty_like(vol, dtype=np.float32)
    for start in range(0, d, factor):
        out[start:start + factor] = vol[start:start + factor].mean(axis=0, dtype=np.float64)
    return out


@dataclass(frozen=True)
class SuperResolution(Task):
    """Through-plane T2w super-resolution.

    Input: the image with its T2w channel replaced by a thick-slice T2w (slices averaged in groups
    of ``factor`` along z, then repeated back onto the thin grid). Target: the thin T2w (D, H, W, 1).
    Metrics inside the gland: SSIM (primary: bounded by 1, so gains compare across tasks), PSNR, NCC.
    """

    name: str = "super_resolution"
    kind: str = "dense_regression"
    head: str = "restore"
    num_outputs: int = 1
    loss: str = "l2"
    primary: str = "ssim"
    ceiling: float | None = 1.0
    restore_from: int | None = 0  # T2w
    factor: int = 2

    def make(self, sample):
        img = np.array(sample["image"], np.float32)
        thin = img[..., 0].copy()
        img[..., 0] = thick_slices(thin, self.factor)
        return img, thin[..., None]

    def evaluate(self, preds, targets, glands=None):
        return _dense_eval(preds, targets, glands, ("t2w",))


def susceptibility_field(shape, spacing, rng: np.random.Generator, peak_mm=(2.0, 5.0)) -> np.ndarray:
    """A smooth EPI-like displacement along H (the phase-encoding axis), in voxels, (D, H, W).

    A Gaussian bump near the posterior midline (where rectal gas distorts prostate DWI) plus a
    gentle linear gradient, scaled so that max |displacement| = U(peak_mm) mm exactly.
    """
    d, h, w = shape
    sd, sh, sw = spacing
    zz = (np.arange(d) - (d - 1) / 2 - rng.uniform(-0.1, 0.1) * d) * sd
    yy = (np.arange(h) - (0.3 + rng.uniform(-0.05, 0.05)) * (h - 1)) * sh  # posterior (low H) third
    xx = (np.arange(w) - (w - 1) / 2 - rng.uniform(-0.05, 0.05) * w) * sw
    sz, sy, sx = (s * rng.uniform(0.8, 1.25) for s in (25.0, 16.0, 20.0))
    bump = (np.exp(-0.5 * (zz / sz) ** 2)[:, None, None] * np.exp(-0.5 * (yy / sy) ** 2)[None, :, None]
            * np.exp(-0.5 * (xx / sx) ** 2)[None, None, :])
    ramp = rng.uniform(-0.3, 0.3) * (np.arange(h) / max(h - 1, 1) - 0.5)[None, :, None]
    field = bump + ramp
    peak = rng.uniform(*peak_mm)
    return (field * (peak / np.abs(field).max()) / sh).astype(np.float32)


def warp_along_h(vol: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Pull-warp a (D, H, W) volume: out[z, y, x] = vol[z, y - disp, x] (linear, edge-clamped)."""
    d, h, w = vol.shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return ndimage.map_coordinates(vol, [zz, yy - disp, xx], order=1, mode="nearest").astype(np.float32)


@dataclass(frozen=True)
class DistortionCorrection(Task):
    """Susceptibility distortion correction of the diffusion series.

    Input: T2w unchanged, DWI and ADC pull-warped along the phase-encoding axis (H) by a smooth
    field (:func:`susceptibility_field`, peak 2-5 mm; fixed per case: seeded by ``seed`` and the
    case id). Target: the undistorted [DWI, ADC] (D, H, W, 2). Metrics inside the gland: NCC
    (primary), PSNR, SSIM.
    """

    name: str = "distortion_correction"
    kind: str = "dense_regression"
    head: str = "restore"
    num_outputs: int = 2
    loss: str = "l2"
    primary: str = "ncc"
    restore_from: int | None = 1  # [DWI, ADC]
    peak_mm: tuple = (2.0, 5.0)

    def field(self, sample) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(str(sample["case_id"]).encode())])
        return susceptibility_field(np.shape(sample["gland"]), sample["spacing"], rng, self.peak_mm)

    def make(self, sample):
        img = np.array(sample["image"], np.float32)
        disp = self.field(sample)
        target = img[..., 1:3].copy()
        for c in (1, 2):
            img[..., c] = warp_along_h(img[..., c], disp)
        return img, target

    def evaluate(self, preds, targets, glands=None):
        return _dense_eval(preds, targets, glands, ("dwi", "adc"))


_FACTORY = {
    "classification": Classification,
    "segmentation": Segmentation,
    "detection": Detection,
    "super_resolution": SuperResolution,
    "distortion_correction": DistortionCorrection,
}


def get_task(name: str, **options) -> Task:
    """The task called ``name`` (one of TASKS); ``options`` set its fields, e.g.
    ``get_task("classification", label="grade", num_outputs=6)``, ``get_task("super_resolution", factor=3)``
    or ``get_task(name, seed=s)`` (accepted by every task)."""
    if name not in _FACTORY:
        raise ConfigError(f"unknown task '{name}' (expected one of {TASKS})")
    try:
        task = _FACTORY[name](**options)
    except TypeError as exc:
        raise ConfigError(f"task '{name}': bad option(s) {sorted(options)} ({exc})") from exc
    if isinstance(task, Classification) and task.label == "grade" and "num_outputs" not in options:
        task = dataclasses.replace(task, num_outputs=6)
    return task
