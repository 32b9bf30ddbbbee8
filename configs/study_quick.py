"""A minutes-long study for the test suite: same pipeline as study_default, far fewer steps and cases.

    vfm-align study --quick --out /tmp/quick_study
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_study_default", os.path.join(os.path.dirname(__file__), "study_default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config():
    cfg = _default.get_config(pretrain_steps=3, finetune_steps=4, cases=10)
    for b in cfg.backbones:  # one block each: compile time dominates a run this short
        b.pretrain.model.depth = 1
        b.pretrain.batch_size = 2
    cfg.finetune.batch_size = 2
    cfg.cohort.shape, cfg.cohort.crop = (16, 32, 32), ()  # coarse, uncropped: generation and loading stay cheap
    cfg.finetune.eval_every = 2
    cfg.finetune.probe_cases = 2
    cfg.num_permutations = 200
    cfg.num_bootstrap = 300
    cfg.num_correlation_permutations = 300
    return cfg
