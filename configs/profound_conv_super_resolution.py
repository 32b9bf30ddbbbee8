"""Fine-tune profound_conv on super resolution: through-plane T2w x2; residual restoration decoder; MSE; primary metric PSNR.

Run (the cohort is a manifest, e.g. one written by the phantom generator)::

    vfm-align finetune --config configs/profound_conv_super_resolution.py --config.data.root=PATH/manifest.csv
    vfm-align finetune --config configs/profound_conv_super_resolution.py:tiny --config.data.root=... --config.train.steps=60

``:tiny`` gives CPU-sized widths and 16x32x32 crops (a smoke run takes a few minutes on 2 CPU
cores); the default is the released model size and needs a GPU. Pass
--config.model.pretrained=DIR (a converted model directory) to start from pretrained weights.
"""

from vfm_align.train.recipes import base_config


def get_config(variant: str = "default"):
    cfg = base_config("profound_conv", "super_resolution", variant)
    # ProFound-Conv: layer-wise lr decay over its 18 layers (util/convnext_optim.py, "single" mode).
    cfg.optim.layer_decay = 0.75 if variant == "default" else 1.0
    # Tiny (CPU) runs are a few dozen steps, and the head (which starts at the identity) learns its
    # correction from scratch: a higher peak lr than the other tiny recipes. ProFound-Conv super-resolution
    # on tests/test_train_loop.py's synthetic check, 30 steps, PSNR over the degraded input: +1.3 dB at
    # lr 1e-3, +2.0 dB at 5e-3, +1.9 dB at 1e-2.
    if variant == "tiny":
        cfg.optim.lr = 5e-3
    return cfg
