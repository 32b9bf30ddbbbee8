"""`vfm-align infer` on odd-sized, anisotropic, LAS-oriented NIfTI volumes for each kind of model directory."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from vfm_align.cli import main as cli_main
from vfm_align.model_io import save_model
from vfm_align.models.registry import build_model

SHAPE_XYZ = (21, 19, 5)  # NIfTI (x, y, z): W=21, H=19, D=5
# LAS: voxel i runs to the Left (negative x), anisotropic 0.6 x 0.7 x 3.0 mm
LAS = np.array([[-0.6, 0, 0, 40.0], [0, 0.7, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])


def _write(path, data_xyz, affine=LAS):
    nib.save(nib.Nifti1Image(np.asarray(data_xyz), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vols")
    rng = np.random.default_rng(0)
    xx, yy, zz = np.meshgrid(*[np.arange(s) for s in SHAPE_XYZ], indexing="ij")
    blob = ((xx - 10) ** 2 / 36 + (yy - 9) ** 2 / 25 + (zz - 2) ** 2 / 2) < 1
    out = {}
    for i, name in enumerate(("t2w", "dwi", "adc")):
        img = rng.integers(50, 400, SHAPE_XYZ).astype(np.float32) + 300 * blob * (1 + i)
        out[name] = _write(d / f"{name}.nii.gz", img)
    out["gland"] = _write(d / "gland.nii.gz", blob.astype(np.uint8))
    out["dir"] = d
    return out


def _check_grid(path, ndim=3):
    img = nib.load(path)
    assert img.shape[:3] == SHAPE_XYZ and len(img.shape) == ndim
    np.testing.assert_allclose(img.affine, LAS)
    return np.asarray(img.dataobj)


TINY_UPERNET = dict(depths=(1, 1, 1, 1), dims=(4, 8, 8, 8), hidden_size=4, auxiliary_channels=4,
                    pool_scales=(1, 2), dwconv_impl="lax")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VFM_ALIGN_SLOW"), reason="two UperNet compiles (minutes); VFM_ALIGN_SLOW=1")
def test_converted_upernet_lesion_and_anatomy(volumes, tmp_path):
    for out_channels, task in ((1, "detection"), (3, "segmentation")):
        cfg = {**TINY_UPERNET, "out_channels": out_channels}
        model_dir = save_model(build_model("profound_conv_upernet", cfg, rngs=nnx.Rngs(0)), "profound_conv_upernet",
                               cfg, tmp_path / f"upernet{out_channels}")
        out = tmp_path / f"out{out_channels}"
        assert cli_main(["infer", "--model", model_dir, "--image", volumes["t2w"], volumes["dwi"], volumes["adc"],
                         "--roi", "16", "16", "16", "--out", str(out), "--quiet"]) == 0
        side = json.load(open(out / "prediction.json"))
        assert side["task"] == task and side["preprocessing"]["name"] == "profound_reference"
        for f in side["outputs"].values():
            _check_grid(str(out / f), 4 if f == "prob.nii.gz" else 3)


def _fake_run(tmp_path, backbone, task, shape=(4, 16, 16)):
    """A run directory exactly as `vfm-align finetune` leaves it (config.json + checkpoints), without training."""
    import jax

    from vfm_align.train import mesh as M
    from vfm_align.train.checkpoint import RunCheckpoints
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.recipes import recipe_config
    from vfm_align.train.state import create_state

    cfg = recipe_config(backbone, task, "tiny")
    cfg.data.shape = shape
    run = tmp_path / f"run_{task}"
    os.makedirs(run)
    (run / "config.json").write_text(cfg.to_json_best_effort(indent=1))
    mesh = M.make_mesh(1, 1, devices=jax.devices()[:1])
    _, _, state, _, _ = create_state(lambda: build_task_model(cfg, (*shape, 3)),
                                     lambda p: make_optimizer(cfg.optim, p, 10)[0], mesh)
    ck = RunCheckpoints(str(run / "checkpoints"), best_metric="x", async_save=False)
    ck.save_last(3, state, {"step": 3})
    ck.close()
    return str(run)


def test_finetuned_segmentation_run_on_las_volume(volumes, tmp_path):
    run = _fake_run(tmp_path, "profound_conv", "segmentation")
    out = tmp_path / "out"
    assert cli_main(["infer", "--model", run, "--image", volumes["t2w"], "--out", str(out), "--quiet"]) == 0
    side = json.load(open(out / "prediction.json"))
    assert side["task"] == "segmentation" and side["preprocessing"]["name"] == "finetune_cache"
    prob = _check_grid(str(out / "prob.nii.gz"), 4)
    label = _check_grid(str(out / "label.nii.gz"))
    assert prob.shape[-1] == 3
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)  # blended softmax stays a distribution
    np.testing.assert_array_equal(label, prob.argmax(-1))
    # same numbers as the model on the RAS+ volume (one window after padding D, H, W), mapped back by hand:
    # LAS -> RAS flips x (the last of D, H, W)
    import jax

    from vfm_align.data.cache import zscore_nonzero
    from vfm_align.infer.loading import load_for_inference
    from vfm_align.infer.sliding_window import sliding_window_inference

    m = load_for_inference(run)
    t2 = np.asarray(nib.load(volumes["t2w"]).dataobj, np.float32).transpose(2, 1, 0)
    x = np.zeros(t2.shape + (3,), np.float32)
    x[..., 0] = t2[:, :, ::-1]
    x = zscore_nonzero(x)
    gd, st = nnx.split(m.module)
    ref = sliding_window_inference(lambda p, v: jax.nn.softmax(nnx.merge(gd, p)(v)[0], -1), x, (4, 16, 16), params=st)
    np.testing.assert_allclose(prob.transpose(2, 1, 0, 3), ref[:, :, ::-1], atol=1e-5)
    # the exported backbone inside the run resolves to the run; refusing to overwrite without --overwrite
    assert cli_main(["infer", "--model", run, "--image", volumes["t2w"], "--out", str(out), "--quiet"]) == 1


def test_exported_task_model_works_without_its_run(volumes, tmp_path):
    """The exported model directory alone (copied elsewhere, the run deleted) predicts exactly as the run did."""
    import shutil

    import vfm_align
    from vfm_align.infer.loading import export_task_model, restore_run
    from vfm_align.model_io import read_sidecar

    run = _fake_run(tmp_path, "profound_conv", "segmentation")
    exported = export_task_model(run)
    assert exported == os.path.join(run, "model")
    x = np.random.default_rng(0).normal(size=(1, 4, 16, 16, 3)).astype(np.float32)
    forward = nnx.jit(lambda m, v: m(v)[0])  # one compile for both models (the same graph)
    want = np.asarray(forward(restore_run(run)[1], x))
    from_run = tmp_path / "from_run"
    assert cli_main(["infer", "--model", run, "--image", volumes["t2w"], "--out", str(from_run), "--quiet"]) == 0
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(exported, moved)
    shutil.rmtree(run)

    side = read_sidecar(moved)
    assert side["arch"] == "task_model" and side["task"] == "segmentation"
    assert side["config"]["backbone_arch"] == "profound_conv" and side["config"]["input_shape"] == [4, 16, 16, 3]
    assert side["preprocessing"]["name"] == "finetune_cache" and side["finetuned"]["checkpoint"] == "last"
    model = vfm_align.load(moved)  # the registry rebuilds backbone + head from the sidecar
    np.testing.assert_array_equal(np.asarray(forward(model, x)), want)

    out = tmp_path / "from_export"
    assert cli_main(["infer", "--model", str(moved), "--image", volumes["t2w"], "--out", str(out), "--quiet"]) == 0
    pred = json.load(open(out / "prediction.json"))
    assert pred["model"]["task"] == "segmentation" and pred["preprocessing"]["name"] == "finetune_cache"
    np.testing.assert_array_equal(_check_grid(str(out / "prob.nii.gz"), 4),
                                  _check_grid(str(from_run / "prob.nii.gz"), 4))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VFM_ALIGN_SLOW"), reason="three ConvNeXt passes (26-77 s on a busy "
                    "2-core machine); VFM_ALIGN_SLOW=1")
def test_reorient_ras_is_opt_in_for_converted_profound(volumes, tmp_path):
    """Default: the stored voxel order (the reference); --reorient ras: the same as the volume stored in RAS+."""
    import dataclasses

    from vfm_align.errors import ConfigError
    from vfm_align.infer.loading import load_for_inference
    from vfm_align.infer.volume import predict_volume

    cfg = dict(depths=(1, 1, 1, 1), dims=(4, 8, 8, 8), dwconv_impl="lax", bottleneck_dim=8, num_classes=3)
    model = load_for_inference(save_model(build_model("profound_conv_cls", cfg, rngs=nnx.Rngs(0)),
                                          "profound_conv_cls", cfg, tmp_path / "cls"))
    model.roi = (4, 16, 16)
    # the LAS volume written in RAS+ by hand: voxel x reversed, the x column of the affine negated and its origin
    # moved to the other end of the row, so every voxel keeps its world position
    data = np.asarray(nib.load(volumes["t2w"]).dataobj, np.float32)[::-1]
    ras = LAS.copy()
    ras[:, 0] *= -1
    ras[0, 3] = LAS[0, 3] + LAS[0, 0] * (SHAPE_XYZ[0] - 1)
    ras_path = _write(tmp_path / "t2w_ras.nii.gz", data, ras)
    reoriented = predict_volume(model, {"t2w": volumes["t2w"]}, reorient="ras")
    stored_ras = predict_volume(model, {"t2w": ras_path})
    as_stored = predict_volume(model, {"t2w": volumes["t2w"]})
    np.testing.assert_array_equal(reoriented.arrays["probs"], stored_ras.arrays["probs"])
    assert not np.allclose(as_stored.arrays["probs"], stored_ras.arrays["probs"], rtol=1e-6, atol=0)
    assert as_stored.preprocessing["reorient"] == "none (as the reference)"
    assert reoriented.preprocessing["reorient"].startswith("RAS+")
    finetuned = dataclasses.replace(model, recipe="finetune_cache", finetuned=True)  # always reoriented to RAS+
    with pytest.raises(ConfigError, match="reorient"):
        predict_volume(finetuned, {"t2w": volumes["t2w"]}, reorient="ras")


def _manifest(volumes, tmp_path, n=2):
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "split", "t2w", "dwi", "adc", "gland", "cspca"])
        for i in range(n):
            w.writerow([f"c{i}", "test", volumes["t2w"], volumes["dwi"], volumes["adc"], volumes["gland"], i % 2])
    return str(path)


def test_classification_manifest_csv_and_resume(volumes, tmp_path, capsys):
    run = _fake_run(tmp_path, "profound_conv", "classification", (16, 16, 16))  # pooled stage: 16x stride
    data = _manifest(volumes, tmp_path)
    out = tmp_path / "out"
    args = ["infer", "--model", run, "--data", data, "--split", "test", "--out", str(out), "--quiet"]
    assert cli_main(args) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["case_id"] for r in rows] == ["c0", "c1"]
    p = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert rows[0]["prob_0"] == rows[1]["prob_0"]  # the same volumes give the same probabilities
    capsys.readouterr()
    assert cli_main(args) == 0
    assert "0 case(s) predicted, 2 already done" in capsys.readouterr().out
    # a different setting in the same folder is refused rather than mixed in
    assert cli_main(args + ["--overlap", "0.25"]) == 1


def test_provicnet_with_and_without_gland(volumes, tmp_path):
    from test_provicnet_infer import SMALL, _small_model

    model_dir = save_model(_small_model(), "provicnet", SMALL, tmp_path / "pv")
    with_gland, without = tmp_path / "with", tmp_path / "without"
    base = ["infer", "--model", model_dir, "--image", volumes["t2w"], "--quiet"]
    assert cli_main(base + ["--gland", volumes["gland"], "--out", str(with_gland)]) == 0
    assert cli_main(base + ["--out", str(without)]) == 0
    a, b = json.load(open(with_gland / "prediction.json")), json.load(open(without / "prediction.json"))
    assert a["preprocessing"]["gland_source"] == "given"
    assert b["preprocessing"]["gland_source"] in ("first pass", "none found (whole-volume normalisation)")
    for side, d in ((a, with_gland), (b, without)):
        prob = _check_grid(str(d / "cancer_prob.nii.gz"))
        det = _check_grid(str(d / "detection_map.nii.gz"))
        # PI-CAI detection map: each candidate is one constant confidence; the case score is its maximum
        assert side["case_score"] == pytest.approx(float(det.max()))
        assert det.max() <= prob.max() + 1e-6
        np.testing.assert_array_equal(_check_grid(str(d / "cancer_label.nii.gz")), prob > 0.4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VFM_ALIGN_SLOW"), reason="a real fine-tuning run (minutes); VFM_ALIGN_SLOW=1")
def test_real_finetune_run_then_infer_and_evaluate(tmp_path):
    """`vfm-align finetune` (tiny, 4 steps, on a phantom cohort) -> `infer --data` -> `evaluate` on its test split."""
    cohort = tmp_path / "phantom"
    assert cli_main(["phantom", "--out", str(cohort), "--cases", "10", "--shape", "16,32,32", "--workers", "1",
                     "--quiet"]) == 0
    run = tmp_path / "run"
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "finetune.py")
    assert cli_main(["finetune", "--config", recipe + ":profound_conv,segmentation,tiny", "--no-progress",
                     f"--config.data.root={cohort / 'manifest.csv'}", f"--config.run.workdir={run}",
                     "--config.train.steps=4", "--config.train.batch_size=2", "--config.train.eval_every=2",
                     "--config.train.ckpt_every=2", "--config.align.every=0", "--config.mesh.data=1",
                     "--config.data.shape=(16, 32, 32)"]) == 0
    preds = tmp_path / "preds"
    for model in (str(run), str(run / "backbone")):  # the run, or its exported backbone inside it
        assert cli_main(["infer", "--model", model, "--data", str(cohort / "manifest.csv"), "--split", "test",
                         "--out", str(preds), "--quiet"]) == 0
    # the exported task model, alone elsewhere, predicts the same maps
    import shutil

    moved = tmp_path / "moved_model"
    shutil.copytree(run / "model", moved)
    alone = tmp_path / "preds_export"
    assert cli_main(["infer", "--model", str(moved), "--data", str(cohort / "manifest.csv"), "--split", "test",
                     "--out", str(alone), "--quiet"]) == 0
    for case in os.listdir(alone):
        if os.path.isdir(alone / case):
            np.testing.assert_array_equal(np.asarray(nib.load(alone / case / "prob.nii.gz").dataobj),
                                          np.asarray(nib.load(preds / case / "prob.nii.gz").dataobj))
    assert cli_main(["evaluate", "--pred", str(preds), "--data", str(cohort / "manifest.csv"), "--task",
                     "segmentation", "--quiet"]) == 0
    summary = json.load(open(preds / "summary.json"))
    assert summary["num_cases"] >= 1 and 0.0 <= summary["task_metrics"]["dice_mean"] <= 1.0
