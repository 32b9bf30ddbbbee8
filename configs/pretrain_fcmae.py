"""FCMAE masked-reconstruction pretraining of a tiny ProFound-Conv (3D ConvNeXt-V2), ratio 0.6, norm_pix_loss.

    vfm-align pretrain --config configs/pretrain_fcmae.py --out runs/fcmae_pretrained

The whole FCMAE (sparse-emulating encoder + one-block decoder) is trained; the output directory holds
only its encoder (arch ``profound_conv``), which ``vfm_align.load`` restores as a ConvNeXt-V2 with
``features()`` (pooled, stage0..stage3, patch), the same as a converted ProFound-Conv checkpoint.

Reference values (ProFound ``demo_pretrain.sh`` / ``models/fcmae.py``, see reference-models.md 2.4, 2.7):
mask ratio 0.6, ``--norm_pix_loss`` (per-patch mean / unbiased variance, +1e-6), 16^3 patches, one
decoder block, AdamW lr 1e-3 (not batch-scaled), betas (0.9, 0.95), wd 0.05. The patch is fixed at
16^3 (the encoder's total stride), so the cohort's 16x32x32 crops give a 1x2x2 mask grid: int(4 * 0.4)
= 1 patch kept, an effective ratio of 0.75 (the reference's 4x14x14 grid keeps 313 of 784).
Inputs (N, D, H, W, 3) volumes [T2w, high-b DWI, ADC] of the phantom cohort; a minute or two on a 2-core CPU.
"""

import ml_collections as mc

from vfm_align.train.recipes import TINY_CONVNEXT, pretrain_optim


def get_config():
    return mc.ConfigDict(dict(
        backbone="profound_conv", objective="fcmae", seed=0, steps=60, batch_size=4,
        mesh=dict(devices=1, data=1, fsdp=1),
        # AdamW lr 1e-3, betas (0.9, 0.95), wd 0.05: ProFound's FCMAE recipe (plus warmup 5 and clipping at 1).
        optim=pretrain_optim(),
        # The ConvNeXt-V2 "tiny for CPU" sizes of the fine-tuning recipes (train/recipes.py TINY_CONVNEXT).
        # Reference: depths (3, 3, 9, 3), dims (96, 192, 384, 768), decoder_dim 512, decoder_depth 1.
        model=dict(**TINY_CONVNEXT, decoder_dim=32, decoder_depth=1, norm_pix_loss=True),  # ProFound: --norm_pix_loss
        objective_args=dict(mask_ratio=0.6),  # ProFound's FCMAE demo and forward default (main_pretrain.py CLI: 0.75)
        cohort=dict(manifest="", cases=24, shape=(16, 64, 64), crop=(32, 32)),  # 1.5 mm in-plane, gland-centred
    ))
