"""Reading and writing NIfTI volumes with nibabel, with the checks users need before a run starts.

Axis convention: NIfTI voxel axes are (x, y, z) = (i, j, k). Inside vfm-align a volume is
(D, H, W) = (z, y, x), the order both reference pipelines use (ProFound transposes
``get_fdata()`` by (2, 1, 0); SimpleITK's arrays are already (z, y, x)). The affine stays
attached so outputs can be written back onto the input's grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from vfm_align.atomic import atomic_file
from vfm_align.errors import DataError


@dataclass
class Volume:
    """A 3D image in (D, H, W) order plus the geometry it came with."""

    data: np.ndarray  # (D, H, W) float32 (or the mask dtype), C-contiguous
    affine: np.ndarray  # 4x4 voxel (i, j, k) -> world mm, as stored in the file
    header: nib.Nifti1Header
    path: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in (D, H, W) order, mm."""
        zooms = self.header.get_zooms()[:3]
        return (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_volume(path: str | os.PathLike, *, kind: str = "image", dtype=np.float32,
                allow_nonfinite: bool = False) -> Volume:
    """Read a 3D NIfTI file (a 4D file with a single volume is accepted) as a :class:`Volume`.

    Raises :class:`DataError` naming the file for a missing, unreadable or truncated file,
    the wrong number of dimensions, or NaN/inf voxels.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: {kind} file not found")
    try:
        img = nib.load(path)
        arr = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types for corrupt/truncated files
        raise DataError(f"{path}: unreadable {kind} NIfTI ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: {kind} must be a 3D volume, got shape {arr.shape} ({arr.ndim}D)")
    if not allow_nonfinite and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{path}: {kind} has {bad} NaN/inf voxels")
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)


def check_same_grid(volumes: dict[str, Volume], *, atol: float = 1e-3) -> None:
    """Raise :class:`DataError` unless every volume has the first one's shape and affine."""
    items = list(volumes.items())
    ref_name, ref = items[0]
    for name, vol in items[1:]:
        if vol.data.shape != ref.data.shape:
            raise DataError(
                f"{vol.path}: {name} has shape {vol.data.shape} (D,H,W) but {ref_name} ({ref.path}) "
                f"has {ref.data.shape}; "
                "resample/co-register onto one grid first"
            )
        if not np.allclose(vol.affine, ref.affine, atol=atol):
            raise DataError(
                f"{vol.path}: {name} affine differs from {ref_name} ({ref.path}) by up to "
                f"{np.abs(vol.affine - ref.affine).max():.4g} mm; the images are not on the same grid"
            )


def save_like(data: np.ndarray, ref: Volume, path: str | os.PathLike, *, dtype=np.float32) -> str:
    """Write a (D, H, W) array onto ``ref``'s grid (affine and header geometry), atomically."""
    path = os.fspath(path)
    if data.shape != ref.data.shape:
        raise DataError(
            f"{path}: array shape {data.shape} does not match the reference grid {ref.data.shape} ({ref.path})")
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype).transpose(2, 1, 0), ref.affine, header)
    suffix = ".nii.gz" if path.endswith(".nii.gz") else ".nii"
    with atomic_file(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path
