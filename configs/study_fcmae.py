"""The default study plus a third backbone: an FCMAE-pretrained ProFound-Conv (3D ConvNeXt-V2).

    vfm-align study --config configs/study_fcmae.py --out study_fcmae_out

Same cohort, tasks, fine-tuning and statistics as configs/study_default.py (loaded, not copied, so
its tuning carries over); "reconstruction_conv" is pretrained with configs/pretrain_fcmae.py for the
same number of steps as the other two and fine-tuned from its saved encoder, with the last stage
(the FCMAE latent, also the "patch" alignment site) as the dense tasks' feature map. The cohort's
volumes must be whole multiples of 16 voxels per axis (the FCMAE patch, the ConvNeXt's total stride).
"""

import importlib.util
import os

import ml_collections as mc


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(**kwargs):
    """study_default's config (its defaults, or ``pretrain_steps``/``finetune_steps``/``cases`` given here) plus
    the FCMAE backbone, pretrained for as many steps as the default backbones."""
    cfg = _load("study_default").get_config(**kwargs)
    fcmae = _load("pretrain_fcmae").get_config()
    fcmae.steps = cfg.backbones[0].pretrain.steps
    cfg.backbones.append(mc.ConfigDict(dict(name="reconstruction_conv", family="profound_conv", weights="",
                                            pretrain=fcmae)))
    return cfg
