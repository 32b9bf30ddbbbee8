"""Feature banks on disk (extraction, provenance, atomicity, errors) and the ``vfm-align score`` command."""

import json
import os

import numpy as np
import pytest

from vfm_align.align import extract_bank, linear_cka, mmd, open_bank, paired_drift
from vfm_align.errors import DataError


def _batches(n_batches=4, b=3, t=5, e=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, t, e)).astype(np.float32) for _ in range(n_batches)]


def _fn(batch):
    """A stand-in model: patch tokens (N, T, E), their mean, and the first token."""
    return {"patch": batch, "pooled": batch.mean(1), "cls": batch[:, 0]}


@pytest.mark.parametrize("known_rows", [True, False])
def test_extract_patch_bank_round_trip(tmp_path, known_rows):
    batches = _batches()
    path = tmp_path / "bank.npy"
    bank = extract_bank(_fn, iter(batches), path, site="patch", provenance={"model": "m1", "cohort": "c"},
                        num_rows=4 * 3 * 5 if known_rows else None, progress=False)
    want = np.concatenate([b.reshape(-1, 6) for b in batches])  # input-major: input 0's tokens first
    assert isinstance(bank.data, np.memmap) and bank.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(bank.data), want)
    again = open_bank(path)
    np.testing.assert_array_equal(np.asarray(again.data), want)
    meta = json.loads((tmp_path / "bank.json").read_text())
    assert meta["site"] == "patch" and meta["shape"] == [60, 6] and meta["rows_per_input"] == 5
    assert meta["provenance"] == {"model": "m1", "cohort": "c"}
    assert sorted(os.listdir(tmp_path)) == ["bank.json", "bank.npy"]  # no temporaries left


def test_pooled_site_and_overwrite(tmp_path):
    batches = _batches()
    path = tmp_path / "p.npy"
    extract_bank(_fn, batches, path, site="pooled", progress=False)
    with pytest.raises(DataError, match="already exists"):
        extract_bank(_fn, batches, path, site="pooled", progress=False)
    bank = extract_bank(_fn, batches, path, site="cls", overwrite=True, progress=False)
    np.testing.assert_array_equal(np.asarray(bank.data), np.concatenate([b[:, 0] for b in batches]))


def test_bad_features_leave_nothing_behind(tmp_path):
    batches = _batches()
    batches[2][1, 3, 0] = np.nan
    with pytest.raises(DataError, match="batch 2"):
        extract_bank(_fn, batches, tmp_path / "b.npy", site="patch", progress=False)
    with pytest.raises(DataError, match="site 'nope'"):
        extract_bank(_fn, _batches(), tmp_path / "b.npy", site="nope", progress=False)
    with pytest.raises(DataError, match="no features"):
        extract_bank(_fn, [], tmp_path / "b.npy", site="patch", progress=False)
    with pytest.raises(DataError, match="expected num_rows"):
        extract_bank(_fn, _batches(), tmp_path / "b.npy", site="pooled", num_rows=13, progress=False)
    widths = [np.ones((2, 3, 4), np.float32), np.ones((2, 3, 5), np.float32)]
    with pytest.raises(DataError, match="width changed"):
        extract_bank(_fn, widths, tmp_path / "b.npy", site="pooled", progress=False)
    assert os.listdir(tmp_path) == []


def test_open_bank_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_bank(tmp_path / "missing.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="empty"):
        open_bank(tmp_path / "empty.npy")
    np.save(tmp_path / "f64.npy", np.zeros((3, 4)))
    with pytest.raises(DataError, match="float32"):
        open_bank(tmp_path / "f64.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="not a readable"):
        open_bank(tmp_path / "junk.npy")


def _two_banks(tmp_path, n=300, d=8):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x + 0.3 * rng.standard_normal((n, d)) + np.eye(d)[0] * 0.4).astype(np.float32)
    np.save(tmp_path / "before.npy", x)
    np.save(tmp_path / "after.npy", y)
    return x, y


def test_score_command_on_banks(tmp_path, capsys):
    from vfm_align.align import median_sigma
    from vfm_align.cli import main

    x, y = _two_banks(tmp_path)
    rc = main(["score", "--before-bank", str(tmp_path / "before.npy"), "--after-bank", str(tmp_path / "after.npy"),
               "--method", "exact", "--permutations", "99", "--out", str(tmp_path / "out")])
    assert rc == 0
    r = json.loads((tmp_path / "out" / "score.json").read_text())
    sigma = median_sigma(x, None)  # fitted on the before bank
    assert abs(r["sigma"] - sigma) < 1e-12
    assert abs(r["mmd2"] - mmd(x, y, sigma=sigma)) < 1e-9
    assert r["test"] == "paired swaps" and r["p_value"] == pytest.approx(0.01)  # a clear shift: 1/(1+99)
    assert abs(r["cka"] - linear_cka(x, y)) < 1e-9
    assert abs(r["mean_cosine"] - paired_drift(x, y)["mean_cosine"]) < 1e-9
    assert (r["n_before"], r["n_after"], r["d"]) == (300, 300, 8)
    out = capsys.readouterr().out
    assert "MMD^2" in out and "p-value" in out and "linear CKA" in out
    # Existing results are not silently replaced.
    assert main(["score", "--before-bank", str(tmp_path / "before.npy"), "--after-bank",
                 str(tmp_path / "after.npy"), "--out", str(tmp_path / "out")]) == 1


def test_score_command_errors(tmp_path, capsys):
    from vfm_align.cli import main

    _two_banks(tmp_path)
    np.save(tmp_path / "narrow.npy", np.zeros((300, 5), np.float32))
    assert main(["score", "--before-bank", str(tmp_path / "before.npy"),
                 "--after-bank", str(tmp_path / "narrow.npy")]) == 1
    assert "different widths" in capsys.readouterr().err
    assert main(["score", "--before-bank", str(tmp_path / "before.npy")]) == 1
    assert "go together" in capsys.readouterr().err
    assert main(["score", "--before", "a", "--after", "b"]) == 1
    assert "--data" in capsys.readouterr().err


def _score_perturbed(tmp_path, model, arch, cfg, cases, seed):
    """Save ``model`` as 'before', perturb its weights by 0.05 sigma noise, save as 'after', and run
    ``vfm-align score`` on the patch tokens over a phantom cohort of ``cases`` 16x32x32 cases."""
    import jax
    from flax import nnx

    from vfm_align.cli import main
    from vfm_align.data.phantom import make_phantom
    from vfm_align.model_io import save_model

    before = save_model(model, arch, cfg, tmp_path / "before")
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params))
    after = save_model(model, arch, cfg, tmp_path / "after")
    manifest = make_phantom(tmp_path / "cohort", cases=cases, shape=(16, 32, 32), seed=0, workers=1, progress=False)
    out = tmp_path / "score"
    rc = main(["score", "--before", before, "--after", after, "--data", manifest, "--features", "patch",
               "--permutations", "19", "--num-features", "256", "--out", str(out), "--quiet"])
    assert rc == 0
    return before, after, manifest, out, json.loads((out / "score.json").read_text())


def test_score_command_on_models_and_cohort(tmp_path):
    """End to end: two tiny MAE-ViT checkpoints over a 3-case phantom cohort; mismatched configs refused."""
    from flax import nnx

    from vfm_align.cli import main
    from vfm_align.model_io import SIDECAR
    from vfm_align.models.mae_vit3d import ARCH, MaeViT3dConfig
    from vfm_align.models.registry import build_model

    cfg = MaeViT3dConfig(patch_size=(8, 16, 16), embed_dim=12, depth=1, num_heads=2, mlp_dim=24,
                         decoder_embed_dim=6, decoder_depth=1, decoder_num_heads=1, decoder_mlp_dim=12,
                         num_patches=8, img_size=(16, 32, 32))
    model = build_model(ARCH, cfg, rngs=nnx.Rngs(0))  # building is the slow part: once, then perturb
    before, after, manifest, out, r = _score_perturbed(tmp_path, model, ARCH, cfg, cases=3, seed=1)
    assert (r["n_before"], r["d"]) == (3 * 8, 12)  # 3 cases x 8 patch tokens
    xb, xa = open_bank(out / "before_patch.npy"), open_bank(out / "after_patch.npy")
    assert xb.provenance["provenance"]["model"] == before and xb.provenance["rows_per_input"] == 8
    assert abs(r["cka"] - linear_cka(xb.data, xa.data)) < 1e-9
    assert 0.5 < r["cka"] < 1.0 and r["mean_l2"] > 0  # a small perturbation: related but moved
    # A checkpoint of another configuration is refused before any work (only the sidecars are read).
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    meta = json.loads((tmp_path / "before" / SIDECAR).read_text())
    meta["config"]["depth"] = 2
    (deeper / SIDECAR).write_text(json.dumps(meta))
    assert main(["score", "--before", before, "--after", str(deeper), "--data", manifest]) == 1


def test_score_command_on_provicnet_slices(tmp_path):
    """ProViCNet checkpoints are scored on 2.5D slices of each volume: one bank row per patch token
    of every slice, in the order the model itself produces them for that case."""
    import jax.numpy as jnp
    from flax import nnx

    import vfm_align
    from vfm_align.data.cache import PreprocessCache
    from vfm_align.data.cohort import read_manifest
    from vfm_align.models.provicnet import ProViCNetConfig
    from vfm_align.models.registry import build_model
    from vfm_align.models.task_model import volume_to_slices

    cfg = ProViCNetConfig(img_size=28, embed_dim=24, depth=1, num_heads=2, mlp_hidden=48, num_registers=4,
                          pos_src_grid=3, head_channels=(8, 4), num_classes=4, cl_out=0)
    model = build_model("provicnet", cfg, rngs=nnx.Rngs(0))
    before, after, manifest, out, r = _score_perturbed(tmp_path, model, "provicnet", cfg, cases=2, seed=2)
    assert (r["n_before"], r["d"]) == (2 * 16 * 4, 24)  # 2 cases x 16 slices x 2x2 patch tokens
    # The first case's rows: the before-model's tokens of that volume's T2w slices, computed here directly.
    cohort = read_manifest(manifest)
    cache = PreprocessCache(os.path.join(os.path.dirname(manifest), ".vfm_align_cache"))
    vol = jnp.asarray(cache.get(cohort.cases[0])["image"], jnp.float32)[None]
    s, pos = volume_to_slices(vol, 0, 3, 28)
    want = np.asarray(vfm_align.load(before).patch_tokens(s, pos)).reshape(-1, 24)
    xb, xa = open_bank(out / "before_patch.npy"), open_bank(out / "after_patch.npy")
    np.testing.assert_allclose(np.asarray(xb.data[: len(want)]), want, atol=1e-5)
    assert abs(r["cka"] - linear_cka(xb.data, xa.data)) < 1e-9 and 0.3 < r["cka"] < 1.0
