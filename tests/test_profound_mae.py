"""ProFound 3D MAE-ViT: parity with the reference outputs, converter inference and errors, save/load."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
import converters.profound_mae as pm
import vfm_align
from converters.torch_reader import load_state_dict
from vfm_align.errors import ConfigError, ConversionError, DataError
from vfm_align.model_io import save_model
from vfm_align.models.mae_vit3d import MaeViT3dConfig, patchify, unpatchify

HEADS = {"num_heads": 4, "decoder_num_heads": 3}  # the fixture's head counts; not stored in its weights

# Jitted entry points: op-by-op eager dispatch is far slower than one compile on CI machines.
_encode = nnx.jit(lambda m, x: m.encode(x))
_features = nnx.jit(lambda m, x: m.features(x))
_masked_encoder = nnx.jit(lambda m, x, n, r: m.forward_encoder(x, n, r), static_argnums=3)


@pytest.fixture(scope="module")
def ckpt(fixtures_dir):
    return fixtures_dir / "profound_mae_vit.pth.tar"


@pytest.fixture(scope="module")
def g(golden):
    z = golden("profound_mae_vit")
    return {**z, "x": jnp.asarray(z["input"].transpose(0, 2, 3, 4, 1))}  # NCDHW -> NDHWC


@pytest.fixture(scope="module")
def converted(ckpt):
    return converters.from_pytorch(ckpt, **HEADS)


def test_converter_infers_the_fixture_config(converted, g):
    model, info = converted
    cfg = json.loads(str(g["config_json"]))
    c = info["config"]
    assert info["arch"] == "profound_mae_vit"
    assert c.patch_size == tuple(cfg["patch_size"]) and c.embed_dim == cfg["embed_dim"]
    assert c.depth == cfg["depth"] and c.decoder_depth == cfg["decoder_depth"]
    assert c.decoder_embed_dim == cfg["decoder_embed_dim"] and c.in_chans == cfg["in_chans"]
    assert c.mlp_dim == cfg["embed_dim"] * cfg["mlp_ratio"]
    assert c.decoder_mlp_dim == cfg["decoder_embed_dim"] * cfg["mlp_ratio"]
    assert c.img_size == tuple(cfg["img_size"]) and c.num_patches == 24
    assert c.norm_pix_loss is bool(g["norm_pix_loss"]) and info["config_origin"]["norm_pix_loss"] == "checkpoint args"
    assert c.num_heads == 4 and info["config_origin"]["num_heads"] == "override"
    assert info["ignored"] == {} and len(info["used"]) == 50


def test_positional_tables_are_the_checkpoint_ones(converted, ckpt):
    model, _ = converted
    sd, _ = load_state_dict(ckpt)
    np.testing.assert_array_equal(np.asarray(model.pos_embed.get_value()), sd["pos_embed"])
    np.testing.assert_array_equal(np.asarray(model.decoder_pos_embed.get_value()), sd["decoder_pos_embed"])


def test_encoder_parity(converted, g, parity):
    model, _ = converted
    with jax.default_matmul_precision("highest"):
        enc = _encode(model, g["x"])
    parity(enc, g["encoder_output"], "encoder_output")


def test_mae_forward_parity(converted, g, parity):
    model, _ = converted
    noise, ratio = jnp.asarray(g["noise"]), float(g["mask_ratio"])
    with jax.default_matmul_precision("highest"):
        latent, mask, ids_restore = _masked_encoder(model, g["x"], noise, ratio)
        loss, pred, mask2 = nnx.jit(lambda m, x, n: m(x, noise=n, mask_ratio=ratio))(model, g["x"], noise)
        other = model.loss(g["x"], pred, mask2, norm_pix_loss=not bool(g["norm_pix_loss"]))
    np.testing.assert_array_equal(np.asarray(ids_restore), g["ids_restore"])
    np.testing.assert_array_equal(np.asarray(mask), g["mask"])
    np.testing.assert_array_equal(np.asarray(mask2), g["mask"])
    parity(latent, g["latent"], "latent")
    parity(pred, g["pred"], "pred")
    parity(loss, g["loss"], "loss")
    parity(other, g["loss_other_norm_pix"], "loss_other_norm_pix")


def test_patchify_order_and_inverse(g):
    p = patchify(g["x"], (4, 8, 8))
    np.testing.assert_array_equal(np.asarray(p), g["target_patches"])
    np.testing.assert_array_equal(np.asarray(unpatchify(p, (2, 4, 3), (4, 8, 8))), np.asarray(g["x"]))


def test_patch_embedding_convolution_equals_the_patch_matmul(converted, g, parity):
    model, _ = converted
    ref = np.asarray(g["target_patches"], np.float64) @ np.asarray(model.patch_embed.kernel.get_value(), np.float64)
    ref += np.asarray(model.patch_embed.bias.get_value())
    parity(model.embed_patches(g["x"]), ref, "embed_patches vs float64 matmul", rel=2e-6)


def test_features_match_encode(converted, g, parity):
    model, _ = converted
    with jax.default_matmul_precision("highest"):
        f = _features(model, g["x"])
    enc = g["encoder_output"]
    parity(f["cls"], enc[:, 0], "cls")
    parity(f["patch"], enc[:, 1:], "patch")
    parity(f["pooled"], enc[:, 1:].mean(axis=1), "pooled")


def test_per_layer_features(converted, g, parity):
    model, _ = converted
    with jax.default_matmul_precision("highest"):
        f = nnx.jit(lambda m, x: m.features(x, layers=True))(model, g["x"])
        first = nnx.jit(lambda m, t: m.blocks[0](t))(model, jnp.concatenate(
            [jnp.broadcast_to(model.cls_token.get_value() + model.pos_embed.get_value()[:, :1], (2, 1, 48)),
             model.patch_embed(patchify(g["x"], (4, 8, 8))) + model.pos_embed.get_value()[:, 1:]], axis=1))
    assert f["layers"].shape == (2, 2, 25, 48)
    parity(f["layers"][:, 0], first, "block 0 on the embedded tokens")
    parity(model.norm(f["layers"][:, -1]), g["encoder_output"], "the last block, once normed, is the encoder output")


def test_masking_from_rng_keeps_int_fraction(converted, g):
    model, _ = converted
    loss, pred, mask = nnx.jit(lambda m, x, k: m(x, mask_ratio=0.6, rng=k))(model, g["x"], jax.random.key(3))
    # int(24 * 0.4) = 9 kept, 15 removed, per sample
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), [15, 15])
    assert pred.shape == (2, 24, 768) and np.isfinite(float(loss))
    with pytest.raises(ConfigError, match="noise"):
        model(g["x"])


def test_head_counts_from_checkpoint_args(ckpt, g, parity):
    sd, extras = load_state_dict(ckpt)
    extras = {**extras, "args": {**extras["args"], **HEADS}}
    model, info = converters.convert_state_dict(sd, extras=extras, source=str(ckpt))
    assert info["config_origin"]["num_heads"] == "checkpoint args"
    with jax.default_matmul_precision("highest"):
        parity(_encode(model, g["x"]), g["encoder_output"], "encoder_output")


def test_released_head_default_and_override_of_norm_pix(ckpt):
    _, info = converters.from_pytorch(ckpt, norm_pix_loss=False, decoder_num_heads=3)
    assert info["config"].num_heads == 12  # the released factory's value; 48 wide divides by it
    assert info["config_origin"]["num_heads"] == "released default"
    with pytest.raises(ConfigError, match="decoder_num_heads 16"):  # released 16 does not divide 36
        converters.from_pytorch(ckpt)
    assert info["config"].norm_pix_loss is False


def test_detect_only_mae_keys(ckpt, fixtures_dir):
    assert pm.detect(load_state_dict(ckpt)[0]) == "profound_mae_vit"
    for other in ("profound_conv_cls.pth.tar", "profound_conv_upernet.pth.tar", "provicnet_t2.pth"):
        assert pm.detect(load_state_dict(fixtures_dir / other)[0]) is None, other


def test_conversion_errors_name_the_problem(ckpt):
    sd, extras = load_state_dict(ckpt)
    with pytest.raises(ConfigError, match="not divisible"):
        pm.convert(sd, extras, "profound_mae_vit", "x.pth", num_heads=5, decoder_num_heads=3)
    with pytest.raises(ConfigError, match=r"x\.pth.*positional tables hold 24"):
        pm.convert(sd, extras, "profound_mae_vit", "x.pth", img_size=(8, 32, 32), **HEADS)
    with pytest.raises(ConfigError, match="unknown settings"):
        pm.convert(sd, extras, "profound_mae_vit", "x.pth", depth=3)
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"][:, :40]
    with pytest.raises(ConversionError) as err:
        pm.convert(broken, extras, "profound_mae_vit", "x.pth", **HEADS)
    assert "blocks.1.mlp.fc2.bias" in str(err.value) and "blocks.0.attn.proj.weight" in str(err.value)


def test_args_input_size_ignored_when_it_does_not_fit_the_table(ckpt):
    sd, extras = load_state_dict(ckpt)
    extras = {**extras, "args": {**extras["args"], "input_size": (64, 224, 224)}}
    _, info = pm.convert(sd, extras, "profound_mae_vit", "x.pth", **HEADS)
    assert info["config"].img_size is None  # neither args nor the released size tile 24 tokens


def test_input_shape_errors(converted, g, ckpt):
    model, _ = converted
    with pytest.raises(DataError, match="channels-last"):
        _encode(model, jnp.asarray(g["input"]))  # torch layout
    with pytest.raises(DataError, match="built for volumes"):
        _encode(model, jnp.zeros((1, 8, 32, 32, 3)))
    sd, extras = load_state_dict(ckpt)
    open_grid, info = pm.convert(sd, extras, "profound_mae_vit", "x.pth", img_size=None, **HEADS)
    assert info["config"].img_size is None
    assert _encode(open_grid, jnp.zeros((1, 8, 24, 32, 3))).shape == (1, 25, 48)  # 2x3x4 grid: 24 tokens
    with pytest.raises(DataError, match="30 tokens"):
        _encode(open_grid, jnp.zeros((1, 8, 24, 40, 3)))
    with pytest.raises(DataError, match="whole number"):
        _encode(open_grid, jnp.zeros((1, 8, 24, 30, 3)))


def test_save_and_load_round_trip(converted, g, tmp_path, parity):
    model, info = converted
    out = save_model(model, info["arch"], info["config"], tmp_path / "mae")
    loaded = vfm_align.load(out)
    assert loaded.config == info["config"]
    with jax.default_matmul_precision("highest"):
        parity(_encode(loaded, g["x"]), g["encoder_output"], "encoder_output after save/load")


def _released_state_dict(fixtures_dir, materialise: bool):
    """The released mae_vit_base_patch16 key/shape set (from the fixture manifest), zero-valued."""
    man = json.loads((fixtures_dir / "manifests.json").read_text())["profound_mae_vit_base"]
    make = np.zeros if materialise else (lambda s, dtype: np.broadcast_to(np.zeros((), dtype), s))  # views: no memory
    return {k["key"]: make(tuple(k["shape"]), dtype=np.float32) for k in man["keys"]}, man


def test_released_key_set_infers_the_released_config(fixtures_dir):
    sd, man = _released_state_dict(fixtures_dir, materialise=False)
    assert len(sd) == man["num_tensors"] == 254
    assert pm.detect(sd) == "profound_mae_vit"
    config, origin = pm.infer_config(sd, {}, "released")
    assert config == MaeViT3dConfig()  # the defaults are the mae_vit_base_patch16 factory
    assert origin["num_heads"] == origin["img_size"] == "released default"
    # the reference CLI's input size does not change the factory's 64x256x256 table
    config, origin = pm.infer_config(sd, {"args": {"input_size": (64, 224, 224)}}, "released")
    assert config.img_size == (64, 256, 256) and origin["img_size"] == "released default"


@pytest.mark.skipif(not os.environ.get("VFM_ALIGN_SLOW"), reason="full-size model; set VFM_ALIGN_SLOW=1")
def test_released_key_set_converts_strictly(fixtures_dir):
    sd, man = _released_state_dict(fixtures_dir, materialise=True)
    model, info = converters.convert_state_dict(sd, source="released")
    assert len(info["used"]) == 254 and info["ignored"] == {}
    n_params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert n_params == man["num_parameter_elements"]


def test_sincos_tables_of_a_model_trained_from_scratch():
    """set_sincos_pos_embed: a zero class row, then per token (d, h, w) a third of the width for each axis,
    [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (width / 6))."""
    from flax import nnx

    from vfm_align.models.mae_vit3d import MaeViT3d, MaeViT3dConfig

    cfg = MaeViT3dConfig(patch_size=(4, 8, 8), embed_dim=12, depth=1, num_heads=2, mlp_dim=8, decoder_embed_dim=6,
                         decoder_depth=1, decoder_num_heads=1, decoder_mlp_dim=8, num_patches=2 * 3 * 2,
                         img_size=(8, 24, 16))
    model = nnx.eval_shape(lambda: MaeViT3d(cfg, rngs=nnx.Rngs(0)))  # shapes only: the tables are all it sets
    model.set_sincos_pos_embed()
    for table, width in ((model.pos_embed, 12), (model.decoder_pos_embed, 6)):
        t = np.asarray(table.get_value())[0]
        assert t.shape == (1 + 12, width) and not t[0].any()
        third = width // 3
        w = 10000.0 ** (-np.arange(third // 2) / (third / 2))
        for i, (d, h, x) in enumerate(np.ndindex(2, 3, 2)):
            want = np.concatenate([np.concatenate([np.sin(p * w), np.cos(p * w)]) for p in (d, h, x)])
            np.testing.assert_allclose(t[1 + i], want, rtol=1e-6, atol=1e-6)
