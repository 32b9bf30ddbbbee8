"""The released-size study config (configs/study_released.py) end to end for one step: converted-format model
directories of the released widths and depths, a real-format cohort (NIfTI files and a manifest), every task."""

import csv
import json
import os

import pytest

from vfm_align.config_file import load_config
from vfm_align.data.phantom import make_phantom
from vfm_align.errors import ConfigError
from vfm_align.model_io import save_model
from vfm_align.models.convnext3d import ConvNeXt3DConfig
from vfm_align.models.mae_vit3d import MaeViT3dConfig
from vfm_align.models.provicnet import ProViCNetConfig
from vfm_align.study.backbones import ARCHS, fresh_backbone
from vfm_align.study.runner import run_study

GRID = (32, 64, 64)  # small volumes; the models keep their released widths and depths


def _cohort(root) -> str:
    """Three phantom cases written as NIfTI with a manifest, one per split (too few for the transferability
    scores, which the test switches off: they need two classes among the training cases)."""
    manifest = make_phantom(os.path.join(root, "cohort"), 3, shape=GRID, seed=0, workers=1, progress=False)
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    for row, split in zip(rows, ("train", "val", "test")):
        row["split"] = split
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def _models(root) -> dict:
    """Released-size models (random weights) saved as `vfm-align convert` saves them."""
    configs = {
        "profound_mae": MaeViT3dConfig(img_size=GRID, num_patches=8),  # ViT-B, patch 16x32x32: a 2x2x2 grid here
        "provicnet": ProViCNetConfig(img_size=56),  # ViT-S/14 with registers; slices resized from 64 to 56
        "profound_conv": ConvNeXt3DConfig(),  # depths 3-3-9-3, widths 96-768
    }
    return {b: save_model(fresh_backbone(b, c, seed=3), ARCHS[b], c, os.path.join(root, b)) for b, c in configs.items()}


@pytest.mark.slow
def test_released_study_one_step(tmp_path):
    manifest, models = _cohort(tmp_path), _models(tmp_path)
    overrides = [f"cohort.manifest={manifest}", f"cohort.grid={GRID}", "finetune.steps=1", "finetune.eval_every=1",
                 "finetune.seeds=1", "finetune.batch_size=1", "finetune.probe_cases=2", "finetune.head_hidden=8",
                 "finetune.layer_rows=64", "transfer_cases=0", "num_permutations=20", "num_bootstrap=20",
                 "num_correlation_permutations=20"]
    cfg = load_config("configs/study_released.py", overrides)
    with pytest.raises(ConfigError, match="backbones.0.weights"):  # nothing pretrains here
        run_study(cfg, str(tmp_path / "refused"), progress=False)
    given = [f"backbones.{i}.weights={models[b.backbone]}" for i, b in enumerate(cfg.backbones)]
    shapes = [f"backbones.{i}.input_shape={GRID}" for i, b in enumerate(cfg.backbones) if b.input_shape]
    cfg = load_config("configs/study_released.py", overrides + given + shapes)
    out = tmp_path / "study"
    results = run_study(cfg, str(out), progress=False)
    d = results["design"]
    assert d["extra"]["disjoint_check"]["checked"] is False  # said, not silently skipped
    assert "weights" in d["pretrain_cohort"]["note"]
    params = {name: m["params"] for name, m in d["models"].items()}
    assert params["reconstruction"] > 85e6 and params["contrastive"] > 20e6 and params["reconstruction_conv"] > 25e6
    assert {(p["backbone"], p["task"]) for p in results["pairs"]} == {(b.name, t) for b in cfg.backbones
                                                                      for t in cfg.tasks}
    for name, run in results["runs"].items():
        assert run["diverged_step"] is None, name
        assert run["curve"]["step"] == [0, 1]
        assert all(v == v for v in run["curve"]["loss"][1:]), name  # finite loss after the step
        assert run["curve"]["align/pooled/mmd2"][0] == 0.0
    assert os.path.exists(out / "report.html")
    with open(out / "results.json") as fh:
        assert json.load(fh)["design"]["finetune_cohort"]
