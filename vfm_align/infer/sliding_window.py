"""Sliding-window inference of a volume model over a volume of any size (MONAI's conventions).

* Windows have the model's input size ``roi`` (D, H, W). A volume smaller than ``roi`` along an axis
  is first zero-padded there (constant padding, ``diff // 2`` before and the rest after).
* Window starts: step ``int(roi * (1 - overlap))`` (at least 1; ``roi`` when the axis equals ``roi``),
  the last window shifted back to end at the border (MONAI ``dense_patch_slices``).
* Each window's output is weighted by a Gaussian importance map centred on the window,
  ``exp(-x^2 / (2 sigma^2))`` with ``sigma = sigma_scale * roi`` per axis (peak 1, values below
  ``max(min, 1e-3)`` raised to it), and the blend is ``sum_i w_i p_i / sum_i w_i`` per voxel.
  Here each window's weight is divided by the normaliser ``sum_i w_i`` before it is added, which is
  the same blend and makes a single window covering the volume return the model's output exactly.

Windows are run ``batch_size`` at a time in one jitted step. The blended output is accumulated on
the device (one jitted scan over all batches; compiled per volume shape) or on the host (windows
cut on the host, a jitted step of fixed shape per batch, compiled once per ``predict`` and window
size, its result added into a numpy array while the next batch runs); :func:`choose_accumulation`
picks by memory (see there).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vfm_align.errors import ConfigError

SIGMA_SCALE = 0.125  # MONAI's default for mode="gaussian"
DEVICE_FRACTION = 0.25  # accumulate on an accelerator when the accumulators take at most this share of its memory


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Where the windows of ``roi`` go over a (D, H, W) volume."""

    shape: tuple  # the input (D, H, W)
    roi: tuple
    pad_before: tuple
    padded: tuple  # (D, H, W) after padding up to roi
    starts: np.ndarray  # (n, 3) int window starts in the padded volume

    @property
    def crop(self) -> tuple:
        return tuple(slice(p, p + s) for p, s in zip(self.pad_before, self.shape))


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    num = int(math.ceil(size / interval))
    n = next((d for d in range(num) if d * interval + roi >= size), None)
    count = n + 1 if n is not None else 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def plan_windows(shape, roi, overlap: float = 0.5) -> WindowPlan:
    shape, roi = tuple(int(s) for s in shape), tuple(int(r) for r in roi)
    if len(shape) != 3 or len(roi) != 3 or min(roi) < 1:
        raise ConfigError(f"sliding window needs 3D sizes, got volume {shape} and window {roi}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
    diff = [max(r - s, 0) for r, s in zip(roi, shape)]
    before = tuple(d // 2 for d in diff)
    padded = tuple(s + d for s, d in zip(shape, diff))
    axes = [_axis_starts(p, r, overlap) for p, r in zip(padded, roi)]
    starts = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1).astype(np.int32)
    return WindowPlan(shape, roi, before, padded, starts)


def importance_map(roi, sigma_scale: float = SIGMA_SCALE, mode: str = "gaussian") -> np.ndarray:
    """(D, H, W) float32 window weights: MONAI ``compute_importance_map`` (gaussian or constant)."""
    if mode == "constant":
        return np.ones(tuple(roi), np.float32)
    if mode != "gaussian":
        raise ConfigError(f"importance mode must be 'gaussian' or 'constant', got '{mode}'")
    w = np.ones((), np.float32)
    for r in roi:
        x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)
        sigma = np.float32(r * sigma_scale)
        w = w[..., None] * np.exp(x ** 2 / (-2 * sigma ** 2)).astype(np.float32)
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def normaliser(plan: WindowPlan, weight: np.ndarray) -> np.ndarray:
    """sum_i w_i over the padded volume (float32), the denominator of the blend."""
    norm = np.zeros(plan.padded, np.float32)
    for s in plan.starts:
        norm[tuple(slice(a, a + r) for a, r in zip(s, plan.roi))] += weight
    return norm


def _clip(plan: WindowPlan, start) -> tuple[tuple, tuple]:
    """(slices of the input volume, slices of the window) where a window at ``start`` (padded coordinates) meets
    the unpadded input."""
    src, dst = [], []
    for a, r, b, n in zip(start, plan.roi, plan.pad_before, plan.shape):
        lo, hi = max(a - b, 0), min(a - b + r, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - (a - b), hi - (a - b)))
    return tuple(src), tuple(dst)


def accumulator_bytes(shape, num_outputs: int, channels: int) -> int:
    """Bytes held for the whole volume of ``shape``: the input, the normaliser and the output accumulator (the
    host path holds them on the input's grid; the device path on the padded grid)."""
    return int(np.prod(shape)) * 4 * (channels + 1 + num_outputs)


def choose_accumulation(padded, num_outputs: int, channels: int, device=None) -> str:
    """"device" on an accelerator whose memory holds the whole-volume arrays within DEVICE_FRACTION of it,
    "host" otherwise (always on the CPU: there the host array is added in place, with no second copy
    of the accumulator inside the compiled loop)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return "host"
    limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    return "device" if accumulator_bytes(padded, num_outputs, channels) <= DEVICE_FRACTION * limit else "host"


def _call(predict, params, x):
    return predict(x) if params is None else predict(params, x)


def _window_step(predict, roi):
    """(params, image, norm, weight, starts (B,3), valid (B,)) -> (B, *roi, K) outputs times their blend weight."""

    def step(params, image, norm, weight, starts, valid):
        c = image.shape[-1]
        wins = jax.vmap(lambda s: jax.lax.dynamic_slice(image, (*s, 0), (*roi, c)))(starts)
        dens = jax.vmap(lambda s: jax.lax.dynamic_slice(norm, tuple(s), roi))(starts)
        out = _call(predict, params, wins).astype(jnp.float32)
        w = weight[None] / dens * valid[:, None, None, None]
        return out * w[..., None]

    return step


_HOST_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # predict -> jitted fixed-shape step


def _host_step(predict):
    """jit((params, windows (B, *roi, C), weights (B, *roi)) -> weighted outputs), one per ``predict`` (reused
    across cases)."""
    if predict not in _HOST_STEPS:
        _HOST_STEPS[predict] = jax.jit(lambda params, wins, w: _call(predict, params, wins).astype(jnp.float32)
                                       * w[..., None])
    return _HOST_STEPS[predict]


def sliding_window_inference(predict, image, roi, *, overlap: float = 0.5, sigma_scale: float = SIGMA_SCALE,
                             mode: str = "gaussian", batch_size: int = 1, accumulate: str = "auto",
                             params=None, progress: bool = False) -> np.ndarray:
    """Blend ``predict`` over windows of ``roi`` covering ``image`` (D, H, W, C); returns (D, H, W, K) float32.

    ``predict`` maps a jax array (N, *roi, C) to (N, *roi, K), or with ``params`` (a pytree, e.g. model
    weights, passed to the compiled step as an argument rather than baked in as constants) is called
    ``predict(params, x)``; it is traced inside this function's jit.
    ``accumulate``: "device", "host" or "auto" (:func:`choose_accumulation`).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 4:
        raise ConfigError(f"sliding window needs a (D, H, W, C) volume, got shape {image.shape}")
    if batch_size < 1:
        raise ConfigError(f"window batch size must be >= 1, got {batch_size}")
    plan = plan_windows(image.shape[:3], roi, overlap)
    roi = plan.roi
    weight = importance_map(roi, sigma_scale, mode)
    c = image.shape[-1]
    k = jax.eval_shape(lambda x: _call(predict, params, x), jax.ShapeDtypeStruct((1, *roi, c), jnp.float32)).shape[-1]
    if accumulate == "auto":
        accumulate = choose_accumulation(plan.padded, k, c)
    if accumulate not in ("device", "host"):
        raise ConfigError(f"accumulate must be 'device', 'host' or 'auto', got '{accumulate}'")
    n = len(plan.starts)
    nb = -(-n // batch_size)
    starts = np.concatenate([plan.starts, np.repeat(plan.starts[-1:], nb * batch_size - n, 0)])
    valid = (np.arange(nb * batch_size) < n).astype(np.float32)
    starts, valid = starts.reshape(nb, batch_size, 3), valid.reshape(nb, batch_size)
    if accumulate == "host":
        step = _host_step(predict)
        return _host_blend(lambda w, x: step(params, w, x), plan, image, weight, starts, valid, k, progress)
    pad = [(b, p - s - b) for b, p, s in zip(plan.pad_before, plan.padded, plan.shape)] + [(0, 0)]
    padded = np.pad(image, pad) if any(p != (0, 0) for p in pad) else image
    step = _window_step(predict, roi)
    x, nrm, wt = jnp.asarray(padded), jnp.asarray(normaliser(plan, weight)), jnp.asarray(weight)
    out = np.asarray(_device_blend(step, roi, k)(params, x, nrm, wt, jnp.asarray(starts), jnp.asarray(valid)))
    return np.ascontiguousarray(out[plan.crop])


def _device_blend(step, roi, k):
    @jax.jit
    def run(params, image, norm, weight, starts, valid):
        def body(acc, batch):
            s, v = batch
            out = step(params, image, norm, weight, s, v)
            for b in range(s.shape[0]):
                idx = (*s[b], 0)
                acc = jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, idx, (*roi, k)) + out[b], idx)
            return acc, None

        acc = jnp.zeros((*image.shape[:3], k), jnp.float32)
        return jax.lax.scan(body, acc, (starts, valid))[0]

    return run


def _host_blend(step, plan, image, weight, starts, valid, k, progress):
    """Windows cut from the unpadded input (zeros beyond it); normaliser and accumulator on the input's grid."""
    norm = np.zeros(plan.shape, np.float32)
    for s in plan.starts:
        src, dst = _clip(plan, s)
        norm[src] += weight[dst]
    acc = np.zeros((*plan.shape, k), np.float32)
    c = image.shape[-1]
    pending = None

    def add(res, s, v):
        res = np.asarray(res)
        for b in range(len(s)):
            if v[b]:
                src, dst = _clip(plan, s[b])
                acc[src] += res[b][dst]

    for i in tqdm(range(len(starts)), desc="windows", unit="batch", disable=not progress):
        wins = np.zeros((len(starts[i]), *plan.roi, c), np.float32)
        w = np.zeros((len(starts[i]), *plan.roi), np.float32)
        for b, (s, v) in enumerate(zip(starts[i], valid[i])):
            src, dst = _clip(plan, s)
            wins[b][dst] = image[src]
            w[b][dst] = weight[dst] / norm[src] * v
        res = step(wins, w)
        if pending is not None:  # fetch batch i-1 while batch i runs
            add(*pending)
        pending = (res, starts[i], valid[i])
    add(*pending)
    return acc
