"""The transfer study at the released sizes: converted released weights and a real cohort, on a GPU or TPU.

    vfm-align convert profound_conv_pretrained.pth.tar --out models/profound_conv
    vfm-align convert profound_mae_pretrained.pth.tar  --out models/profound_mae
    vfm-align convert T2_best.pth                      --out models/provicnet_t2
    vfm-align study --config configs/study_released.py --out study_released \\
        --config.cohort.manifest=cohort/manifest.csv \\
        --config.backbones.0.weights=models/profound_mae \\
        --config.backbones.1.weights=models/provicnet_t2 \\
        --config.backbones.2.weights=models/profound_conv

The same study as configs/study_default.py (five tasks, both initialisations, three seeds, held-out probes,
the same statistics), with the three backbones at their released sizes and input sizes:

* ProFound MAE-ViT (ViT-B, patch 16x32x32) on 64x256x256 volumes, the size its positional table was built for;
* ProViCNet (ViT-S/14 with registers) on 2.5D T2w slices resized to 448x448, as its reference pipeline does;
* ProFound-Conv (ConvNeXt-V2, depths 3-3-9-3, widths 96-768) on the centre 64x224x224 of each volume.

Every case of the manifest (its own train / val / test split) is reoriented to RAS+, resampled to
``cohort.spacing`` when set (else kept on its grid), z-scored per channel over non-zero voxels and centre
cropped / zero padded to ``cohort.grid``; each backbone then takes the centre of that grid at its input
size. Nothing pretrains here (``require_weights``): the backbones' own pretraining data is not visible to
this study, so the design section says that its overlap with this cohort is not checked. Fine-tuning heads
and recipes are the study's (a light dense decoder, AdamW with warmup), batch 4 per run; where six stacked
runs of a pair do not fit the accelerator, lower ``finetune.stack`` (runs per compiled step) first, then
``finetune.batch_size``.
"""

import ml_collections as mc

from vfm_align.config_file import recipe_module


def get_config():
    cfg = recipe_module("study_default.py", beside=__file__).get_config(finetune_steps=1000, seeds=3)
    cfg.require_weights = True
    cfg.cohort = mc.ConfigDict(dict(manifest="", cases=0, shape=(64, 256, 256), crop=(), grid=(64, 256, 256),
                                    spacing=(), pretrain_manifest="", pretrain_cases=0))
    # (D, H, W) each backbone fine-tunes on; () = the size the model was built for (MAE-ViT), else the cohort grid
    input_shapes = {"profound_mae": (), "provicnet": (), "profound_conv": (64, 224, 224)}
    for b in cfg.backbones:
        b.input_shape = input_shapes[b.backbone]
    ft = cfg.finetune
    ft.eval_every = 100
    ft.head_hidden = 64
    ft.probe_cases = 32
    ft.rff_features = 2048
    ft.max_rows = 8192
    ft.layer_rows = 4096
    ft.optim.lr = 1e-4
    ft.optim.warmup_steps = 50
    cfg.transfer_cases = 64
    cfg.workers = 1  # one pair at a time: an accelerator is busy with one
    return cfg
