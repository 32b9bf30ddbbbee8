"""The default study plus a third backbone: an FCMAE-pretrained ProFound-Conv (3D ConvNeXt-V2).

    vfm-align study --config configs/study_fcmae.py --out study_fcmae_out

Same cohort, tasks, fine-tuning and statistics as configs/study_default.py (loaded, not copied, so
its tuning carries over); "reconstruction_conv" is pretrained with configs/pretrain_fcmae.py for the
same number of steps as the other two and fine-tuned from its saved encoder, with the last stage
(the FCMAE latent, also the "patch" alignment site) as the dense tasks' feature map. The cohort's
volumes must be whole multiples of 16 voxels per axis (the FCMAE patch, the ConvNeXt's total stride).
"""

import ml_collections as mc

from vfm_align.config_file import recipe_module


def get_config(**kwargs):
    """study_default's config (its defaults, or ``pretrain_steps``/``finetune_steps``/``cases`` given here) plus
    the FCMAE backbone, pretrained for as many steps as the default backbones."""
    cfg = recipe_module("study_default.py", beside=__file__).get_config(**kwargs)
    fcmae = recipe_module("pretrain_fcmae.py", beside=__file__).get_config()
    fcmae.steps = cfg.backbones[0].pretrain.steps
    cfg.backbones.append(mc.ConfigDict(dict(name="reconstruction_conv", backbone="profound_conv", weights="", pretrain=fcmae)))
    return cfg
