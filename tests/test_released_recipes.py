"""Every released recipe (configs/finetune.py:BACKBONE,TASK, no ``tiny``) runs at its released size: two
optimisation steps and one evaluation on two synthetic cases at the recipe's input size. Slow tier only:
each recipe compiles a full-size model (minutes on a CPU) and some need ~20 GB of memory."""

import math
import os
import pathlib

import numpy as np
import pytest

from train_toy import make_task
from vfm_align.config_file import load_config
from vfm_align.data.tasks import TASKS, get_task
from vfm_align.train.data import ArrayValidation
from vfm_align.train.loop import fit
from vfm_align.train.recipes import BACKBONES

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


class _Recording(ArrayValidation):
    """The loop's validation, keeping the predictions it was handed."""

    outputs: list

    def evaluate(self, outputs):
        self.outputs = [*getattr(self, "outputs", []), np.asarray(outputs)]
        return super().evaluate(outputs)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VFM_ALIGN_SLOW"), reason="released-size models, minutes each; VFM_ALIGN_SLOW=1")
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_released_recipe_trains_and_evaluates(tmp_path, backbone, task):
    cfg = load_config(f"{CONFIGS / 'finetune.py'}:{backbone},{task}", [])
    shape = tuple(cfg.data.shape)
    cases = make_task(task, 2, shape, seed=0)
    cfg.run.workdir = str(tmp_path)
    cfg.mesh.data, cfg.mesh.fsdp = 1, 1
    cfg.align.every = 0  # the in-loop alignment monitor is timed by scripts/bench/bench_train_step.py
    # Batch 1 with rematerialised backbone blocks: the smallest memory a released-size user can ask for.
    cfg.train.update(steps=2, batch_size=1, eval_every=2, ckpt_every=2, log_every=1, remat=True)
    spec = get_task(task)
    val = _Recording(cases, spec.head)
    out = fit(cfg, {"train": cases, "val": val}, progress=False)
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert len(val.outputs) == 1 and len(out["val"]) == 1  # one evaluation, after step 2
    pred = val.outputs[0]
    want = (2, spec.num_outputs) if spec.head == "label" else (2, *shape, spec.num_outputs)
    assert pred.shape == want and np.isfinite(pred).all(), (pred.shape, want)
