"""Host-side augmentations in the spirit of the reference fine-tuning recipes, driven by a numpy Generator.

ProFound fine-tuning flips left-right, rotates (p=0.3, up to 10 degrees), zooms (p=0.3, 0.9-1.1)
and scales/shifts intensities (p=0.8, +-0.1); ProViCNet adds Gaussian noise. Here the rotation and
zoom act in-plane (the slice axis is 3-6x coarser than the in-plane one), images are interpolated
linearly and masks with nearest neighbour, and the same draw applies to image and masks.
Everything is a pure function of the sample and the generator, so a seed fixes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

SPATIAL = ("gland", "lesion")


@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = 0.5
    rotate_p: float = 0.3
    max_rotate_deg: float = 10.0
    zoom_p: float = 0.3
    zoom_range: tuple = (0.9, 1.1)
    scale_p: float = 0.8
    scale: float = 0.1
    shift_p: float = 0.8
    shift: float = 0.1
    noise_p: float = 0.2
    noise_std: float = 0.05


def _source_coords(h: int, w: int, angle_rad: float, zoom: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input (row, col) that each output pixel of an (h, w) slice reads, and whether it lies inside.

    Rotation by ``angle`` and zoom by ``zoom`` about the slice centre, in scipy.ndimage's
    convention (input = mat @ output + offset); mode 'constant': outside [0, n-1] reads zero.
    """
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    mat = np.array([[c / zoom, -s / zoom], [s / zoom, c / zoom]])
    center = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = center - mat @ center
    rows, cols = np.mgrid[0:h, 0:w].reshape(2, -1).astype(np.float64)
    sy = mat[0, 0] * rows + mat[0, 1] * cols + offset[0]
    sx = mat[1, 0] * rows + mat[1, 1] * cols + offset[1]
    inside = (sy > -1e-9) & (sy < h - 1 + 1e-9) & (sx > -1e-9) & (sx < w - 1 + 1e-9)
    return sy, sx, inside


def _inplane_affine(sample: dict, angle_rad: float, zoom: float) -> dict:
    """Rotate by ``angle`` and zoom by ``zoom`` about the centre of each (H, W) slice.

    The sampling positions are the same for every slice and channel, so they are computed once
    the image is resampled as one sparse (H*W, H*W) matrix of bilinear weights (4 per row) times
    the (H*W, D*C) pixel matrix; masks take one nearest-neighbour gather. Same values as
    scipy.ndimage.affine_transform on the 3D volume with an identity slice row; measured ~4x
    faster than calling it slice by slice (32x96x96x3: ~11 ms instead of ~42 ms).
    """
    d, h, w = np.shape(sample["gland"])
    sy, sx, inside = _source_coords(h, w, angle_rad, zoom)
    out = dict(sample)

    img = np.asarray(sample["image"], np.float32)
    c = img.shape[-1]
    y0, x0 = np.floor(sy), np.floor(sx)
    fy, fx = sy - y0, sx - x0
    y0 = np.clip(y0.astype(np.int64), 0, h - 1)
    x0 = np.clip(x0.astype(np.int64), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    taps = np.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], axis=1)
    weights = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1) * inside[:, None]
    resample = sparse.csr_matrix((weights.ravel().astype(np.float32), taps.ravel(), np.arange(0, 4 * h * w + 1, 4)),
                                 shape=(h * w, h * w))
    pixels_first = np.ascontiguousarray(img.transpose(1, 2, 0, 3)).reshape(h * w, d * c)
    out["image"] = np.ascontiguousarray((resample @ pixels_first).reshape(h, w, d, c).transpose(2, 0, 1, 3))

    # nearest neighbour: scipy rounds half up (floor(x + 0.5))
    near = np.clip(np.floor(sy + 0.5).astype(np.int64), 0, h - 1) * w + np.clip(np.floor(sx + 0.5).astype(np.int64), 0, w - 1)
    for m in SPATIAL:
        mask = np.asarray(sample[m])
        out[m] = np.where(inside, np.take(mask.reshape(d, h * w), near, axis=1), 0).astype(mask.dtype).reshape(d, h, w)
    return out


def augment(sample: dict, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> dict:
    """Return an augmented copy of ``sample`` (image (D, H, W, C), gland, lesion)."""
    out = dict(sample)
    img = np.asarray(sample["image"], np.float32)  # never written in place below: no defensive copy
    masks = {m: np.asarray(sample[m]) for m in SPATIAL}
    if rng.uniform() < cfg.flip_p:  # left-right (W) flip; the anatomy is near-symmetric
        img = img[:, :, ::-1]
        masks = {m: a[:, :, ::-1] for m, a in masks.items()}
    out.update(image=np.ascontiguousarray(img), **{m: np.ascontiguousarray(a) for m, a in masks.items()})
    angle = np.deg2rad(rng.uniform(-cfg.max_rotate_deg, cfg.max_rotate_deg)) if rng.uniform() < cfg.rotate_p else 0.0
    zoom = rng.uniform(*cfg.zoom_range) if rng.uniform() < cfg.zoom_p else 1.0
    if angle != 0.0 or zoom != 1.0:
        out = _inplane_affine(out, angle, zoom)
    img = out["image"]
    nch = img.shape[-1]
    scale = np.where(rng.uniform(size=nch) < cfg.scale_p, 1.0 + rng.uniform(-cfg.scale, cfg.scale, nch), 1.0)
    shift = np.where(rng.uniform(size=nch) < cfg.shift_p, rng.uniform(-cfg.shift, cfg.shift, nch), 0.0)
    img = img * scale.astype(np.float32) + shift.astype(np.float32)  # a new array: safe to add into
    if rng.uniform() < cfg.noise_p:
        img += np.float32(rng.uniform(0, cfg.noise_std)) * rng.standard_normal(img.shape, dtype=np.float32)
    out["image"] = img.astype(np.float32, copy=False)
    return out


def crop_or_pad(sample: dict, shape, rng: np.random.Generator | None = None) -> dict:
    """Bring image and masks to ``shape`` (D, H, W): the reference centre crop / symmetric zero pad
    (MONAI semantics, from preprocess_profound), or a random crop position when ``rng`` is given."""
    cur = tuple(np.shape(sample["gland"]))
    shape = tuple(int(s) for s in shape)
    if cur == shape:
        return sample
    out = dict(sample)
    if rng is None:
        from vfm_align.data.preprocess_profound import plan_center_crop_pad

        plan = plan_center_crop_pad(cur, shape)
        out["image"] = plan.apply(np.asarray(sample["image"], np.float32))
        for m in SPATIAL:
            out[m] = plan.apply(np.asarray(sample[m], np.uint8))
        return out
    src, dst = [], []
    for n, m in zip(cur, shape):
        if n >= m:
            start = int(rng.integers(0, n - m + 1))
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:
            pad = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(pad, pad + n))
    img = np.zeros(shape + (np.shape(sample["image"])[-1],), np.float32)
    img[tuple(dst)] = np.asarray(sample["image"])[tuple(src)]
    out["image"] = img
    for m in SPATIAL:
        a = np.zeros(shape, np.uint8)
        a[tuple(dst)] = np.asarray(sample[m])[tuple(src)]
        out[m] = a
    return out
