"""Sliding-window inference: MONAI's window placement and Gaussian blend, against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vfm_align.infer.sliding_window import (
    importance_map,
    plan_windows,
    sliding_window_inference,
)


def _toy(win):
    """A window-dependent "model": out0 = 2 x0 + mean of the window, out1 = x1 times the depth index."""
    ramp = jnp.arange(win.shape[1], dtype=jnp.float32)[None, :, None, None]
    return jnp.stack([2 * win[..., 0] + win.mean(axis=(1, 2, 3, 4))[:, None, None, None],
                      win[..., 1] * ramp], axis=-1)


def _reference(image, roi, overlap, sigma_scale=0.125):
    """MONAI sliding_window_inference (constant padding, gaussian importance) written out in float64."""
    shape = image.shape[:3]
    diff = [max(r - s, 0) for r, s in zip(roi, shape)]
    x = np.pad(image.astype(np.float64), [(d // 2, d - d // 2) for d in diff] + [(0, 0)])
    size = x.shape[:3]
    axis_starts = []
    for n, r in zip(size, roi):
        step = r if r == n else max(int(r * (1 - overlap)), 1)
        s, starts = 0, []
        while True:
            starts.append(min(s, n - r))
            if s + r >= n:
                break
            s += step
        axis_starts.append(starts)
    g = np.ones(())
    for r in roi:
        t = np.arange(r) - (r - 1) / 2
        g = g[..., None] * np.exp(-t ** 2 / (2 * (r * sigma_scale) ** 2))
    g = np.maximum(g, max(g.min(), 1e-3))
    num = np.zeros(size + (2,))
    den = np.zeros(size)
    for a in axis_starts[0]:
        for b in axis_starts[1]:
            for c in axis_starts[2]:
                sl = (slice(a, a + roi[0]), slice(b, b + roi[1]), slice(c, c + roi[2]))
                out = np.asarray(_toy(jnp.asarray(x[sl][None], jnp.float32)), np.float64)[0]
                num[sl] += g[..., None] * out
                den[sl] += g
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(diff, shape))
    return (num / den[..., None])[crop]


@pytest.mark.parametrize("shape", [(7, 13, 11), (3, 13, 9)])  # odd sizes; the second is padded in D
@pytest.mark.parametrize("accumulate", ["device", "host"])
def test_blend_matches_monai_reference(shape, accumulate):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape + (2,)).astype(np.float32)
    roi = (4, 6, 5)
    out = sliding_window_inference(_toy, image, roi, overlap=0.5, batch_size=3, accumulate=accumulate)
    assert out.shape == shape + (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(image, roi, 0.5), rtol=1e-5, atol=1e-5)


def test_window_starts_and_weights_follow_monai():
    plan = plan_windows((30, 640, 640), (64, 224, 224), 0.5)
    assert plan.padded == (64, 640, 640) and plan.pad_before == (17, 0, 0)
    axis_h = sorted(set(plan.starts[:, 1].tolist()))
    assert axis_h == [0, 112, 224, 336, 416]  # step int(224 * 0.5); the last window ends at the border
    assert len(plan.starts) == 25
    w = importance_map((5, 8, 9))
    # peak at the centre voxel; H has an even size, so its two middle voxels are 0.5 voxel off centre (sigma 1)
    assert w.max() == pytest.approx(np.exp(-0.5 * 0.5 ** 2), rel=1e-6) and w[2, 3, 4] == w[2, 4, 4] == w.max()
    corner = np.exp(-0.5 * ((2 / 0.625) ** 2 + 3.5 ** 2 + (4 / 1.125) ** 2))  # 2e-8: raised to the 1e-3 floor
    assert corner < 1e-3 and w.min() == pytest.approx(1e-3)


class _ConvNet(nnx.Module):
    """Two 3x3x3 convolutions with a GELU: a small nonlinear volume model."""

    def __init__(self, rngs):
        self.a = nnx.Conv(3, 8, (3, 3, 3), rngs=rngs)
        self.b = nnx.Conv(8, 4, (3, 3, 3), rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.gelu(self.a(x)))


def test_one_window_equals_a_direct_call_exactly():
    graphdef, state = nnx.split(_ConvNet(nnx.Rngs(0)))

    def predict(x):
        return nnx.merge(graphdef, state)(x)

    image = np.random.default_rng(1).normal(size=(9, 14, 12, 3)).astype(np.float32)
    direct = np.asarray(jax.jit(predict)(jnp.asarray(image[None])))[0]
    for accumulate in ("device", "host"):
        out = sliding_window_inference(predict, image, (9, 14, 12), overlap=0.0, accumulate=accumulate)
        np.testing.assert_array_equal(out, direct)
    # a larger volume is covered by several windows and differs from the one-window call near their seams
    out = sliding_window_inference(predict, np.pad(image, ((0, 4), (0, 0), (0, 0), (0, 0))), (9, 14, 12))
    assert out.shape == (13, 14, 12, 4)
