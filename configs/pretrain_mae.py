"""Masked-reconstruction pretraining of a tiny ProFound MAE-ViT (ratio 0.75, per-patch normalised loss).

    vfm-align pretrain --config configs/pretrain_mae.py --out runs/mae_pretrained

Inputs (N, D, H, W, 3) volumes [T2w, ADC, DWI] of the phantom cohort; a few minutes on a 2-core CPU.
"""

import ml_collections as mc

from vfm_align.train.recipes import pretrain_optim


def get_config():
    return mc.ConfigDict(dict(
        backbone="profound_mae", objective="mae", seed=0, steps=60, batch_size=4,
        mesh=dict(devices=1, data=1, fsdp=1),
        optim=pretrain_optim(),
        model=dict(patch_size=(4, 8, 8), embed_dim=48, depth=2, num_heads=2, mlp_dim=96, decoder_embed_dim=24,
                   decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=48, norm_pix_loss=True),
        objective_args=dict(mask_ratio=0.75),  # MAE default; ProFound's FCMAE demo uses 0.6
        cohort=dict(manifest="", cases=24, shape=(16, 64, 64), crop=(32, 32)),  # 1.5 mm in-plane, gland-centred
    ))
