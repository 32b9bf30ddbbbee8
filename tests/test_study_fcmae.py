"""The FCMAE objective and the ``profound_conv`` study backbone: loss, pretraining, save/load, fine-tuning.

Everything runs at the study's 16x32x32 volumes with the tiny CPU sizes of configs/pretrain_fcmae.py,
and one pretraining run (through the CLI) serves every test. Random initialisation uses the "rbg"
generator in this module: XLA:CPU compiles threefry's unrolled rounds ~10x slower, and those
compiles dominate runs this short; nothing tested depends on which generator draws the numbers.
"""

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest
from flax import nnx

import vfm_align
from vfm_align.config_file import default_config_path, load_config
from vfm_align.data.phantom import make_phantom
from vfm_align.errors import ConfigError
from vfm_align.model_io import read_sidecar
from vfm_align.models.convnext3d import ConvNeXt3D
from vfm_align.models.fcmae import FCMAE, random_mask
from vfm_align.models.registry import config_from_dict
from vfm_align.study import pretrain as pretrain_mod
from vfm_align.study import taskdata
from vfm_align.study.backbones import GridFeatures, backbone_config, pretraining_model
from vfm_align.study.finetune import Run, run_finetunes
from vfm_align.study.objectives import make_objective
from vfm_align.study.pretrain import pretrain, study_mesh

SHAPE = (16, 32, 32)
BACKBONE = "profound_conv"


def _np_fcmae_loss(x, pred, removed, p=16, eps=1e-6):
    """The reference loss from its description, voxel by voxel: each p^3 patch flattened (pd, ph, pw, C) with C
    last, patches row-major over the (gd, gh, gw) grid; target normalised by its mean and unbiased variance;
    MSE over features; mean over removed patches only."""
    n, d, h, w, _ = x.shape
    num = den = 0.0
    for s in range(n):
        patch = 0
        for i in range(d // p):
            for j in range(h // p):
                for k in range(w // p):
                    t = x[s, i * p:(i + 1) * p, j * p:(j + 1) * p, k * p:(k + 1) * p, :].reshape(-1).astype(np.float64)
                    t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + eps)
                    per = np.mean((pred[s, patch].astype(np.float64) - t) ** 2)
                    num += per * removed[s, patch]
                    den += removed[s, patch]
                    patch += 1
    return num / den


@pytest.fixture(scope="module", autouse=True)
def _fast_init_rng():
    with jax.default_prng_impl("rbg"):
        yield


# One compiled function for every ConvNeXt (or FCMAE encoder) here: features incl. the study's patch_map.
_FEATS = nnx.jit(lambda m, v: GridFeatures(m, BACKBONE).features(v))


def _feats(model, x):
    return {k: np.asarray(v) for k, v in _FEATS(model, jnp.asarray(x)).items()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    manifest = make_phantom(tmp_path_factory.mktemp("fcmae_cohort") / "c", 6, shape=SHAPE, seed=0, workers=1,
                            progress=False)
    return manifest, taskdata.load_cohort(manifest)


@pytest.fixture(scope="module")
def pretrained(cohort, tmp_path_factory):
    """``vfm-align pretrain --config configs/pretrain_fcmae.py`` for 12 steps on the phantom's 4 training cases
    (all of them in every batch), with the trained FCMAE kept by a spy on the save step (which still runs)."""
    from vfm_align.cli import main

    kept = {}
    real = pretrain_mod.save_pretrained

    def spy(backbone, model, config, out_dir, info):
        kept.update(model=model, config=config)
        return real(backbone, model, config, out_dir, info)

    out = tmp_path_factory.mktemp("fcmae_model") / "reconstruction_conv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_mod, "save_pretrained", spy)
        rc = main(["pretrain", "--config", default_config_path("pretrain_fcmae"), "--out", str(out), "--no-progress",
                   "--config.steps=12", "--config.batch_size=4", "--config.optim.warmup_steps=2",
                   f"--config.cohort.manifest={cohort[0]}"])
    assert rc == 0
    return {"out": str(out), **kept}


def test_cli_pretraining_lowers_the_loss(pretrained):
    info = read_sidecar(pretrained["out"])["pretraining"]
    assert info["objective"] == "fcmae" and info["trained_arch"] == "profound_fcmae"
    loss = np.array([c["loss"] for c in info["curve"]])
    assert len(loss) == 12 and np.all(np.isfinite(loss))
    assert loss[-3:].mean() < 0.9 * loss[:3].mean(), loss
    assert all(c["masked_fraction"] == 0.75 for c in info["curve"])


def test_fcmae_objective_is_the_models_loss(pretrained, cohort):
    model = pretrained["model"]
    assert isinstance(model, FCMAE) and model.config.patch_size == (16, 16, 16)
    cfg = load_config(default_config_path("pretrain_fcmae"))
    assert cfg.objective_args.mask_ratio == 0.6 and cfg.model.norm_pix_loss
    x = cohort[1]["image"][:2]
    key = jax.random.key(3)
    objective = make_objective("fcmae", cfg.objective_args)

    def run(m, v):  # one forward: the objective's own call of the model, recorded on the way
        seen = {}

        class Recorder:
            config = m.config

            def __call__(self, image, mask):
                seen["mask"], seen["out"] = mask, m(image, mask)
                return seen["out"]

        loss, metrics = objective(Recorder(), {"image": v}, key)
        return loss, metrics, seen["mask"], seen["out"]

    loss, metrics, mask, (own, pred, removed) = nnx.jit(run)(model, jnp.asarray(x))
    # The mask comes from the step's rng: grid 1x2x2, int(4 * 0.4) = 1 patch kept per sample.
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(random_mask(key, 2, (1, 2, 2), 0.6)))
    np.testing.assert_array_equal(np.asarray(removed).sum(1), [3, 3])
    np.testing.assert_allclose(float(metrics["masked_fraction"]), 0.75)
    want = _np_fcmae_loss(x, np.asarray(pred), np.asarray(removed))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(own), want, rtol=1e-5)
    # Another step's rng draws another mask.
    other = random_mask(jax.random.key(4), 2, (1, 2, 2), 0.6)
    assert not np.array_equal(np.asarray(other), np.asarray(mask))


def test_saved_directory_is_the_fcmae_encoder(pretrained, cohort):
    meta = read_sidecar(pretrained["out"])
    assert meta["arch"] == BACKBONE
    enc = vfm_align.load(pretrained["out"])
    assert isinstance(enc, ConvNeXt3D) and not hasattr(enc, "decoder")
    x = cohort[1]["image"][:2]
    got, want = _feats(enc, x), _feats(pretrained["model"].encoder, x)
    assert sorted(got) == ["patch", "patch_map", "pooled", "stage0", "stage1", "stage2", "stage3"]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # The dense map fine-tuning heads read is the last stage (the FCMAE latent), the map "patch" flattens.
    assert got["patch_map"].shape == (2, 1, 2, 2, 32)
    np.testing.assert_array_equal(got["patch_map"], got["stage3"])
    np.testing.assert_array_equal(got["patch_map"].reshape(2, -1, 32), got["patch"])


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_finetune_from_fcmae_encoder(pretrained, cohort, task):
    study = load_config(default_config_path("study_default"),
                        ["finetune.steps=2", "finetune.eval_every=1", "finetune.batch_size=2",
                         "finetune.probe_cases=2", "finetune.rff_features=64", "finetune.max_rows=256",
                         'finetune.sites=["pooled", "patch"]'])
    assert [b.name for b in study.backbones] == ["reconstruction", "contrastive", "reconstruction_conv"]
    b = study.backbones[2]
    assert b.backbone == BACKBONE and b.pretrain.objective == "fcmae" and b.pretrain.backbone == BACKBONE
    meta = read_sidecar(pretrained["out"])  # as the runner does
    config = config_from_dict(meta["arch"], meta["config"])
    loaded = vfm_align.load(pretrained["out"])
    c = cohort[1]
    probe = c["image"][:2]
    start = _feats(loaded, probe)["pooled"]  # before: fine-tuning donates the loaded weights' buffers
    (res,) = run_finetunes(b.backbone, config, [Run(loaded, 0)], task, taskdata.make_task_data(c, task, seed=0), probe,
                           study.finetune, study_mesh(study.mesh), progress=False)
    curve = res["curve"]
    assert curve["step"] == [0, 1, 2] and np.all(np.isfinite(curve["loss"][1:]))
    assert np.isfinite(curve["align/pooled/mmd2"]).all() and np.isfinite(curve["align/patch/cka"]).all()
    # Fine-tuning started from the pretrained encoder: the banked features are the loaded model's.
    np.testing.assert_allclose(res["pairs"]["pooled"][0], start, rtol=1e-5, atol=1e-5)


def test_fcmae_config_errors():
    cfg = load_config(default_config_path("pretrain_fcmae"))
    with pytest.raises(ConfigError, match="whole number of FCMAE patches"):
        backbone_config(BACKBONE, cfg.model, (16, 24, 32))
    model = nnx.eval_shape(lambda: pretraining_model(BACKBONE, backbone_config(BACKBONE, cfg.model, SHAPE), 0))
    x = jnp.zeros((1, *SHAPE, 3))
    objective = make_objective("fcmae", mc.ConfigDict({"mask_ratio": 0.8}))
    with pytest.raises(ConfigError, match="keeps 0 of the 4 patches"):  # traced only: raised before any compute
        jax.eval_shape(lambda v: objective(model, {"image": v}, jax.random.key(0)), x)
    bad = load_config(default_config_path("pretrain_fcmae"), ["backbone=profound_mae"])
    with pytest.raises(ConfigError, match="trains a 'profound_conv' backbone"):
        pretrain(bad, {"image": np.zeros((1, *SHAPE, 3), np.float32)}, "/nonexistent/never-written")


def test_pretraining_stops_on_a_non_finite_loss():
    """The study's pretraining runs through the engine's loop, so it has its NaN stop: a NaN input at step 1
    stops it there with an error naming the step, and nothing is saved."""
    from vfm_align.train.loop import TrainingDiverged

    cfg = load_config(default_config_path("pretrain_fcmae"), ["steps=3", "batch_size=2"])
    image = np.random.default_rng(0).normal(size=(4, *SHAPE, 3)).astype(np.float32)
    data = {"image": image, "cancer": np.zeros((4, *SHAPE), np.int32)}
    draws = np.random.default_rng(int(cfg.seed))  # the stream DrawnBatches draws rows from, step by step
    step0, step1 = draws.choice(4, 2, replace=False), draws.choice(4, 2, replace=False)
    bad = next(i for i in step1 if i not in step0)  # a case that step 1 (and not step 0) trains on
    image[bad, 0, 0, 0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match=r"pretraining profound_conv/fcmae: non-finite .* at step 1 "):
        pretrain(cfg, data, "/nonexistent/never-written", progress=False)
