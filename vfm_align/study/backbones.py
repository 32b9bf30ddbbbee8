"""Backbones of the study: building them from a config section and adapting their features.

Three families, one per pretraining objective of the papers:

* ``mae_vit`` -- ProFound's 3D MAE-ViT (masked reconstruction), a volume backbone;
* ``profound_conv`` -- ProFound's 3D ConvNeXt-V2 (FCMAE masked reconstruction), a volume backbone.
  Pretraining trains the whole FCMAE (:data:`PRETRAIN_ARCHS`: encoder + light decoder); only its
  encoder is saved (arch ``profound_conv``), so :func:`vfm_align.load` and fine-tuning see a plain
  ConvNeXt-V2 encoder, exactly like a converted ProFound-Conv checkpoint;
* ``provicnet`` -- ProViCNet's DINOv2-style ViT with slice tokens (patch-level contrastive), run on
  2.5D slices.

:class:`GridFeatures` adds the dense ``patch_map`` the task heads need, without touching the model's
own weights: flat patch tokens put back on their grid (ViTs), or the family's named dense map
(:data:`DENSE_SITES`: the ConvNeXt's last stage, the FCMAE latent that ``patch`` flattens).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfm_align.errors import ConfigError
from vfm_align.models.convnext3d import ConvNeXt3DConfig
from vfm_align.models.fcmae import FCMAEConfig
from vfm_align.models.mae_vit3d import ARCH as MAE_ARCH, MaeViT3dConfig
from vfm_align.models.provicnet import ProViCNetConfig
from vfm_align.models.registry import build_model

FAMILIES = {"mae_vit": "volume", "provicnet": "slices", "profound_conv": "volume"}
# The saved (and fine-tuned) backbone's arch.
ARCHS = {"mae_vit": MAE_ARCH, "provicnet": "provicnet", "profound_conv": "profound_conv"}
# What pretraining trains, where that is more than the backbone (the FCMAE wraps the encoder with its decoder).
PRETRAIN_ARCHS = {"profound_conv": "profound_fcmae"}
# Families whose features() already hold a dense (N, d, h, w, F) map: the one fine-tuning heads read as patch_map.
DENSE_SITES = {"profound_conv": "stage3"}
# FCMAE patch edge: the decoder predicts one patch per last-stage site, so it is the encoder's total stride.
FCMAE_PATCH = 16


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
    if family == "profound_conv":
        if any(s % FCMAE_PATCH for s in volume_shape):
            raise ConfigError(f"volume {tuple(volume_shape)} is not a whole number of FCMAE patches "
                              f"{(FCMAE_PATCH,) * 3} (the ConvNeXt's total stride)")
        return FCMAEConfig(in_chans=3, depths=tuple(int(d) for d in cfg.depths), dims=tuple(int(d) for d in cfg.dims),
                           dwconv_impl=str(cfg.get("dwconv_impl", "auto")), patch_size=(FCMAE_PATCH,) * 3,
                           decoder_dim=int(cfg.decoder_dim), decoder_depth=int(cfg.decoder_depth),
                           norm_pix_loss=bool(cfg.norm_pix_loss))
    raise ConfigError(f"unknown backbone family '{family}'; known: {sorted(FAMILIES)}")


def fresh_backbone(family: str, config, seed: int) -> nnx.Module:
    """A randomly initialised backbone (the fine-tuning baseline; the start of pretraining for the ViT families).

    ``profound_conv`` accepts the FCMAE config too and builds its encoder only.
    """
    if family == "profound_conv" and isinstance(config, ConvNeXt3DConfig):
        config = config.encoder_config()
    model = build_model(ARCHS[family], config, rngs=nnx.Rngs(seed))
    if family == "mae_vit":
        grid = config.grid_for(config.img_size)
        model.pos_embed.set_value(jnp.asarray(sincos_table_3d(config.embed_dim, grid)))
        model.decoder_pos_embed.set_value(jnp.asarray(sincos_table_3d(config.decoder_embed_dim, grid)))
    return model


def pretraining_model(family: str, config, seed: int) -> nnx.Module:
    """The randomly initialised model an objective trains: the FCMAE for ``profound_conv``, else the backbone."""
    if family in PRETRAIN_ARCHS:
        return build_model(PRETRAIN_ARCHS[family], config, rngs=nnx.Rngs(seed))
    return fresh_backbone(family, config, seed)


def saved_backbone(family: str, model: nnx.Module, config):
    """(module, config) of a pretrained model to save as arch ``ARCHS[family]``: the FCMAE's encoder, or the model."""
    if family in PRETRAIN_ARCHS:
        return model.encoder, model.encoder.config
    return model, config


class GridFeatures(nnx.Module):
    """Wraps a backbone so ``features()`` also returns ``patch_map``: flat tokens put back on their grid,
    or the family's dense site (:data:`DENSE_SITES`)."""

    def __init__(self, model: nnx.Module, family: str):
        self.model = model
        self.family = family

    def features(self, *args):
        f = dict(self.model.features(*args))
        if "patch_map" in f:
            return f
        if self.family in DENSE_SITES:
            f["patch_map"] = f[DENSE_SITES[self.family]]
        else:
            x = args[0]
            grid = self.model.config.grid_for(x.shape[1:4])
            f["patch_map"] = f["patch"].reshape(x.shape[0], *grid, f["patch"].shape[-1])
        return f
