"""``vfm-align rank`` end to end: two tiny saved models over a phantom cohort, scores checked against
features and targets computed here directly."""

import json
import os

import numpy as np
import pytest

from vfm_align import align


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from flax import nnx

    from vfm_align.data.phantom import make_phantom
    from vfm_align.model_io import save_model
    from vfm_align.models.convnext3d import ConvNeXt3DConfig
    from vfm_align.models.mae_vit3d import ARCH, MaeViT3dConfig
    from vfm_align.models.registry import build_model

    root = tmp_path_factory.mktemp("rank")
    mae_cfg = MaeViT3dConfig(patch_size=(8, 16, 16), embed_dim=12, depth=1, num_heads=2, mlp_dim=24,
                             decoder_embed_dim=6, decoder_depth=1, decoder_num_heads=1, decoder_mlp_dim=12,
                             num_patches=8, img_size=(16, 32, 32))
    mae = save_model(build_model(ARCH, mae_cfg, rngs=nnx.Rngs(0)), ARCH, mae_cfg, root / "mae")
    conv_cfg = ConvNeXt3DConfig(depths=(1, 1, 1, 1), dims=(8, 8, 8, 16), dwconv_impl="lax")
    conv = save_model(build_model("profound_conv", conv_cfg, rngs=nnx.Rngs(1)), "profound_conv", conv_cfg,
                      root / "conv")
    manifest = make_phantom(root / "cohort", cases=10, shape=(16, 32, 32), seed=0, workers=1, progress=False)
    return root, mae, conv, manifest


def _cases(manifest):
    from vfm_align.data.cache import PreprocessCache
    from vfm_align.data.cohort import read_manifest

    cohort = read_manifest(manifest)
    cache = PreprocessCache(os.path.join(os.path.dirname(manifest), ".vfm_align_cache"))
    return cohort.split("train"), cache


def test_rank_segmentation_matches_direct_scores(setup, capsys):
    import vfm_align
    from vfm_align.cli import main

    root, mae, conv, manifest = setup
    out = root / "seg"
    rc = main(["rank", "--model", mae, conv, "--data", manifest, "--task", "segmentation", "--bootstrap", "12",
               "--out", str(out), "--quiet"])
    assert rc == 0
    r = json.loads((out / "rank.json").read_text())
    assert [m["name"] for m in r["models"]] == ["mae", "conv"] and r["cases"] == 7
    # MAE-ViT: 2x2x2 patch grid of 8x16x16 voxels; its rows and the gland fractions of each cell, here directly.
    cases, cache = _cases(manifest)
    model = vfm_align.load(mae)
    xs, ts = [], []
    for c in cases:
        s = cache.get(c)
        xs.append(np.asarray(model.features(np.asarray(s["image"], np.float32)[None])["patch"][0]))
        onehot = np.eye(3)[np.asarray(s["gland"], np.int64)]                       # (16, 32, 32, 3)
        ts.append(onehot.reshape(2, 8, 2, 16, 2, 16, 3).mean(axis=(1, 3, 5)).reshape(8, 3))
    x, t = np.concatenate(xs), np.concatenate(ts)
    got = r["models"][0]
    assert (got["rows"], got["d"]) == (7 * 8, 12)
    assert got["scores"]["logme"] == pytest.approx(align.logme(x, t[:, np.ptp(t, 0) > 0], kind="regression"),
                                                   abs=1e-4)
    labels = np.where(t[:, 1:].max(1) > 0, 1 + t[:, 1:].argmax(1), 0)  # the largest zone in the cell, if any
    assert got["scores"]["hscore"] == pytest.approx(align.hscore(x, labels), rel=1e-4)
    assert got["scores"]["transrate"] == pytest.approx(align.transrate(x, labels), rel=1e-4)
    assert got["scores"]["rankme"] == pytest.approx(align.rankme(x), rel=1e-4)
    conv_entry = r["models"][1]
    assert (conv_entry["rows"], conv_entry["d"]) == (7 * 4, 16)  # the last stage: a 1x2x2 grid per case
    for s in align.SCORES:
        ranked = r["ranking"][s]
        assert len(ranked) == 2 and ranked[0]["value"] >= ranked[1]["value"]
        assert sum(row["p_best"] for row in ranked) == pytest.approx(1.0)
        lo, hi = ranked[0]["interval"]
        assert lo <= hi
    printed = capsys.readouterr().out
    assert "logme" in printed and "P(best)" in printed and "rank.json" in printed
    # An existing result is kept unless --overwrite.
    assert main(["rank", "--model", mae, "--data", manifest, "--task", "segmentation", "--out", str(out)]) == 1


def test_rank_classification_and_errors(setup, capsys):
    import vfm_align
    from vfm_align.cli import main

    root, mae, _, manifest = setup
    out = root / "cls"
    assert main(["rank", "--model", mae, "--data", manifest, "--task", "classification", "--bootstrap", "0",
                 "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "rank.json").read_text())
    cases, cache = _cases(manifest)
    model = vfm_align.load(mae)
    x = np.concatenate([np.asarray(model.features(np.asarray(cache.get(c)["image"], np.float32)[None])["pooled"])
                        for c in cases])
    labels = np.array([c.labels["cspca"] for c in cases])
    scores = r["models"][0]["scores"]
    if len(set(labels)) > 1:
        assert scores["logme"] == pytest.approx(align.logme(x, labels), abs=1e-4)
    else:
        assert scores["logme"] is None and "single class" in r["models"][0]["notes"]["logme"]
    assert scores["rankme"] == pytest.approx(align.rankme(x), rel=1e-4)
    assert r["models"][0]["intervals"]["rankme"] is None  # no bootstrap
    # Restoration: mean target per patch cell; every score applies (H-score and TransRate on its quartiles).
    assert main(["rank", "--model", mae, "--data", manifest, "--task", "super_resolution", "--bootstrap", "0",
                 "--out", str(root / "sr"), "--quiet"]) == 0
    sr = json.loads((root / "sr" / "rank.json").read_text())["models"][0]
    assert sr["rows"] == 7 * 8 and all(sr["scores"][s] is not None for s in align.SCORES)
    assert main(["rank", "--model", str(root / "nowhere"), "--data", manifest, "--task", "classification",
                 "--out", str(root / "bad")]) == 1
    assert "not a vfm-align model directory" in capsys.readouterr().err
    assert main(["rank", "--model", mae, "--data", manifest, "--task", "colouring", "--out", str(root / "bad")]) == 1
    assert not (root / "bad" / "rank.json").exists()


# -- per-layer features and ``vfm-align score --layers`` ---------------------------------------------------

def test_layer_outputs_are_additive():
    """``layers=True`` adds each block's output and leaves every other output as it was; the last block,
    once normed (ViTs) or as is (a ConvNeXt stage's last block), is the model's own output."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vfm_align.models.convnext3d import ConvNeXt3DConfig
    from vfm_align.models.mae_vit3d import ARCH, MaeViT3dConfig
    from vfm_align.models.provicnet import ProViCNetConfig
    from vfm_align.models.registry import build_model

    vol = jax.random.normal(jax.random.key(0), (1, 16, 32, 32, 3))
    mae = build_model(ARCH, MaeViT3dConfig(patch_size=(8, 16, 16), embed_dim=12, depth=2, num_heads=2, mlp_dim=24,
                                           decoder_embed_dim=6, decoder_depth=1, decoder_num_heads=1,
                                           decoder_mlp_dim=12, num_patches=8, img_size=(16, 32, 32)),
                      rngs=nnx.Rngs(0))
    conv = build_model("profound_conv", ConvNeXt3DConfig(depths=(1, 2, 1, 1), dims=(8, 8, 8, 16), dwconv_impl="lax"),
                       rngs=nnx.Rngs(1))
    vit = build_model("provicnet", ProViCNetConfig(img_size=28, embed_dim=24, depth=2, num_heads=2, mlp_hidden=48,
                                                   num_registers=4, pos_src_grid=3, head_channels=(8, 4),
                                                   num_classes=4, cl_out=0), rngs=nnx.Rngs(2))
    slices = jax.random.normal(jax.random.key(1), (3, 28, 28, 3))
    pos = jnp.stack([jnp.arange(3.0), jnp.full(3, 3.0)], -1)
    for plain, full, blocks, last, norm in (
            (mae.features(vol), mae.features(vol, layers=True), ["block0", "block1"], "block1", mae.norm),
            (conv.features(vol), conv.features(vol, layers=True),
             ["stage0_block0", "stage1_block0", "stage1_block1", "stage2_block0", "stage3_block0"], None, None),
            (vit.features(slices, pos), vit.features(slices, pos, layers=True), ["block0", "block1"], "block1",
             vit.norm)):
        assert set(full) - set(plain) >= set(blocks)
        for k, v in plain.items():
            np.testing.assert_allclose(np.asarray(full[k]), np.asarray(v), rtol=1e-5, atol=1e-5, err_msg=k)
        if last is not None:
            np.testing.assert_allclose(np.asarray(norm(full[last])), np.asarray(plain["patch"]), rtol=1e-5,
                                       atol=1e-5)
        else:
            np.testing.assert_allclose(np.asarray(full["stage1_block1"]), np.asarray(plain["stage1"]))


def test_score_layers_gives_mmd_and_cka_per_layer(setup):
    import jax
    from flax import nnx

    import vfm_align
    from vfm_align.cli import main
    from vfm_align.model_io import read_sidecar, save_model

    root, mae, _, manifest = setup
    model = vfm_align.load(mae)
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params))
    meta = read_sidecar(mae)
    after = save_model(model, meta["arch"], vfm_align.load(mae).config, root / "mae_after")
    out = root / "layers"
    assert main(["score", "--before", mae, "--after", after, "--data", manifest, "--layers", "block0,pooled",
                 "--permutations", "0", "--num-features", "256", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "score.json").read_text())
    assert set(r["layers"]) == {"block0", "pooled"}
    from vfm_align.data.cohort import read_manifest

    _, cache = _cases(manifest)
    cases = read_manifest(manifest).cases  # score uses every split by default
    before_m, after_m = vfm_align.load(mae), vfm_align.load(after)

    def rows(m):
        return np.concatenate([np.asarray(m.features(np.asarray(cache.get(c)["image"], np.float32)[None],
                                                     layers=True)["block0"][0]) for c in cases])

    xb, xa = rows(before_m), rows(after_m)
    got = r["layers"]["block0"]
    assert (got["n"], got["d"]) == (len(cases) * 8, 12)
    assert got["cka"] == pytest.approx(align.linear_cka(xb, xa), abs=1e-6)
    assert got["mmd2"] == pytest.approx(align.mmd(xb, xa, method="rff", num_features=256, seed=0,
                                                  sigma=align.median_sigma(xb, seed=0)), abs=1e-6)
    assert r["layers"]["pooled"]["cka"] == pytest.approx(r["cka"], abs=1e-9)  # the main site, scored again
