"""The default transfer study: MAE-pretrained vs contrastive-pretrained backbones on five tasks.

    vfm-align study                      # this file, phantom cohort generated into ./study_out/cohort
    vfm-align study --config configs/study_default.py --out study_out

Tiny models and volumes so it finishes on a 2-core CPU; for a real cohort set cohort.manifest and
give converted checkpoints as backbones[i].weights (see README, section "study").
"""

import ml_collections as mc

from vfm_align.config_file import recipe_module
from vfm_align.train.recipes import pretrain_optim


def get_config(pretrain_steps=400, finetune_steps=150, cases=96):
    mae = recipe_module("pretrain_mae.py", beside=__file__).get_config()
    con = recipe_module("pretrain_contrastive.py", beside=__file__).get_config()
    for p in (mae, con):
        p.steps = pretrain_steps
    return mc.ConfigDict(dict(
        seed=0,
        cohort=dict(manifest="", cases=cases, shape=(16, 64, 64), crop=(32, 32)),  # 1.5 mm in-plane, gland-centred
        mesh=dict(devices=1, data=1, fsdp=1),
        tasks=["classification", "segmentation", "detection", "super_resolution", "distortion_correction"],
        # backbone: profound_conv, profound_mae or provicnet (the names of configs/finetune.py).
        backbones=[
            mc.ConfigDict(dict(name="reconstruction", backbone="profound_mae", weights="",
                               pretrain=mae)),
            mc.ConfigDict(dict(name="contrastive", backbone="provicnet", weights="",
                               pretrain=con)),
        ],
        finetune=dict(steps=finetune_steps, eval_every=max(1, finetune_steps // 10), batch_size=4, head_hidden=16,
                      slice_channel=0, slice_window=3, augment=True, probe_cases=8,
                      sites=["pooled", "patch"], rff_features=1024, max_rows=2048,
                      optim=pretrain_optim(lr=5e-4, warmup=2)),
        workers=2,  # fine-tunes run two at a time (threads): ~1.4x sooner on 2 cores, same numbers as 1
        primary_site="pooled",
        gain_floor=0.05,  # relative gain = (pretrained - random) / max(|random|, gain_floor)
        num_permutations=1000,
        num_bootstrap=2000,
        num_correlation_permutations=2000,
    ))
