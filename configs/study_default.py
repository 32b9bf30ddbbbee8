"""The default transfer study: three pretraining objectives (MAE-ViT, FCMAE ConvNeXt, ProViCNet contrastive)
on five tasks, three fine-tuning seeds.

    vfm-align study                      # this file; phantom cohorts generated into ./study_out
    vfm-align study --config configs/study_default.py --out study_out

Tiny models and volumes so it runs on a 2-core CPU. The backbones pretrain on their own cohort (the
phantom drawn with seed + 1, ``cohort.pretrain_cases`` cases, all used), never on the fine-tuning
cohort, whose train / val / test splits fine-tune / draw the curves / give the final metric; the
probe set for alignment is ``finetune.probe_cases`` held-out (val, then test) cases. For a real
cohort set cohort.manifest (and cohort.pretrain_manifest, or give converted checkpoints as
backbones[i].weights); see README, section "study". "reconstruction_conv" needs volumes that are
whole multiples of 16 voxels per axis (the FCMAE patch, the ConvNeXt's total stride).
"""

import ml_collections as mc

from vfm_align.config_file import recipe_module
from vfm_align.train.recipes import pretrain_optim


def get_config(pretrain_steps=400, finetune_steps=150, cases=128, seeds=3):
    mae = recipe_module("pretrain_mae.py", beside=__file__).get_config()
    con = recipe_module("pretrain_contrastive.py", beside=__file__).get_config()
    fcmae = recipe_module("pretrain_fcmae.py", beside=__file__).get_config()
    for p in (mae, con, fcmae):
        p.steps = pretrain_steps
    return mc.ConfigDict(dict(
        seed=0,
        # 128 cases at 70/15/15: 90 train, 19 val, 19 test (the 32 probes come from val + test).
        cohort=dict(manifest="", cases=cases, shape=(16, 64, 64), crop=(32, 32),  # 1.5 mm in-plane, gland-centred
                    pretrain_manifest="", pretrain_cases=96),
        mesh=dict(devices=1, data=1, fsdp=1),
        tasks=["classification", "segmentation", "detection", "super_resolution", "distortion_correction"],
        # backbone: profound_conv, profound_mae or provicnet (the names of configs/finetune.py).
        backbones=[
            mc.ConfigDict(dict(name="reconstruction", backbone="profound_mae", weights="", pretrain=mae)),
            mc.ConfigDict(dict(name="contrastive", backbone="provicnet", weights="", pretrain=con)),
            mc.ConfigDict(dict(name="reconstruction_conv", backbone="profound_conv", weights="", pretrain=fcmae)),
        ],
        # seeds: each (backbone, task, init) runs with seeds seed, seed+1, ...; stack: runs per compiled step
        # (0: all of a pair's, both inits x every seed).
        finetune=dict(steps=finetune_steps, eval_every=max(1, finetune_steps // 10), batch_size=4, head_hidden=16,
                      slice_channel=0, slice_window=3, augment=True, probe_cases=32, seeds=seeds, stack=0,
                      sites=["pooled", "patch"], rff_features=1024, max_rows=2048,
                      # per-block MMD^2 / CKA before vs after fine-tuning (the report's layer profile), on at most
                      # layer_rows probe rows per block
                      layer_profile=True, layer_rows=2048,
                      optim=pretrain_optim(lr=5e-4, warmup=2)),
        # transferability scores of each pretrained model before fine-tuning, on this many training cases (0: off)
        transfer_cases=16,
        workers=2,  # pairs run two at a time (threads): sooner on 2 cores, same numbers as 1
        primary_site="pooled",
        gain_floor=0.05,  # secondary gain: relative gain = (pretrained - random) / max(|random|, gain_floor)
        num_permutations=1000,  # per-run permutation test of MMD^2 (the uncertainty of each final value)
        num_bootstrap=2000,
        num_correlation_permutations=2000,
    ))
