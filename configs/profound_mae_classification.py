"""Fine-tune profound_mae on classification: case-level csPCa from pooled features; CE; primary metric AUROC.

Run (the cohort is a manifest, e.g. one written by the phantom generator)::

    vfm-align finetune --config configs/profound_mae_classification.py --config.data.root=PATH/manifest.csv
    vfm-align finetune --config configs/profound_mae_classification.py:tiny --config.data.root=... --config.train.steps=60

``:tiny`` gives CPU-sized widths and 16x32x32 crops (a smoke run takes a few minutes on 2 CPU
cores); the default is the released model size and needs a GPU. Pass
--config.model.pretrained=DIR (a converted model directory) to start from pretrained weights.
"""

from vfm_align.train.recipes import recipe_config


def get_config(variant: str = "default"):
    return recipe_config("profound_mae", "classification", variant)
