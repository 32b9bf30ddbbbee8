"""Small, fast synthetic tasks for the training-engine tests (numpy only, seeded).

Volumes are (N, D, H, W, 3) with a smooth background and, depending on the task, a bright blob
whose presence / mask / clean image is the target. Cheap enough to build in milliseconds.
"""

import numpy as np


def _blob(shape, rng):
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    c = [rng.uniform(0.3, 0.7) * s for s in shape]
    r = rng.uniform(0.18, 0.3) * min(h, w)
    return ((zz - c[0]) / max(d / h, 1e-3)) ** 2 * 0.25 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r**2


def _smooth(x, rng):
    """Restoration targets need structure that the degraded input predicts (white noise has none)."""
    from scipy.ndimage import gaussian_filter

    return (gaussian_filter(x, sigma=(1.5, 1.5, 1.5, 0)) * 4.0).astype(np.float32)


def make_task(task, n, shape=(16, 32, 32), seed=0):
    rng = np.random.default_rng(seed)
    imgs, tgts = [], []
    for i in range(n):
        base = rng.normal(0, 0.3, (*shape, 3)).astype(np.float32)
        blob = _blob(shape, rng)
        if task == "classification":
            label = i % 2
            if label:
                base[blob] += 1.5
            imgs.append(base), tgts.append(label)
        elif task in ("segmentation", "detection"):
            base[blob] += 1.5
            imgs.append(base), tgts.append(blob.astype(np.int32))
        elif task == "super_resolution":
            clean = _smooth(base, rng)
            clean[blob] += 1.5
            low = np.repeat(clean[::2], 2, axis=0)  # through-plane x2 downsampling, nearest upsampling
            imgs.append(low), tgts.append(clean[..., :1])  # the task restores T2w (channel 0)
        elif task == "distortion_correction":
            clean = _smooth(base, rng)
            clean[blob] += 1.5
            warped = clean.copy()  # the task restores [DWI, ADC] (channels 1, 2); T2w is undistorted
            warped[..., 1:3] = np.roll(clean[..., 1:3], 2, axis=2)  # a 2-voxel phase-encode (H) shift
            imgs.append(warped), tgts.append(clean[..., 1:3])
        else:
            raise ValueError(task)
    return {"image": np.stack(imgs).astype(np.float32), "target": np.asarray(tgts)}


def make_data(task, n_train=32, n_val=16, shape=(16, 32, 32), seed=0):
    return {"train": make_task(task, n_train, shape, seed), "val": make_task(task, n_val, shape, seed + 1000)}
