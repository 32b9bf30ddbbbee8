"""Patch-level contrastive pretraining of a tiny ProViCNet (pair loss on cancer blocks + InfoNCE of two views).

    vfm-align pretrain --config configs/pretrain_contrastive.py --out runs/contrastive_pretrained

Pairs follow ProViCNet (anchors >= 62/64 cancer pixels per 8x8 block) rescaled to this model's 4x4
token blocks: anchors >= 15/16, distant negatives <= 0/16, at most 30 pairs of each kind per batch.
"""

import ml_collections as mc

from vfm_align.train.recipes import pretrain_optim


def get_config():
    return mc.ConfigDict(dict(
        backbone="provicnet", objective="contrastive", seed=0, steps=60, batch_size=2,
        mesh=dict(devices=1, data=1, fsdp=1),
        optim=pretrain_optim(),
        model=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_registers=4, head_channels=(8,),
                   cl_hidden=64, cl_bottleneck=32, cl_out=128),
        objective_args=dict(slice_channel=0, slice_window=3, pair_block=4, pair_hi=15, pair_lo=0, max_pair=30,
                            margin=0.5, pair_weight=1.0, infonce_weight=1.0, infonce_samples=128, temperature=0.1),
        cohort=dict(manifest="", cases=24, shape=(16, 64, 64), crop=(32, 32)),  # 1.5 mm in-plane, gland-centred
    ))
