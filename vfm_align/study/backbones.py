"""Backbones of the study: building them from a config section and adapting their features.

Three backbones (the names of the fine-tuning recipes, :data:`vfm_align.train.recipes.BACKBONES`), one per
pretraining objective of the papers:

* ``profound_mae`` -- ProFound's 3D MAE-ViT (masked reconstruction), a volume backbone;
* ``profound_conv`` -- ProFound's 3D ConvNeXt-V2 (FCMAE masked reconstruction), a volume backbone.
  Pretraining trains the whole FCMAE (:data:`PRETRAIN_ARCHS`: encoder + light decoder); only its
  encoder is saved (arch ``profound_conv``), so :func:`vfm_align.load` and fine-tuning see a plain
  ConvNeXt-V2 encoder, exactly like a converted ProFound-Conv checkpoint;
* ``provicnet`` -- ProViCNet's DINOv2-style ViT with slice tokens (patch-level contrastive), run on
  2.5D slices.

:class:`GridFeatures` adds the dense ``patch_map`` the task heads need, without touching the model's
own weights: flat patch tokens put back on their grid (ViTs), or the backbone's named dense map
(:data:`DENSE_SITES`: the ConvNeXt's last stage, the FCMAE latent that ``patch`` flattens).
"""

from __future__ import annotations

import math

from flax import nnx

from vfm_align.errors import ConfigError
from vfm_align.models.convnext3d import ConvNeXt3DConfig
from vfm_align.models.fcmae import FCMAEConfig
from vfm_align.models.mae_vit3d import MaeViT3d, MaeViT3dConfig
from vfm_align.models.provicnet import ProViCNetConfig
from vfm_align.models.registry import build_model
from vfm_align.train.recipes import BACKBONES

# The saved (and fine-tuned) backbone's arch.
ARCHS = {name: b.arch for name, b in BACKBONES.items()}
# What pretraining trains, where that is more than the backbone (the FCMAE wraps the encoder with its decoder).
PRETRAIN_ARCHS = {"profound_conv": "profound_fcmae"}
# Backbones whose features() already hold a dense (N, d, h, w, F) map: the one fine-tuning heads read as patch_map.
DENSE_SITES = {"profound_conv": "stage3"}
# FCMAE patch edge: the decoder predicts one patch per last-stage site, so it is the encoder's total stride.
FCMAE_PATCH = 16


def backbone_config(backbone: str, cfg, volume_shape: tuple[int, int, int]):
    """The model config for ``backbone`` from a ConfigDict section (sizes) and the (D, H, W) input shape."""
    if backbone == "profound_mae":
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
    if backbone == "provicnet":
        h, w = volume_shape[1:]
        if h != w or h % cfg.patch_size:
            raise ConfigError(f"ProViCNet needs square slices divisible by its patch {cfg.patch_size}; got {h}x{w}")
        grid = h // cfg.patch_size
        return ProViCNetConfig(img_size=h, patch_size=cfg.patch_size, in_chans=3, embed_dim=cfg.embed_dim,
                               depth=cfg.depth, num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_dim,
                               num_registers=cfg.num_registers, pos_src_grid=grid,
                               head_channels=tuple(cfg.head_channels), num_classes=2,
                               cl_hidden=cfg.cl_hidden, cl_bottleneck=cfg.cl_bottleneck, cl_out=cfg.cl_out)
    if backbone == "profound_conv":
        if any(s % FCMAE_PATCH for s in volume_shape):
            raise ConfigError(f"volume {tuple(volume_shape)} is not a whole number of FCMAE patches "
                              f"{(FCMAE_PATCH,) * 3} (the ConvNeXt's total stride)")
        return FCMAEConfig(in_chans=3, depths=tuple(int(d) for d in cfg.depths), dims=tuple(int(d) for d in cfg.dims),
                           dwconv_impl=str(cfg.get("dwconv_impl", "auto")), patch_size=(FCMAE_PATCH,) * 3,
                           decoder_dim=int(cfg.decoder_dim), decoder_depth=int(cfg.decoder_depth),
                           norm_pix_loss=bool(cfg.norm_pix_loss))
    raise ConfigError(f"unknown backbone '{backbone}'; known: {sorted(ARCHS)}")


def fresh_backbone(backbone: str, config, seed: int) -> nnx.Module:
    """A randomly initialised backbone (the fine-tuning baseline; the start of pretraining for the ViTs).

    ``profound_conv`` accepts the FCMAE config too and builds its encoder only.
    """
    if backbone == "profound_conv" and isinstance(config, ConvNeXt3DConfig):
        config = config.encoder_config()
    model = build_model(ARCHS[backbone], config, rngs=nnx.Rngs(seed))
    if isinstance(model, MaeViT3d):
        model.set_sincos_pos_embed()
    return model


def pretraining_model(backbone: str, config, seed: int) -> nnx.Module:
    """The randomly initialised model an objective trains: the FCMAE for ``profound_conv``, else the backbone."""
    if backbone in PRETRAIN_ARCHS:
        return build_model(PRETRAIN_ARCHS[backbone], config, rngs=nnx.Rngs(seed))
    return fresh_backbone(backbone, config, seed)


def saved_backbone(backbone: str, model: nnx.Module, config):
    """(module, config) of a pretrained model to save as arch ``ARCHS[backbone]``: the FCMAE's encoder, or the model."""
    if backbone in PRETRAIN_ARCHS:
        return model.encoder, model.encoder.config
    return model, config


class GridFeatures(nnx.Module):
    """Wraps a backbone so ``features()`` also returns ``patch_map``: flat tokens put back on their grid,
    or the backbone's dense site (:data:`DENSE_SITES`)."""

    def __init__(self, model: nnx.Module, backbone: str):
        self.model = model
        self.name = backbone

    def features(self, *args, layers: bool = False):
        f = dict(self.model.features(*args, **({"layers": True} if layers else {})))
        if "patch_map" in f:
            return f
        if self.name in DENSE_SITES:
            f["patch_map"] = f[DENSE_SITES[self.name]]
        else:
            x = args[0]
            grid = self.model.config.grid_for(x.shape[1:4])
            f["patch_map"] = f["patch"].reshape(x.shape[0], *grid, f["patch"].shape[-1])
        return f
