"""The shared skeleton of every fine-tuning recipe in ``configs/``: one ml_collections ConfigDict.

``base_config(backbone, task, variant)`` fills every field the loop reads with neutral values;
``recipe_config`` adds the reference fine-tuning settings of each backbone and task (each cited), and
is what ``configs/finetune.py`` returns. ``variant`` "tiny" gives CPU-sized models and volumes
(16x32x32 voxels; widths 16-32) for smoke runs and tests; "default" the released sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections as mlc

from vfm_align.data.tasks import TASKS, get_task
from vfm_align.errors import ConfigError


class Backbone(NamedTuple):
    """One backbone of the recipes: the arch it is built (and saved) as, its family ("volume": whole volumes;
    "slices": 2.5D slices), its released and its tiny (CPU-sized) config, and its in-loop alignment sites."""

    arch: str
    family: str
    released: dict
    tiny: dict
    sites: tuple[str, ...]
    released_shape: tuple[int, int, int] = (64, 224, 224)  # the (D, H, W) volumes of the released recipes


# ConvNeXt-V2 "tiny for CPU" sizes (reference: depths (3, 3, 9, 3), dims (96, 192, 384, 768)). The "lax"
# depthwise conv: the CPU-fast "shift" form is slow to compile, which dominates tiny runs.
TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 32), "dwconv_impl": "lax"}

BACKBONES = {
    "profound_conv": Backbone("profound_conv", "volume", {}, TINY_CONVNEXT, ("pooled", "stage3")),
    "profound_mae": Backbone("profound_mae_vit", "volume", {},
                             {"patch_size": (4, 8, 8), "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64,
                              "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
                              "decoder_mlp_dim": 32, "num_patches": 64, "img_size": (16, 32, 32)},
                             ("pooled", "patch"), (64, 256, 256)),  # the released MAE-ViT's positional table
    "provicnet": Backbone("provicnet", "slices", {"cl_out": 0},
                          {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                           "mlp_hidden": 64, "pos_src_grid": 4, "head_channels": (8, 8), "cl_out": 0},
                          ("pooled", "patch")),
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; known: {sorted(BACKBONES)}")
    return BACKBONES[name]


VARIANTS = ("default", "tiny")


def base_config(backbone: str, task: str, variant: str = "default") -> mlc.ConfigDict:
    b = get_backbone(backbone)
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; known: {sorted(TASKS)}")
    if variant not in VARIANTS:
        raise ConfigError(f"unknown recipe variant '{variant}' (choose {' or '.join(VARIANTS)})")
    tiny = variant == "tiny"
    c = mlc.ConfigDict()
    c.run = dict(workdir=f"runs/{backbone}_{task}", seed=0)
    c.model = dict(arch=b.arch, config=dict(b.tiny if tiny else b.released), pretrained="", family=b.family,
                   feature_site="", head_hidden=16 if tiny else 64, freeze_backbone=False,
                   slice_channel=0, slice_window=3, slice_size=0 if tiny else 448)
    c.task = dict(name=task, num_outputs=get_task(task).num_outputs, loss="")
    # root: a cohort manifest; cache: the preprocessing cache (default: beside the manifest).
    c.data = dict(root="", cache="", shape=(16, 32, 32) if tiny else b.released_shape)
    # AdamW + warmup/cosine, as ProFound's fine-tuning engines (reference-models.md 2.7).
    c.optim = dict(name="adamw", lr=1e-3 if tiny else 1e-4, min_lr=1e-6, warmup_steps=5 if tiny else 200,
                   weight_decay=1e-5, b1=0.9, b2=0.999, eps=1e-8, layer_decay=1.0 if tiny else 0.75,
                   backbone_lr_mult=1.0, clip_norm=1.0, grad_accum=1)
    # remat: rematerialise each backbone block in the backward pass (activation memory for compute).
    c.train = dict(steps=60 if tiny else 5000, batch_size=8, eval_every=20 if tiny else 250,
                   ckpt_every=20 if tiny else 250, log_every=10 if tiny else 50, augment=True,
                   compute_dtype="float32", async_checkpoint=True, remat=False)
    # fsdp_min_size: weights smaller than this stay replicated.
    c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**10 if tiny else 2**16)
    c.align = dict(every=20 if tiny else 250, sites=b.sites, probe_cases=8 if tiny else 32,
                   num_features=512 if tiny else 2048, max_rows=2048 if tiny else 8192)
    return c


def recipe_config(backbone: str, task: str, variant: str = "default") -> mlc.ConfigDict:
    """``base_config`` plus the reference fine-tuning settings of ``backbone`` and ``task``."""
    cfg = base_config(backbone, task, variant)
    # ProFound keeps base_config's layer decay (0.75 over ConvNeXt-V2's 18 layers, ProFound
    # util/convnext_optim.py "single" mode; over the ViT's blocks, as MAE fine-tuning does).
    if backbone == "provicnet":
        # ProViCNet fine-tuning: backbone lr 0.05x the head's, no layer decay (reference-models.md 4.5).
        cfg.optim.backbone_lr_mult = 0.05
        cfg.optim.layer_decay = 1.0
    if task in ("super_resolution", "distortion_correction") and variant == "tiny":
        # Tiny (CPU) runs are a few dozen steps and the restoration head (which starts at the identity)
        # learns its correction from scratch: a higher peak lr than the other tiny recipes. ProFound-Conv
        # super-resolution on tests/test_train_loop.py's synthetic check, 30 steps, PSNR over the degraded
        # input: +1.3 dB at lr 1e-3, +2.0 dB at 5e-3, +1.9 dB at 1e-2.
        cfg.optim.lr = 5e-3
    return cfg


def pretrain_optim(lr: float = 1e-3, warmup: int = 5) -> mlc.ConfigDict:
    """The optimiser of the pretraining recipes: AdamW, betas (0.9, 0.95), weight decay 0.05 (ProFound's
    FCMAE / MAE recipe), warmup + cosine to 1e-5, clipping at 1."""
    return mlc.ConfigDict(dict(name="adamw", lr=lr, min_lr=1e-5, warmup_steps=warmup, weight_decay=0.05,
                               b1=0.9, b2=0.95, eps=1e-8, layer_decay=1.0, backbone_lr_mult=1.0, clip_norm=1.0,
                               grad_accum=1))
