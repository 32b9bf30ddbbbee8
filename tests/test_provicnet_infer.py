"""ProViCNet volume inference: reference preprocessing, output geometry, fusion path and bad inputs."""

import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from vfm_align.cli import main as cli_main
from vfm_align.errors import DataError
from vfm_align.infer.provicnet import (
    normalize_volume,
    predict_fusion,
    predict_sequence,
    preprocess_volume,
    slice_windows,
    write_prediction,
)
from vfm_align.model_io import save_model
from vfm_align.models.provicnet import ProViCNetConfig, ProViCNetFusionConfig
from vfm_align.models.registry import build_model

# A tiny network: 28 px input -> 2x2 patch grid -> 16x16 logits.
SMALL = ProViCNetConfig(img_size=28, embed_dim=24, depth=1, num_heads=2, mlp_hidden=48, num_registers=4,
                        pos_src_grid=3, head_channels=(8, 4), num_classes=4, cl_out=0)
D, H, W = 7, 24, 20
AFFINE = np.diag([0.5, 0.5, 3.0, 1.0])


_MODELS = {}


def _small_model(seed=0):
    """Built once per seed per session (building and compiling dominate these tests)."""
    if seed in _MODELS:
        return _MODELS[seed]
    model = build_model("provicnet", SMALL, rngs=nnx.Rngs(seed))
    # random BatchNorm statistics so the head is not the identity normalisation
    for stage in model.head.stages:
        stage.bn.mean.set_value(jnp.full(stage.bn.mean.get_value().shape, 0.1))
        stage.bn.var.set_value(jnp.full(stage.bn.var.get_value().shape, 0.7))
    _MODELS[seed] = model
    return model


def _volume(rng, shape=(D, H, W)):
    return rng.integers(0, 1200, size=shape).astype(np.uint16)


def _gland(shape=(D, H, W)):
    g = np.zeros(shape, np.uint8)
    g[1:5, 6:18, 5:15] = 1
    return g


def _save(path, data_dhw, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data_dhw).transpose(2, 1, 0), affine), str(path))
    return str(path)


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(3)
    img = _volume(rng)
    return {"img": img, "gland": _gland(), "image_path": _save(tmp_path / "t2.nii.gz", img),
            "gland_path": _save(tmp_path / "gland.nii.gz", _gland()), "dir": tmp_path}


def test_slice_windows_follow_the_reference():
    pad, centres, pos = slice_windows(8)
    assert pad == 0 and centres.tolist() == [1, 1, 2, 3, 4, 5, 6, 6]
    assert pos.tolist() == [[j, 8] for j in range(8)]
    pad, centres, pos = slice_windows(4)  # < 6 slices: one zero slice each side first
    assert pad == 1 and centres.tolist() == [1, 1, 2, 3, 4, 4] and pos[:, 1].tolist() == [6] * 6


def test_normalisation_uses_gland_statistics():
    rng = np.random.default_rng(0)
    img, gland = _volume(rng), _gland()
    x = img.astype(np.float64) / 255
    expected = (x - x[gland == 1].mean()) / x[gland == 1].std()
    np.testing.assert_allclose(normalize_volume(img, gland), expected, atol=1e-5)
    stacks, pos, keep = preprocess_volume(img, gland)
    assert stacks.shape == (D, H, W, 3) and keep == slice(0, D)
    np.testing.assert_allclose(stacks[0], expected[0:3].transpose(1, 2, 0), atol=1e-5)  # edge shifted inward
    np.testing.assert_allclose(stacks[3], expected[2:5].transpose(1, 2, 0), atol=1e-5)
    np.testing.assert_allclose(stacks[D - 1], expected[D - 3:].transpose(1, 2, 0), atol=1e-5)


def test_predict_sequence_geometry_and_values(case, parity):
    model = _small_model()
    pred = predict_sequence(model, case["image_path"], case["gland_path"], batch_size=4, progress=False)
    assert pred.prob.shape == (D, H, W) and pred.prob.dtype == np.float32
    assert pred.prob.min() >= 0 and pred.prob.max() <= 1
    np.testing.assert_array_equal(pred.label, (pred.prob > 0.4).astype(np.uint8))
    # slice 5 recomputed by hand: window 4..6, pos (5, D), 28 px bilinear, softmax, p2 + p3, back to 24x20
    x = case["img"].astype(np.float64) / 255
    g = case["gland"] == 1
    norm = ((x - x[g].mean()) / x[g].std()).astype(np.float32)
    stack = jnp.asarray(norm[4:7].transpose(1, 2, 0))[None]
    stack = jax.image.resize(stack, (1, 28, 28, 3), method="linear", antialias=False)
    graphdef, state = nnx.split(model)
    probs = jax.jit(lambda st, x, p: jax.nn.softmax(nnx.merge(graphdef, st)(x, p), axis=-1))(
        state, stack, jnp.array([[5.0, D]]))
    cancer = probs[0, :, :, 2] + probs[0, :, :, 3]
    expected = jax.image.resize(cancer, (H, W), method="linear")
    parity(pred.prob[5], expected, "slice 5 probability vs the model applied by hand", rel=5e-6)  # measured 4e-7

    paths = write_prediction(pred, case["dir"] / "out")
    for key, dtype in (("prob", np.float32), ("label", np.uint8)):
        img = nib.load(paths[key])
        assert img.shape == (W, H, D)  # NIfTI (x, y, z) of the input
        np.testing.assert_allclose(img.affine, AFFINE)
        assert img.get_data_dtype() == dtype
    with pytest.raises(DataError, match="already exists"):
        write_prediction(pred, case["dir"] / "out")


def test_short_volume_is_padded_and_cropped(tmp_path):
    rng = np.random.default_rng(1)
    shape = (3, H, W)
    img_path = _save(tmp_path / "img.nii", _volume(rng, shape))
    g = np.zeros(shape, np.uint8)
    g[:, 5:15, 5:15] = 1
    pred = predict_sequence(_small_model(), img_path, _save(tmp_path / "g.nii", g), progress=False)
    assert pred.prob.shape == shape


def test_fusion_path(case, tmp_path):
    rng = np.random.default_rng(7)
    paths = {"t2w": case["image_path"], "adc": _save(tmp_path / "adc.nii.gz", _volume(rng)),
             "dwi": _save(tmp_path / "dwi.nii.gz", _volume(rng))}
    models = {s: _small_model(i) for i, s in enumerate(("t2w", "adc", "dwi"))}
    fusion = build_model("provicnet_fusion", ProViCNetFusionConfig(embed_dim=24, stream_channels=8,
                                                                   fusion_channels=8), rngs=nnx.Rngs(5))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fusion)))
    pred = predict_fusion(fusion, models, paths, case["gland_path"], progress=False)
    assert pred.prob.shape == (D, H, W) and 0 <= pred.prob.min() and pred.prob.max() <= 1
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fusion)))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # caller's model untouched
    own = predict_fusion(fusion, models, paths, case["gland_path"], overwrite_streams=False, progress=False)
    assert np.abs(own.prob - pred.prob).max() > 1e-4  # the stream overwrite matters


@pytest.fixture()
def model_dir(tmp_path):
    model = _small_model()
    return save_model(model, "provicnet", SMALL, tmp_path / "model")


def test_cli_infer(case, model_dir):
    out = case["dir"] / "cli_out"
    rc = cli_main(["infer", "--model", model_dir, "--image", case["image_path"], "--gland", case["gland_path"],
                   "--out", str(out), "--quiet"])
    assert rc == 0
    prob = nib.load(str(out / "cancer_prob.nii.gz"))
    assert prob.shape == (W, H, D)
    expected = predict_sequence(model_dir, case["image_path"], case["gland_path"], progress=False).prob
    np.testing.assert_allclose(np.asarray(prob.dataobj).transpose(2, 1, 0), expected, atol=1e-6)
    assert cli_main(["infer", "--model", model_dir, "--image", case["image_path"], "--gland", case["gland_path"],
                     "--out", str(out), "--quiet"]) == 1  # refuses to overwrite


def _bad_inputs(case):
    d = case["dir"]
    rng = np.random.default_rng(9)
    trunc = d / "trunc.nii.gz"
    raw = open(case["image_path"], "rb").read()
    trunc.write_bytes(raw[: len(raw) // 2])
    nan = case["img"].astype(np.float32)
    nan[2, 3, 4] = np.nan
    return {
        "truncated": (str(trunc), case["gland_path"], "unreadable"),
        "2d": (_save2d(d / "2d.nii.gz", rng), case["gland_path"], "3D"),
        "4d": (str(_save4d(d / "4d.nii.gz", rng)), case["gland_path"], "3D"),
        "nan": (_save(d / "nan.nii.gz", nan), case["gland_path"], "NaN"),
        "mask shape": (case["image_path"], _save(d / "gshape.nii.gz", _gland((D, H, W + 1))), "shape"),
        "mask affine": (case["image_path"], _save(d / "gaff.nii.gz", _gland(), np.diag([0.6, 0.5, 3.0, 1.0])),
                        "affine"),
        "empty mask": (case["image_path"], _save(d / "gempty.nii.gz", np.zeros((D, H, W), np.uint8)), "empty"),
    }


def _save2d(path, rng):
    nib.save(nib.Nifti1Image(rng.normal(size=(W, H)).astype(np.float32), AFFINE), str(path))
    return str(path)


def _save4d(path, rng):
    nib.save(nib.Nifti1Image(rng.normal(size=(W, H, D, 2)).astype(np.float32), AFFINE), str(path))
    return path


def test_bad_inputs_raise_data_error_and_write_nothing(case, model_dir, capsys):
    for name, (image, gland, words) in _bad_inputs(case).items():
        with pytest.raises(DataError, match=words):
            predict_sequence(_small_model(), image, gland, progress=False)
        out = case["dir"] / f"out_{name.replace(' ', '_')}"
        rc = cli_main(["infer", "--model", model_dir, "--image", image, "--gland", gland, "--out", str(out), "--quiet"])
        assert rc == 1, name
        err = capsys.readouterr().err
        assert "error" in err and (os.path.basename(image) in err or os.path.basename(gland) in err), (name, err)
        assert not out.exists() or not os.listdir(out), name
