"""3D UperNet on ProFound-Conv: per-stage LayerNorms, PPM + FPN decode head, auxiliary FCN head.

ConvModule = Conv3d without bias -> channels-last LayerNorm (eps 1e-6) -> exact GELU. Every resize
is trilinear with align_corners=False and no antialias; adaptive pooling uses torch's bin rule.
Eval returns the main logits at input size; ``train=True`` returns ``(main, aux)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vfm_align.models.convnext3d import ConvNeXt3D, ConvNeXt3DConfig
from vfm_align.models.layers import Conv1, gelu, layer_norm
from vfm_align.models.ops3d import adaptive_avg_pool3d, conv3d, depth_chunked, resize_trilinear
from vfm_align.models.registry import register


@dataclasses.dataclass(frozen=True)
class UperNet3DConfig(ConvNeXt3DConfig):
    out_channels: int = 1          # 1 lesion, 9 anatomy
    pool_scales: tuple = (1, 2, 3, 6)
    hidden_size: int = 512
    auxiliary_channels: int = 256
    use_auxiliary_head: bool = True
    head_ln_eps: float = 1e-6


class ConvModule(nnx.Module):
    def __init__(self, cin: int, cout: int, k: int, eps: float, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (k, k, k, cin, cout)) * (cin * k ** 3) ** -0.5)
        self.norm = layer_norm(cout, eps, rngs=rngs)

    def __call__(self, x, pad_depth: bool = True):
        return gelu(self.norm(conv3d(x, self.kernel[...], pad_depth=pad_depth)))


# The full-resolution 3^3 convs of the decode head (fpn_convs[0], fpn_bottleneck) run over depth chunks whose
# depth-folded conv input (slices x H x W x 3 * C_in floats) stays under this many bytes: at the released size
# (64 x 224 x 224 windows) the fpn_bottleneck's whole input would be 1.2 GB, which with the conv's own scratch
# set the inference peak. Small models (the tiny recipes) stay in one piece.
CHUNK_BYTES = 128 << 20


def _depth_chunk(shape, itemsize: int, kernel_size: int, chunk_bytes: int) -> int | None:
    """Output slices per chunk for a k^3 conv of an input of ``shape``, or None when it fits the budget whole."""
    n, d, h, w, c = shape
    per_slice = n * h * w * kernel_size * c * itemsize
    return None if per_slice * d <= chunk_bytes else max(1, chunk_bytes // per_slice)


class UperHead(nnx.Module):
    def __init__(self, cfg: UperNet3DConfig, *, rngs: nnx.Rngs):
        self.chunk_bytes = CHUNK_BYTES  # static: changing it retraces (tests force chunking on small models)
        hs, eps, dims = cfg.hidden_size, cfg.head_ln_eps, cfg.dims
        self.pool_scales = tuple(cfg.pool_scales)
        self.psp_modules = nnx.List([ConvModule(dims[-1], hs, 1, eps, rngs=rngs) for _ in self.pool_scales])
        self.bottleneck = ConvModule(dims[-1] + len(self.pool_scales) * hs, hs, 3, eps, rngs=rngs)
        self.lateral_convs = nnx.List([ConvModule(c, hs, 1, eps, rngs=rngs) for c in dims[:-1]])
        self.fpn_convs = nnx.List([ConvModule(hs, hs, 3, eps, rngs=rngs) for _ in dims[:-1]])
        self.fpn_bottleneck = ConvModule(len(dims) * hs, hs, 3, eps, rngs=rngs)
        self.classifier = Conv1(hs, cfg.out_channels, rngs=rngs)

    def psp(self, x):
        size = x.shape[1:4]
        outs = [x] + [resize_trilinear(m(adaptive_avg_pool3d(x, s)), size)
                      for s, m in zip(self.pool_scales, self.psp_modules)]
        return self.bottleneck(jnp.concatenate(outs, axis=-1))

    def __call__(self, feats):
        lats = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.psp(feats[-1])]
        for i in range(len(lats) - 1, 0, -1):
            lats[i - 1] = lats[i - 1] + resize_trilinear(lats[i], lats[i - 1].shape[1:4])
        outs = [self._conv(conv, l) for conv, l in zip(self.fpn_convs, lats[:-1])] + [lats[-1]]
        size = outs[0].shape[1:4]
        outs = [outs[0]] + [resize_trilinear(o, size) for o in outs[1:]]
        return self._conv(self.fpn_bottleneck, outs, self.classifier)

    def _conv(self, module, xs, after=None):
        """``after(module(concat(xs)))`` (a 'same' k^3 ConvModule of the channel concatenation of ``xs``, then a
        per-voxel op), in depth chunks when large (:func:`depth_chunked`: the concatenation is never made)."""
        xs = list(xs) if isinstance(xs, (list, tuple)) else [xs]
        after = after or (lambda y: y)
        k = module.kernel.shape[0]
        n, d, h, w, _ = xs[0].shape
        cin = sum(x.shape[-1] for x in xs)
        chunk = _depth_chunk((n, d, h, w, cin), xs[0].dtype.itemsize, k, self.chunk_bytes) if k > 1 else None
        if chunk is None:
            return after(module(xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)))
        return depth_chunked(lambda slab: after(module(slab, pad_depth=False)), xs, k // 2, chunk)


class FCNHead(nnx.Module):
    """Auxiliary head on the normed third stage: one 3^3 ConvModule and a 1^3 classifier."""

    def __init__(self, cfg: UperNet3DConfig, *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvModule(cfg.dims[2], cfg.auxiliary_channels, 3, cfg.head_ln_eps, rngs=rngs)])
        self.classifier = Conv1(cfg.auxiliary_channels, cfg.out_channels, rngs=rngs)

    def __call__(self, x):
        for c in self.convs:
            x = c(x)
        return self.classifier(x)


class UperNet3D(nnx.Module):
    def __init__(self, config: UperNet3DConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = ConvNeXt3D(config, rngs=rngs)
        self.hidden_norm = nnx.List([layer_norm(c, config.ln_eps, rngs=rngs) for c in config.dims])
        self.decode_head = UperHead(config, rngs=rngs)
        self.auxiliary_head = FCNHead(config, rngs=rngs) if config.use_auxiliary_head else None

    def logits_lowres(self, x, train: bool = False):
        """Decode-head (and auxiliary, if ``train``) logits before the final resize."""
        feats = [n(s) for n, s in zip(self.hidden_norm, self.encoder.stage_outputs(x))]
        main = self.decode_head(feats)
        if train and self.auxiliary_head is not None:
            return main, self.auxiliary_head(feats[2])
        return main

    def __call__(self, x, train: bool = False):
        size = x.shape[1:4]
        out = self.logits_lowres(x, train)
        if isinstance(out, tuple):
            return tuple(resize_trilinear(o, size) for o in out)
        return resize_trilinear(out, size)


@register("profound_conv_upernet", UperNet3DConfig)
def build_upernet(config: UperNet3DConfig, *, rngs: nnx.Rngs) -> UperNet3D:
    return UperNet3D(config, rngs=rngs)


__all__ = ["UperNet3DConfig", "UperNet3D", "ConvModule"]
