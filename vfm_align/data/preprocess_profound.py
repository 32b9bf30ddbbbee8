"""ProFound's evaluation preprocessing, as reusable steps.

The reference recipe: read T2w, high-b DWI and ADC (already co-registered on one grid), stack them
as channels [T2w, DWI, ADC], z-score each channel over its non-zero voxels on the full volume, then
centre-crop and zero-pad to 64x224x224 (MONAI ``CenterSpatialCrop`` then symmetric ``SpatialPad``).
The crop/pad plan is returned so predictions on the crop can be written back onto the input grid.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from vfm_align.data.cache import zscore_nonzero  # the shared non-zero, per-channel z-score (MONAI semantics)
from vfm_align.data.nifti import Volume, check_same_grid, load_volume
from vfm_align.errors import DataError

PROFOUND_CROP = (64, 224, 224)  # (D, H, W) evaluation crop of every ProFound demo
CHANNELS = ("t2w", "dwi", "adc")


@dataclasses.dataclass(frozen=True)
class CropPad:
    """Where a centre crop + symmetric zero pad takes each (D, H, W) axis.

    ``out[pad_before:pad_before + (stop - start)] = in[start:stop]`` per axis.
    """

    original: tuple[int, int, int]
    target: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]

    def _slices(self):
        src = tuple(slice(a, b) for a, b in zip(self.crop_start, self.crop_stop))
        dst = tuple(slice(p, p + (b - a)) for p, a, b in zip(self.pad_before, self.crop_start, self.crop_stop))
        return src, dst

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Crop/pad the leading (D, H, W) axes of ``x``; trailing axes (channels) are kept."""
        x = np.asarray(x)
        if tuple(x.shape[:3]) != self.original:
            raise DataError(f"array (D,H,W)={tuple(x.shape[:3])} does not match the planned input {self.original}")
        src, dst = self._slices()
        out = np.zeros(self.target + x.shape[3:], dtype=x.dtype)
        out[dst] = x[src]
        return out

    def invert(self, y: np.ndarray, fill=0) -> np.ndarray:
        """Map an array on the crop grid back to the original grid; voxels outside the crop get ``fill``."""
        y = np.asarray(y)
        if tuple(y.shape[:3]) != self.target:
            raise DataError(f"array (D,H,W)={tuple(y.shape[:3])} is not on the crop grid {self.target}")
        src, dst = self._slices()
        out = np.full(self.original + y.shape[3:], fill, dtype=y.dtype)
        out[src] = y[dst]
        return out


def plan_center_crop_pad(shape, target=PROFOUND_CROP) -> CropPad:
    """MONAI semantics: crop start = max(size // 2 - target // 2, 0); pad (w // 2, w - w // 2)."""
    shape, target = tuple(int(s) for s in shape), tuple(int(t) for t in target)
    if len(shape) != 3 or len(target) != 3 or min(target) <= 0:
        raise DataError(f"crop/pad needs 3D sizes, got volume {shape} and target {target}")
    start = tuple(max(s // 2 - t // 2, 0) for s, t in zip(shape, target))
    stop = tuple(min(a + t, s) for a, t, s in zip(start, target, shape))
    width = tuple(t - (b - a) for t, a, b in zip(target, start, stop))
    return CropPad(shape, target, start, stop, tuple(w // 2 for w in width), tuple(w - w // 2 for w in width))


def center_crop_pad(x: np.ndarray, target=PROFOUND_CROP) -> tuple[np.ndarray, CropPad]:
    """Centre-crop / zero-pad the (D, H, W) axes of ``x`` to ``target``; returns the array and the plan."""
    plan = plan_center_crop_pad(np.shape(x)[:3], target)
    return plan.apply(x), plan


def stack_channels(t2w: str | os.PathLike, dwi: str | os.PathLike | None = None,
                   adc: str | os.PathLike | None = None) -> tuple[np.ndarray, Volume]:
    """Read co-registered NIfTI files into (D, H, W, 3) float32 [T2w, DWI, ADC].

    With only ``t2w`` the other channels are zero (the anatomy-segmentation input [T2w, 0, 0]).
    Raises DataError naming the files when the volumes are not on one grid.
    """
    if (dwi is None) != (adc is None):
        raise DataError(f"{t2w}: give both DWI and ADC, or neither (for a [T2w, 0, 0] input)")
    vols = {"t2w": load_volume(t2w, kind="T2w")}
    if dwi is not None:
        vols["dwi"] = load_volume(dwi, kind="DWI")
        vols["adc"] = load_volume(adc, kind="ADC")
        check_same_grid(vols)
    ref = vols["t2w"]
    image = np.zeros(ref.data.shape + (len(CHANNELS),), np.float32)
    for i, name in enumerate(CHANNELS):
        if name in vols:
            image[..., i] = vols[name].data
    return image, ref


@dataclasses.dataclass
class ProfoundInput:
    """One case ready for a ProFound model, plus what is needed to map outputs back."""

    image: np.ndarray  # (D, H, W, 3) float32, channels [T2w, DWI, ADC]
    crop: CropPad | None  # None when the whole volume is kept
    affine: np.ndarray  # the T2w grid's voxel -> world affine
    reference: Volume  # the T2w volume (grid and header for writing outputs with nifti.save_like)


def preprocess_profound(t2w, dwi=None, adc=None, *, target=PROFOUND_CROP, crop: bool = True) -> ProfoundInput:
    """The reference evaluation recipe: stack, non-zero z-score on the full volume, then crop/pad.

    ``crop=False`` keeps the whole volume (the reference anatomy test set is not cropped).
    """
    image, ref = stack_channels(t2w, dwi, adc)
    image = zscore_nonzero(image)
    plan = None
    if crop:
        image, plan = center_crop_pad(image, target)
    return ProfoundInput(image=np.ascontiguousarray(image, dtype=np.float32), crop=plan, affine=ref.affine,
                         reference=ref)


__all__ = ["PROFOUND_CROP", "CHANNELS", "CropPad", "plan_center_crop_pad", "center_crop_pad", "zscore_nonzero",
           "stack_channels", "ProfoundInput", "preprocess_profound"]
