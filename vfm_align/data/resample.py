"""Geometry: reorientation to RAS+ and resampling to a target spacing, driven by the affine.

Volumes are :class:`~vfm_align.data.nifti.Volume` (data in (D, H, W) = (z, y, x) order, affine over
(i, j, k) = (x, y, z)). Images are resampled linearly, masks with nearest neighbour.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from vfm_align.data.nifti import Volume


def _volume(data_dhw: np.ndarray, affine: np.ndarray, like: Volume) -> Volume:
    header = like.header.copy()
    header.set_data_shape(data_dhw.shape[::-1])
    header.set_data_dtype(data_dhw.dtype)
    header.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    return Volume(data=np.ascontiguousarray(data_dhw), affine=affine, header=header, path=like.path)


def to_canonical(vol: Volume) -> Volume:
    """Reorder/flip voxel axes so the affine is closest to RAS+ (like ``nib.as_closest_canonical``)."""
    current = ornt.io_orientation(vol.affine)
    target = ornt.axcodes2ornt(("R", "A", "S"))
    if np.array_equal(current, target):
        return vol
    xfm = ornt.ornt_transform(current, target)
    xyz = vol.data.transpose(2, 1, 0)
    new_xyz = ornt.apply_orientation(xyz, xfm)
    affine = vol.affine @ ornt.inv_ornt_aff(xfm, xyz.shape)
    return _volume(np.ascontiguousarray(new_xyz.transpose(2, 1, 0)), affine, vol)


def resample_to_spacing(vol: Volume, spacing_dhw, *, order: int = 1) -> Volume:
    """Resample to ``spacing_dhw`` mm (D, H, W), keeping the field of view's outer edges.

    The output shape is ``round(shape * old / new)``; the spacing actually used is
    ``old * shape / new_shape`` per axis, so the grid covers the same extent exactly.
    """
    old = np.asarray(vol.spacing, dtype=np.float64)
    new = np.asarray(spacing_dhw, dtype=np.float64)
    shape = np.asarray(vol.data.shape)
    new_shape = np.maximum(1, np.rint(shape * old / new)).astype(int)
    if np.array_equal(new_shape, shape):
        return vol
    data = ndimage.zoom(vol.data, new_shape / shape, order=order, mode="nearest", grid_mode=True,
                        prefilter=False)
    # Voxel j of the new grid sits at old-voxel coordinate (j + 0.5) * f - 0.5 (edges aligned).
    f_dhw = shape / new_shape
    f_xyz = f_dhw[::-1]
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f_xyz)
    scale[:3, 3] = 0.5 * f_xyz - 0.5
    return _volume(data.astype(vol.data.dtype, copy=False), vol.affine @ scale, vol)


def resample_onto(vol: Volume, ref: Volume, *, order: int = 1) -> Volume:
    """Resample ``vol`` onto ``ref``'s grid through the world coordinates of both affines."""
    from nibabel.processing import resample_from_to

    src = nib.Nifti1Image(vol.data.transpose(2, 1, 0), vol.affine)
    out = resample_from_to(src, (ref.data.shape[::-1], ref.affine), order=order, mode="nearest")
    data = np.asarray(out.dataobj).transpose(2, 1, 0).astype(vol.data.dtype, copy=False)
    return _volume(data, ref.affine.copy(), ref)
