"""FCMAE pretraining for ProFound-Conv, dense emulation of the sparse (MinkowskiEngine) encoder.

Masking: a patch grid (input // patch_size) with 1 = removed; the mask is injectable (pass your own
array) or drawn by :func:`random_mask` as the reference does (argsort of uniform noise, keep
int(L * (1 - ratio)) patches). The encoder zeroes masked sites after every layer so they never
leak into visible neighbours (the active set is consistent because patch cells align with every
stride). Decoder: 1x1x1 proj -> mask token at masked sites -> ConvNeXt-V2 block(s) -> 1x1x1 pred.

GRN choice: the reference's MinkowskiGRN pools its L2 norm over the active voxels of the WHOLE
batch; this port pools per sample (the dense GRN), so each sample's loss is independent of its
batch mates. With batch size 1 the two agree.

Loss: per-patch target in (pd, ph, pw, C) order, C last; with ``norm_pix_loss`` normalised by the
patch mean and UNBIASED variance (+1e-6 inside the sqrt); MSE over features, averaged over masked
patches only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vfm_align.models.convnext3d import Block, ConvNeXt3D, ConvNeXt3DConfig
from vfm_align.models.layers import Conv1
from vfm_align.models.ops3d import upsample_nearest3d
from vfm_align.models.registry import register


@dataclasses.dataclass(frozen=True)
class FCMAEConfig(ConvNeXt3DConfig):
    patch_size: tuple = (16, 16, 16)
    decoder_dim: int = 512
    decoder_depth: int = 1
    mask_ratio: float = 0.6
    norm_pix_loss: bool = True
    norm_pix_eps: float = 1e-6


def random_mask(key: jax.Array, n: int, grid, ratio: float) -> jax.Array:
    """(n, gd, gh, gw) float mask, 1 = removed, exactly int(L*(1-ratio)) kept per sample."""
    grid = tuple(grid)
    length = grid[0] * grid[1] * grid[2]
    keep = int(length * (1 - ratio))
    noise = jax.random.uniform(key, (n, length))
    return mask_from_noise(noise, keep).reshape(n, *grid)


def mask_from_noise(noise: jax.Array, n_keep: int) -> jax.Array:
    """The reference rule: the n_keep lowest-noise patches are kept (0), the rest removed (1)."""
    ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
    return (ranks >= n_keep).astype(jnp.float32)


def patchify(x: jax.Array, patch) -> jax.Array:
    """(N, D, H, W, C) -> (N, L, pd*ph*pw*C), patches row-major over the grid, features C last."""
    n, d, h, w, c = x.shape
    pd, ph, pw = patch
    x = x.reshape(n, d // pd, pd, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def masked_patch_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool = True,
                      eps: float = 1e-6) -> jax.Array:
    """pred/target (N, L, F), mask (N, L) with 1 = removed."""
    if norm_pix:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + eps)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class FCMAE(nnx.Module):
    """``model(x, mask)`` -> (loss, pred (N, L, F), mask (N, L)); ``mask`` (N, gd, gh, gw), 1 = removed."""

    def __init__(self, config: FCMAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = ConvNeXt3D(config, rngs=rngs)
        e = config.decoder_dim
        self.proj = Conv1(config.dims[-1], e, rngs=rngs)
        self.mask_token = nnx.Param(jnp.zeros((e,)))
        dec_cfg = dataclasses.replace(config.encoder_config(), drop_path_rate=0.0)
        self.decoder = nnx.List([Block(e, dec_cfg, 0.0, rngs=rngs) for _ in range(config.decoder_depth)])
        pd, ph, pw = config.patch_size[:3]
        self.pred = Conv1(e, config.in_chans * pd * ph * pw, rngs=rngs)

    def _keeps(self, mask):
        """Visibility masks (N, d, h, w, 1) at each stage's resolution (strides 4, 8, 16, 16)."""
        vis = (1.0 - mask)[..., None]
        p = self.config.patch_size[0]
        if any(s != p for s in self.config.patch_size):
            raise ValueError(f"patch_size must be cubic, got {self.config.patch_size}")
        return [upsample_nearest3d(vis, f) if f > 1 else vis for f in (p // 4, p // 8, p // 16, p // 16)]

    def forward_encoder(self, x, mask):
        return self.encoder.stage_outputs(x, self._keeps(mask))[-1]

    def forward_decoder(self, latent, mask):
        x = self.proj(latent)
        m = mask[..., None]
        x = x * (1.0 - m) + self.mask_token[...] * m
        for blk in self.decoder:
            x = blk(x)
        pred = self.pred(x)
        return pred.reshape(pred.shape[0], -1, pred.shape[-1])

    def __call__(self, x, mask):
        latent = self.forward_encoder(x, mask)
        pred = self.forward_decoder(latent, mask)
        flat = mask.reshape(mask.shape[0], -1)
        target = patchify(x, self.config.patch_size)
        loss = masked_patch_loss(pred, target, flat, self.config.norm_pix_loss, self.config.norm_pix_eps)
        return loss, pred, flat


@register("profound_fcmae", FCMAEConfig)
def build_fcmae(config: FCMAEConfig, *, rngs: nnx.Rngs) -> FCMAE:
    return FCMAE(config, rngs=rngs)


__all__ = ["FCMAEConfig", "FCMAE", "random_mask", "mask_from_noise", "patchify", "masked_patch_loss"]
