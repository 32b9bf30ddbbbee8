"""ProFound-Conv: the 3D ConvNeXt-V2 encoder (channels-last).

Stem Conv3d k=4 s=4 + LN; downsamples LN + Conv3d k=2 s=2 (the last one k=1 s=1, so the total
stride is 16); blocks dwconv 7^3 -> LN -> Linear 4x -> exact GELU -> GRN -> Linear, residual.
The forward returns LN(mean over D,H,W of the last stage) and optionally the four raw stage maps.

``keep`` masks (1 = visible) turn on the dense emulation of FCMAE's sparse encoder: every layer's
output is re-zeroed at masked sites so nothing leaks into visible neighbours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vfm_align.models.layers import RematBlock, gelu, layer_norm, run_block
from vfm_align.models.ops3d import depthwise_conv3d, patch_conv3d, resolve_dwconv_impl
from vfm_align.models.registry import register


@dataclasses.dataclass(frozen=True)
class ConvNeXt3DConfig:
    in_chans: int = 3
    depths: tuple = (3, 3, 9, 3)
    dims: tuple = (96, 192, 384, 768)
    ln_eps: float = 1e-6          # every LayerNorm of the reference
    grn_eps: float = 1e-6         # GRN: Gx / (mean_C Gx + eps)
    drop_path_rate: float = 0.0   # 0.1 in the reference fine-tuning
    dwconv_impl: str = "auto"     # 'auto' | 'shift' | 'lax' (see ops3d.depthwise_conv3d)

    @classmethod
    def tiny(cls, **kw):
        return cls(**kw)

    def encoder_config(self) -> ConvNeXt3DConfig:
        names = {f.name for f in dataclasses.fields(ConvNeXt3DConfig)}
        return ConvNeXt3DConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def _fan_in_normal(rngs, shape, fan_in):
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * (fan_in ** -0.5))


class GRN(nnx.Module):
    """Global response normalisation, pooled per sample over D, H, W (the dense reference form)."""

    def __init__(self, dim: int, eps: float):
        self.gamma = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        gx = jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2, 3), keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + self.eps)
        return self.gamma[...] * (x * nx) + self.beta[...] + x


class PatchConv(nnx.Module):
    """Conv3d with kernel == stride (VALID), kernel stored (k, k, k, I, O)."""

    def __init__(self, cin: int, cout: int, k: int, *, rngs: nnx.Rngs):
        self.kernel = _fan_in_normal(rngs, (k, k, k, cin, cout), cin * k ** 3)
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x):
        return patch_conv3d(x, self.kernel[...], self.bias[...])


class Block(RematBlock, nnx.Module):
    def __init__(self, dim: int, cfg: ConvNeXt3DConfig, drop_path: float, *, rngs: nnx.Rngs):
        self.dwconv_kernel = _fan_in_normal(rngs, (7, 7, 7, dim), 343)
        self.dwconv_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.norm = layer_norm(dim, cfg.ln_eps, rngs=rngs)
        self.pwconv1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.grn = GRN(4 * dim, cfg.grn_eps)
        self.pwconv2 = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.impl = cfg.dwconv_impl
        # Stochastic depth = dropout of the whole residual branch per sample (timm scales by 1/keep).
        self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3, 4), deterministic=True, rngs=rngs)
                          if drop_path > 0 else None)

    def __call__(self, x, keep=None):
        y = depthwise_conv3d(x, self.dwconv_kernel[...], (3, 3, 3), impl=self.impl) + self.dwconv_bias[...]
        y = gelu(self.pwconv1(self.norm(y)))
        if keep is not None:
            y = y * keep
        y = self.pwconv2(self.grn(y))
        if self.drop_path is not None:
            y = self.drop_path(y)
        x = x + y
        return x if keep is None else x * keep


class ConvNeXt3D(nnx.Module):
    """ProFound-Conv encoder. ``model(x, return_stages=False)``; x is (N, D, H, W, in_chans)."""

    def __init__(self, config: ConvNeXt3DConfig, *, rngs: nnx.Rngs):
        cfg = config.encoder_config()
        resolve_dwconv_impl(cfg.dwconv_impl)  # fail early on a bad name
        self.config = cfg
        dims = cfg.dims
        self.stem = PatchConv(cfg.in_chans, dims[0], 4, rngs=rngs)
        self.stem_norm = layer_norm(dims[0], cfg.ln_eps, rngs=rngs)
        self.down_norms = nnx.List([layer_norm(dims[i], cfg.ln_eps, rngs=rngs) for i in range(3)])
        self.downs = nnx.List([PatchConv(dims[i], dims[i + 1], 2 if i < 2 else 1, rngs=rngs) for i in range(3)])
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, j = [], 0
        for s, depth in enumerate(cfg.depths):
            stages.append(nnx.List([Block(dims[s], cfg, rates[j + b], rngs=rngs) for b in range(depth)]))
            j += depth
        self.stages = nnx.List(stages)
        self.norm = layer_norm(dims[-1], cfg.ln_eps, rngs=rngs)

    def stage_outputs(self, x, keeps=None, blocks: dict | None = None):
        """The four raw stage maps. ``keeps``: per-stage visibility masks (N, d, h, w, 1) or None.
        ``blocks``: a dict that receives every block's output map as "stage{s}_block{b}"."""
        outs = []
        for s in range(4):
            keep = None if keeps is None else keeps[s]
            if s == 0:
                x = self.stem_norm(self.stem(x))
            else:
                x = self.down_norms[s - 1](x)
                if keep is not None:  # LN gives masked (zero) sites its bias; keep them empty
                    x = x * keeps[s - 1]
                x = self.downs[s - 1](x)
            if keep is not None:
                x = x * keep
            for b, blk in enumerate(self.stages[s]):
                x = run_block(blk, x, keep)
                if blocks is not None:
                    blocks[f"stage{s}_block{b}"] = x
            outs.append(x)
        return outs

    def __call__(self, x, return_stages: bool = False):
        stages = self.stage_outputs(x)
        pooled = self.norm(jnp.mean(stages[-1], axis=(1, 2, 3)))
        return (pooled, stages) if return_stages else pooled

    def features(self, x, *, layers: bool = False) -> dict:
        """Named features for alignment scoring: pooled, stage0..stage3 (channels-last), patch tokens.

        ``layers=True`` adds every block's output map, "stage{s}_block{b}" (N, d, h, w, C), for per-layer
        alignment scores (the last block of a stage is that stage's map).
        """
        blocks = {} if layers else None
        stages = self.stage_outputs(x, blocks=blocks)
        pooled = self.norm(jnp.mean(stages[-1], axis=(1, 2, 3)))
        out = {"pooled": pooled, **(blocks or {})}
        out.update({f"stage{i}": s for i, s in enumerate(stages)})
        last = stages[-1]
        out["patch"] = last.reshape(last.shape[0], -1, last.shape[-1])
        return out


@register("profound_conv", ConvNeXt3DConfig)
def build_encoder(config: ConvNeXt3DConfig, *, rngs: nnx.Rngs) -> ConvNeXt3D:
    return ConvNeXt3D(config, rngs=rngs)


__all__ = ["ConvNeXt3DConfig", "ConvNeXt3D", "Block", "GRN", "PatchConv"]
