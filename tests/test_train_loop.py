"""The fine-tuning loop: exact resume after a kill, NaN stop with the last good checkpoint kept,
and every task learning on small synthetic data."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from train_toy import make_data
from vfm_align.config_file import load_config
from vfm_align.train.checkpoint import RunCheckpoints
from vfm_align.train.data import batch_indices
from vfm_align.train.loop import TrainingDiverged, fit
from vfm_align.train.monitor import align_probe
from vfm_align.train.recipes import base_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _cfg(backbone, task, workdir, *, recipe=False, **train):
    """base_config's tiny variant, or (recipe=True) configs/finetune.py:<backbone>,<task>,tiny."""
    if recipe:
        cfg = load_config(f"{CONFIGS / 'finetune.py'}:{backbone},{task},tiny", [])
    else:
        cfg = base_config(backbone, task, "tiny")
    cfg.run.workdir = str(workdir)
    cfg.mesh.data, cfg.mesh.fsdp = 1, 1
    cfg.align.every = 0
    cfg.train.update(train)
    return cfg


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 fake CPU devices (conftest sets 8)")
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    data = make_data("classification", n_train=16, n_val=8, seed=5)
    kw = dict(steps=4, batch_size=8, ckpt_every=2, eval_every=4, log_every=1)

    def cfg(name):
        c = _cfg("provicnet", "classification", tmp_path / name, **kw)
        c.mesh.data, c.mesh.fsdp = 2, 2  # restore has to land in sharded layouts
        c.mesh.fsdp_min_size = 256
        c.align.update(every=2, probe_cases=4, num_features=64)
        return c

    full = fit(cfg("full"), data, progress=False)
    first = fit(cfg("killed"), data, progress=False, stop_after=2)  # "killed" right after its step-2 checkpoint
    assert sorted(first["losses"]) == [0, 1]
    resumed = fit(cfg("killed"), data, progress=False)
    assert resumed["start_step"] == 2 and sorted(resumed["losses"]) == [2, 3]
    for s in (2, 3):
        np.testing.assert_allclose(resumed["losses"][s], full["losses"][s], rtol=1e-6, err_msg=f"step {s}")
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"]["params"])),
                    jax.tree.leaves(jax.device_get(full["state"]["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The alignment monitor scores against the *pretrained* bank after the resume too.
    assert resumed["align"][-1]["align/pooled/cka"] == pytest.approx(full["align"][-1]["align/pooled/cka"], rel=1e-5)
    assert full["align"][0]["align/pooled/drift_cos"] > 0
    lines = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert {x["split"] for x in lines} == {"train", "val", "align"}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices set by conftest")
def test_alignment_on_a_mesh_larger_than_the_probe_set(tmp_path):
    """3 probe cases on 8 devices: the probe set is padded to the device count and the padding's features
    dropped, so the scores are those of the same probe cases on one device."""
    data = make_data("classification", n_train=8, n_val=4, seed=3)
    out = {}
    for layout in ((1, 1), (8, 1)):
        c = _cfg("provicnet", "classification", tmp_path / str(layout), steps=1, batch_size=8, ckpt_every=1,
                 eval_every=1, log_every=1)
        c.mesh.data, c.mesh.fsdp = layout
        c.align.update(every=1, probe_cases=3, num_features=64)
        c.optim.warmup_steps = 0  # so the one step moves the backbone
        out[layout] = fit(c, data, progress=False)["align"][0]
    assert out[(1, 1)]["align/patch/drift_cos"] > 0
    for k, v in out[(1, 1)].items():
        assert out[(8, 1)][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_align_probe_pads_to_the_device_count():
    images = np.arange(5)[:, None] * np.ones((5, 2))
    probe, n = align_probe(images, 3, 8)
    assert n == 3 and len(probe) == 8 and (probe[3:] == images[2]).all() and (probe[:3] == images[:3]).all()
    probe, n = align_probe(images, 0, 4)  # 0: every validation case
    assert n == 5 and len(probe) == 8
    probe, n = align_probe(images, 4, 2)
    assert n == 4 and (probe == images[:4]).all()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = make_data("classification", n_train=16, n_val=8, seed=7)
    bad = batch_indices(16, 8, 1, seed=0)[0]  # a case that step 1 (and not step 0) trains on
    assert bad not in batch_indices(16, 8, 0, seed=0)
    data["train"]["image"][bad, 0, 0, 0, 0] = np.nan
    cfg = _cfg("provicnet", "classification", tmp_path / "run", steps=3, batch_size=8, ckpt_every=1,
               eval_every=100, log_every=1, async_checkpoint=False)
    with pytest.raises(TrainingDiverged, match="non-finite training loss .* step 1.*last good checkpoint is 1"):
        fit(cfg, data, progress=False)
    ck = RunCheckpoints(str(tmp_path / "run" / "checkpoints"), best_metric="accuracy")
    assert ck.latest_step() == 1
    ck.close()


# One small recipe per task; the backbone follows the paper's pairing (ProFound for restoration).
LEARN = [
    ("provicnet", "classification"),
    ("provicnet", "segmentation"),
    ("profound_conv", "detection"),
    ("profound_conv", "super_resolution"),
    ("profound_conv", "distortion_correction"),
    ("profound_mae", "classification"),
    ("profound_mae", "segmentation"),
]


def _psnr(pred, target):
    """PSNR over the whole validation set, peak = the target's range (train.metrics' definition)."""
    target = np.asarray(target, np.float64)
    return 10 * np.log10(np.ptp(target) ** 2 / np.mean((np.asarray(pred, np.float64) - target) ** 2))


@pytest.mark.parametrize("backbone,task", LEARN)
def test_task_learns(tmp_path, backbone, task):
    data = make_data(task, n_train=32, n_val=16, seed=11)
    restore = task in ("super_resolution", "distortion_correction")
    # Restoration runs its recipe file (the tiny lr of its head lives there). The others keep
    # base_config: with the ProViCNet recipes' 0.05x backbone lr, 30 steps do not reach these bars.
    cfg = _cfg(backbone, task, tmp_path, recipe=restore, steps=30, batch_size=8, eval_every=30, ckpt_every=30,
               log_every=10)
    out = fit(cfg, data, progress=False)
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert all(math.isfinite(v) for v in losses)
    drop = 0.85 if restore else 0.6
    assert np.mean(losses[-5:]) < drop * np.mean(losses[:3]), f"loss did not drop: {losses}"
    val = out["val"][-1]
    if task == "classification":
        assert val["accuracy"] >= 0.85  # chance is 0.5
    elif task in ("segmentation", "detection"):
        assert val["dice"] >= 0.6  # the blob is ~10% of the voxels; empty or all-on predictions score <= 0.2
    else:  # clearly better than handing the degraded input back (the head's starting point)
        c0 = 0 if task == "super_resolution" else 1  # the degraded channels the target restores
        target = data["val"]["target"]
        ident = _psnr(data["val"]["image"][..., c0 : c0 + target.shape[-1]], target)
        # 1 dB = the validation MSE down by a fifth.
        assert val["psnr"] > ident + 1.0, (val, ident)
