"""Fine-tune a backbone on a task: ``finetune.py:BACKBONE,TASK[,tiny]``.

BACKBONE is profound_conv (3D ConvNeXt-V2), profound_mae (3D MAE-ViT) or provicnet (2.5D DINOv2 ViT);
TASK is classification (csPCa, AUROC), segmentation (TZ/PZ zones, mean Dice), detection (csPCa lesion
map, PI-CAI score), super_resolution (through-plane T2w, PSNR) or distortion_correction (DWI/ADC, NCC).
Run (the cohort is a manifest, e.g. one written by ``vfm-align phantom``)::

    vfm-align finetune --config configs/finetune.py:profound_conv,segmentation --config.data.root=PATH/manifest.csv
    vfm-align finetune --config configs/finetune.py:provicnet,detection,tiny --config.data.root=... \\
        --config.train.steps=60

``tiny`` gives CPU-sized widths and 16x32x32 crops (a smoke run takes a few minutes on 2 CPU cores);
without it, the released model size (it needs a GPU). Pass --config.model.pretrained=DIR (a converted
model directory) to start from pretrained weights. The settings and their sources are in
``vfm_align/train/recipes.py`` (``recipe_config``).
"""

from vfm_align.errors import ConfigError
from vfm_align.train.recipes import VARIANTS, recipe_config


def get_config(arg: str = ""):
    parts = [p.strip() for p in arg.split(",")] if arg else []
    if len(parts) == 2:
        parts.append("default")
    if len(parts) != 3 or parts[2] not in VARIANTS:
        raise ConfigError(f"finetune.py needs BACKBONE,TASK[,tiny] after the colon, got '{arg}' "
                          "(e.g. configs/finetune.py:profound_conv,segmentation)")
    return recipe_config(*parts)
