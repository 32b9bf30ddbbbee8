"""A minutes-long study for the test suite: same pipeline as study_default, far fewer steps and cases.

    vfm-align study --quick --out /tmp/quick_study

Two of the default's three backbones (the FCMAE ConvNeXt is left out: one more compile per task),
two seeds, 40 fine-tuning cases (28 train, 6 val, 6 test: 8 probes from val + test), 16 pretraining cases.
"""

from vfm_align.config_file import recipe_module


def get_config():
    cfg = recipe_module("study_default.py", beside=__file__).get_config(pretrain_steps=3, finetune_steps=4, cases=40,
                                                                      seeds=2)
    cfg.backbones = [b for b in cfg.backbones if b.name != "reconstruction_conv"]
    for b in cfg.backbones:  # one block each: compile time dominates a run this short
        b.pretrain.model.depth = 1
        b.pretrain.batch_size = 2
    cfg.finetune.batch_size = 2
    cfg.cohort.shape, cfg.cohort.crop = (16, 32, 32), ()  # coarse, uncropped: generation and loading stay cheap
    cfg.cohort.pretrain_cases = 16
    cfg.finetune.eval_every = 2
    cfg.finetune.probe_cases = 8
    cfg.transfer_cases = 8
    cfg.num_permutations = 200
    cfg.num_bootstrap = 300
    cfg.num_correlation_permutations = 300
    return cfg
