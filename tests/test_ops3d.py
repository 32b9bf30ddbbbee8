"""ops3d against independent numpy references (torch formulas written out by hand)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfm_align.models import ops3d


def _np_dwconv(x, k, pad):
    n, d, h, w, c = x.shape
    kd, kh, kw, _ = k.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad), (0, 0))).astype(np.float64)
    out = np.zeros((n, d, h, w, c))
    for a in range(kd):
        for b in range(kh):
            for e in range(kw):
                out += xp[:, a:a + d, b:b + h, e:e + w] * k[a, b, e]
    return out


@pytest.mark.parametrize("impl", ["shift", "lax"])
def test_depthwise_matches_numpy(impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 9, 4)).astype(np.float32)
    k = rng.standard_normal((7, 7, 7, 4)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y = ops3d.depthwise_conv3d(jnp.asarray(x), jnp.asarray(k), (3, 3, 3), impl=impl)
    np.testing.assert_allclose(np.asarray(y), _np_dwconv(x, k, 3), atol=2e-5, rtol=1e-5)


def test_depthwise_shift_gradients_match_lax():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 8, 8, 3)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((7, 7, 7, 3)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((1, 4, 8, 8, 3)).astype(np.float32))

    def loss(impl):
        return lambda x, k: jnp.sum(ops3d.depthwise_conv3d(x, k, impl=impl) * g)

    with jax.default_matmul_precision("highest"):
        gs = jax.grad(loss("shift"), argnums=(0, 1))(x, k)
        gl = jax.grad(loss("lax"), argnums=(0, 1))(x, k)
    for a, b in zip(gs, gl):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)


def test_depthwise_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        ops3d.depthwise_conv3d(jnp.zeros((1, 2, 2, 2, 1)), jnp.zeros((7, 7, 7, 1)), impl="fft")


@pytest.mark.parametrize("k", [4, 2, 1])
def test_patch_conv_equals_strided_conv_and_drops_remainder(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 9, 10, 7, 3)).astype(np.float32)
    w = rng.standard_normal((k, k, k, 3, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y = ops3d.patch_conv3d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    # The stride-k VALID conv in float64: output voxel (i, j, l) reads input block [ik, ik+k) x ... only,
    # so the trailing remainder (9 % k, ...) never contributes.
    od, oh, ow = 9 // k, 10 // k, 7 // k
    blocks = x[:, :od * k, :oh * k, :ow * k].astype(np.float64).reshape(2, od, k, oh, k, ow, k, 3)
    ref = np.einsum("napbqcri,pqrio->nabco", blocks, w.astype(np.float64)) + b
    assert y.shape == (2, od, oh, ow, 5)
    # float32 sums of k^3 * 3 products of unit normals (|y| up to ~25): relative precision ~1e-6.
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-6, atol=1e-5)


def _np_conv3d_same(x, k):
    n, d, h, w, _ = x.shape
    kd, kh, kw, _, co = k.shape
    xp = np.pad(x, ((0, 0), (kd // 2,) * 2, (kh // 2,) * 2, (kw // 2,) * 2, (0, 0))).astype(np.float64)
    out = np.zeros((n, d, h, w, co))
    for a in range(kd):
        for b in range(kh):
            for e in range(kw):
                out += xp[:, a:a + d, b:b + h, e:e + w] @ k[a, b, e]
    return out


@pytest.mark.parametrize("ksize", [(3, 3, 3), (5, 3, 1), (1, 3, 3)])
def test_conv3d_same_matches_numpy_with_its_gradient(ksize):
    rng = np.random.default_rng(sum(ksize))
    x = rng.standard_normal((2, 5, 6, 7, 4)).astype(np.float32)
    k = rng.standard_normal((*ksize, 4, 3)).astype(np.float32)
    g = rng.standard_normal((2, 5, 6, 7, 3))
    y = jax.jit(ops3d.conv3d)(jnp.asarray(x), jnp.asarray(k))
    np.testing.assert_allclose(np.asarray(y), _np_conv3d_same(x, k), atol=1e-4)
    # the gradient of <conv(x, k), g> w.r.t. x is the conv of g with the flipped, transposed kernel
    gx = jax.grad(lambda x: jnp.sum(ops3d.conv3d(x, jnp.asarray(k)) * jnp.asarray(g, jnp.float32)))(jnp.asarray(x))
    k_adj = k[::-1, ::-1, ::-1].transpose(0, 1, 2, 4, 3)
    np.testing.assert_allclose(np.asarray(gx), _np_conv3d_same(g, k_adj), atol=1e-4)


def test_adaptive_pool_bins_worked_example():
    # torch rule for depth 4 -> 6: bins [0,1),[0,2),[1,2),[2,3),[2,4),[3,4)
    x = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1, 1)
    y = np.asarray(ops3d.adaptive_avg_pool3d(jnp.asarray(x), (6, 1, 1)))[0, :, 0, 0, 0]
    np.testing.assert_allclose(y, [0, 0.5, 1, 2, 2.5, 3])


def test_adaptive_pool_matches_loop_reference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 14, 11, 3)).astype(np.float32)
    for s in (1, 2, 3, 6):
        ref = np.zeros((2, s, s, s, 3))
        for i in range(s):
            for j in range(s):
                for l in range(s):
                    sl = [slice((q * n) // s, -((-(q + 1) * n) // s)) for q, n in zip((i, j, l), x.shape[1:4])]
                    ref[:, i, j, l] = x[:, sl[0], sl[1], sl[2]].mean(axis=(1, 2, 3))
        np.testing.assert_allclose(np.asarray(ops3d.adaptive_avg_pool3d(jnp.asarray(x), s)), ref, atol=1e-5)


def _np_linear_1d(n_in, n_out):
    """torch align_corners=False linear weights: src = (i + 0.5) * in/out - 0.5, clamped at 0."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        f = src - lo
        m[i, lo] += 1 - f
        m[i, hi] += f
    return m


@pytest.mark.parametrize("src,dst", [((1, 2, 3), (4, 14, 14)), ((6, 6, 6), (2, 2, 3)), ((8, 9, 11), (32, 36, 44)),
                                     ((3, 5, 4), (3, 5, 4))])
def test_trilinear_matches_torch_formula(src, dst):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, *src, 3)).astype(np.float32)
    md, mh, mw = (_np_linear_1d(a, b) for a, b in zip(src, dst))
    ref = np.einsum("ndhwc,ad,bh,ew->nabec", x, md, mh, mw)
    y = ops3d.resize_trilinear(jnp.asarray(x), dst)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])  # 3 does not divide D = 7: the last chunk is zero-completed
def test_depth_chunked_conv_matches_numpy_same_conv(chunk):
    rng = np.random.default_rng(chunk)
    x = rng.standard_normal((2, 7, 6, 5, 4)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 4, 3)).astype(np.float32)
    kj = jnp.asarray(k)
    # x given as two channel groups: the slabs concatenate them
    y = jax.jit(lambda a, b: ops3d.depth_chunked(lambda s: jnp.tanh(ops3d.conv3d(s, kj, pad_depth=False)), [a, b],
                                                 1, chunk))(jnp.asarray(x[..., :1]), jnp.asarray(x[..., 1:]))
    assert y.shape == (2, 7, 6, 5, 3)
    np.testing.assert_allclose(np.asarray(y), np.tanh(_np_conv3d_same(x, k)), atol=1e-5)
    # 'valid' along depth: k - 1 fewer slices, the same values as the inner slices of the 'same' conv
    valid = ops3d.conv3d(jnp.asarray(x), kj, pad_depth=False)
    np.testing.assert_allclose(np.asarray(valid), _np_conv3d_same(x, k)[:, 1:-1], atol=1e-4)
