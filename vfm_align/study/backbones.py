"""Backbones of the study: building them from a config section and adapting their features.

Two families, one per pretraining objective of the paper:

* ``mae_vit`` -- ProFound's 3D MAE-ViT (masked reconstruction), a volume backbone;
* ``provicnet`` -- ProViCNet's DINOv2-style ViT with slice tokens (patch-level contrastive), run on
  2.5D slices.

:class:`GridFeatures` adds the dense ``patch_map`` the task heads need to a backbone whose
``features()`` returns flat patch tokens, without touching the model's own weights.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfm_align.errors import ConfigError
from vfm_align.models.mae_vit3d import ARCH as MAE_ARCH, MaeViT3dConfig
from vfm_align.models.provicnet import ProViCNetConfig
from vfm_align.models.registry import build_model

FAMILIES = {"mae_vit": "volume", "provicnet": "slices"}
ARCHS = {"mae_vit": MAE_ARCH, "provicnet": "provicnet"}


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_table_3d(dim: int, grid: tuple[int, int, int]) -> np.ndarray:
    """(1, 1 + gd*gh*gw, dim) fixed table for a freshly initialised MAE (zero class row).

    Row-major over (d, h, w) with a third of the width per axis; used only for models trained
    from scratch here (converted checkpoints bring their own table).
    """
    if dim % 6:
        raise ConfigError(f"MAE embed width {dim} must be divisible by 6 for a 3-D sin-cos table")
    d, h, w = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 3, a) for a in (d, h, w)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)[None].astype(np.float32)


def backbone_config(family: str, cfg, volume_shape: tuple[int, int, int]):
    """The model config for ``family`` from a ConfigDict section (sizes) and the (D, H, W) input shape."""
    if family == "mae_vit":
        patch = tuple(int(p) for p in cfg.patch_size)
        grid = tuple(s // p for s, p in zip(volume_shape, patch))
        if any(s % p for s, p in zip(volume_shape, patch)):
            raise ConfigError(f"volume {volume_shape} is not a whole number of MAE patches {patch}")
        return MaeViT3dConfig(patch_size=patch, in_chans=3, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                              decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
                              decoder_num_heads=cfg.decoder_num_heads, decoder_mlp_dim=cfg.decoder_mlp_dim,
                              num_patches=math.prod(grid), img_size=tuple(volume_shape),
                              norm_pix_loss=bool(cfg.norm_pix_loss))
    if family == "provicnet":
        h, w = volume_shape[1:]
        if h != w or h % cfg.patch_size:
            raise ConfigError(f"ProViCNet needs square slices divisible by its patch {cfg.patch_size}; got {h}x{w}")
        grid = h // cfg.patch_size
        return ProViCNetConfig(img_size=h, patch_size=cfg.patch_size, in_chans=3, embed_dim=cfg.embed_dim,
                               depth=cfg.depth, num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_dim,
                               num_registers=cfg.num_registers, pos_src_grid=grid,
                               head_channels=tuple(cfg.head_channels), num_classes=2,
                               cl_hidden=cfg.cl_hidden, cl_bottleneck=cfg.cl_bottleneck, cl_out=cfg.cl_out)
    raise ConfigError(f"unknown backbone family '{family}'; known: {sorted(FAMILIES)}")


def fresh_backbone(family: str, config, seed: int) -> nnx.Module:
    """A randomly initialised backbone (the baseline, and the start of pretraining)."""
    model = build_model(ARCHS[family], config, rngs=nnx.Rngs(seed))
    if family == "mae_vit":
        grid = config.grid_for(config.img_size)
        model.pos_embed.set_value(jnp.asarray(sincos_table_3d(config.embed_dim, grid)))
        model.decoder_pos_embed.set_value(jnp.asarray(sincos_table_3d(config.decoder_embed_dim, grid)))
    return model


class GridFeatures(nnx.Module):
    """Wraps a backbone so ``features()`` also returns ``patch_map``: flat tokens put back on their grid."""

    def __init__(self, model: nnx.Module, family: str):
        self.model = model
        self.family = family

    def features(self, *args):
        f = dict(self.model.features(*args))
        if "patch_map" not in f:
            x = args[0]
            grid = self.model.config.grid_for(x.shape[1:4])
            f["patch_map"] = f["patch"].reshape(x.shape[0], *grid, f["patch"].shape[-1])
        return f
