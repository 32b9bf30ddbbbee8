"""ProFound-Conv parity against the upstream goldens, conversion bookkeeping, save/load, FCMAE."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vfm_align
from converters import convert_state_dict, from_pytorch
from converters.torch_reader import load_state_dict
from vfm_align.errors import ConfigError, ConversionError
from vfm_align.model_io import save_model
from vfm_align.models.fcmae import FCMAE, FCMAEConfig, mask_from_noise, masked_patch_loss, patchify, random_mask


def cl(a):  # torch NCDHW -> channels-last
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 4, 1))


def cf(a):
    return np.asarray(a).transpose(0, 4, 1, 2, 3)


@pytest.fixture(scope="module")
def cls_model(fixtures_dir):
    return from_pytorch(fixtures_dir / "profound_conv_cls.pth.tar")


@pytest.fixture(scope="module")
def upernet_model(fixtures_dir):
    return from_pytorch(fixtures_dir / "profound_conv_upernet.pth.tar")


def test_classifier_parity(cls_model, golden, parity):
    g = golden("profound_conv_cls")
    model, info = cls_model
    assert info["arch"] == "profound_conv_cls"
    cfg = info["config"]
    assert (cfg.depths, cfg.dims, cfg.num_classes, cfg.bottleneck_dim) == ((1, 1, 2, 1), (16, 32, 64, 128), 4, 256)
    assert set(info["ignored"]) == {"head.1.num_batches_tracked"}
    x = cl(g["input"])
    with jax.default_matmul_precision("highest"):
        # jit the whole forward: op-by-op dispatch of the 3D model is slow on CPU
        feats, logits = nnx.jit(lambda m, v: (m.encoder.features(v), m(v)))(model, x)
    for i in range(4):
        parity(cf(feats[f"stage{i}"]), g[f"stage{i}"], f"stage{i}")
    parity(feats["pooled"], g["pooled_features"], "pooled_features")
    parity(logits, g["logits"], "logits")
    # patch tokens: stage-3 map flattened row-major over (D, H, W)
    s3 = g["stage3"]
    parity(feats["patch"], s3.reshape(s3.shape[0], s3.shape[1], -1).transpose(0, 2, 1), "patch")


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "depth_chunked"])
def test_upernet_parity_eval_and_train(upernet_model, golden, parity, chunked):
    g = golden("profound_conv_upernet")
    model, info = upernet_model
    if chunked:  # the released size runs its full-resolution decoder convs in depth chunks: force them here
        model = nnx.clone(model)
        model.decode_head.chunk_bytes = 1
    cfg = info["config"]
    assert (cfg.out_channels, cfg.hidden_size, cfg.auxiliary_channels, cfg.pool_scales) == (3, 32, 16, (1, 2, 3, 6))
    assert "encoder.norm.weight" in info["used"]  # loaded into the encoder although UperNet skips it
    x = cl(g["input"])
    with jax.default_matmul_precision("highest"):
        logits, (low, aux_low), (main, aux) = nnx.jit(
            lambda m, v: (m(v), m.logits_lowres(v, train=True), m(v, train=True)))(model, x)
    parity(cf(logits), g["logits"], "logits")
    parity(cf(low), g["logits_lowres"], "logits_lowres")
    parity(cf(aux_low), g["train_aux_lowres"], "train_aux_lowres")
    parity(cf(aux), g["train_aux"], "train_aux")
    np.testing.assert_array_equal(np.asarray(main), np.asarray(logits))


def _leaves(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def test_save_load_roundtrip(cls_model, tmp_path):
    model, info = cls_model
    out = save_model(model, info["arch"], info["config"], tmp_path / "m")
    loaded = vfm_align.load(out)
    assert loaded.config == info["config"]
    a, b = dict(_leaves(model)), dict(_leaves(loaded))
    assert a.keys() == b.keys() and ("bn", "mean") in a
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))


def test_conversion_errors_name_the_key(fixtures_dir):
    sd, extras = load_state_dict(fixtures_dir / "profound_conv_cls.pth.tar")
    bad = dict(sd)
    bad["encoder.stages.0.0.pwconv1.bias"] = np.zeros(7, np.float32)
    bad["encoder.surprise"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as exc:
        convert_state_dict(bad, extras=extras, source="bad.pth")
    assert "encoder.stages.0.0.pwconv1.bias" in str(exc.value) and "encoder.surprise" in str(exc.value)
    with pytest.raises(ConfigError, match="num_classes"):
        convert_state_dict(sd, extras=extras, source="x.pth", num_classes=7)
    with pytest.raises(ConfigError, match="no_such_field"):
        convert_state_dict(sd, extras=extras, source="x.pth", no_such_field=1)


def test_bare_encoder_detected_from_unprefixed_keys(fixtures_dir, cls_model):
    sd, _ = load_state_dict(fixtures_dir / "profound_conv_cls.pth.tar")
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    model, info = convert_state_dict(enc)
    assert info["arch"] == "profound_conv" and len(info["used"]) == len(enc)
    a, b = dict(_leaves(model)), dict(_leaves(cls_model[0].encoder))
    assert a.keys() == b.keys()
    for k in a:  # same weights in the same places as the (parity-tested) classifier's encoder
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))


# ---------------------------------------------------------------- FCMAE

# The lax depthwise conv compiles fastest; the CPU shift formulation and its gradient are tested in test_ops3d.
SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), patch_size=(16, 16, 16), decoder_dim=16, dwconv_impl="lax")


def test_mask_from_noise_keeps_lowest_noise():
    noise = jnp.asarray([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    np.testing.assert_array_equal(np.asarray(mask_from_noise(noise, 2)), [[1, 0, 1, 0], [0, 1, 1, 0]])
    m = random_mask(jax.random.key(0), 3, (2, 3, 4), 0.6)
    assert m.shape == (3, 2, 3, 4)
    np.testing.assert_array_equal(np.asarray((1 - m).reshape(3, -1).sum(1)), [int(24 * 0.4)] * 3)


def test_masked_patch_loss_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 12, 3)).astype(np.float32)
    p = (4, 4, 4)
    t = patchify(jnp.asarray(x), p)
    # (pd, ph, pw, C) order, C last: patch (0,0,1) feature 0 is x[0, 0, 0, 4, 0]; feature 1 is channel 1
    assert t.shape == (2, 2 * 2 * 3, 64 * 3)
    assert float(t[0, 1, 0]) == x[0, 0, 0, 4, 0] and float(t[0, 1, 1]) == x[0, 0, 0, 4, 1]
    assert float(t[0, 3, 0]) == x[0, 0, 4, 0, 0]  # patch 3 = grid (0, 1, 0)
    pred = rng.standard_normal(t.shape).astype(np.float32)
    mask = (rng.random((2, 12)) > 0.5).astype(np.float32)
    tn = np.asarray(t, np.float64)
    tn = (tn - tn.mean(-1, keepdims=True)) / np.sqrt(tn.var(-1, ddof=1, keepdims=True) + 1e-6)
    ref = (((pred - tn) ** 2).mean(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(masked_patch_loss(jnp.asarray(pred), t, jnp.asarray(mask))), ref, rtol=1e-5)
    ref_raw = (((pred - np.asarray(t)) ** 2).mean(-1) * mask).sum() / mask.sum()
    raw = masked_patch_loss(jnp.asarray(pred), t, jnp.asarray(mask), norm_pix=False)
    np.testing.assert_allclose(float(raw), ref_raw, rtol=1e-5)


def test_fcmae_masked_sites_do_not_leak():
    model = FCMAE(FCMAEConfig(**SMALL), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 16, 48, 3)).astype(np.float32)
    mask = jnp.asarray([[[[0.0, 1.0, 0.0]]]])  # grid 1x1x3: the middle patch removed
    x2 = x.copy()
    x2[:, :, :, 16:32] = 100.0  # scribble over the removed patch only
    enc = nnx.jit(lambda m, v: m.forward_encoder(v, mask))
    lat1 = enc(model, jnp.asarray(x))
    lat2 = enc(model, jnp.asarray(x2))
    np.testing.assert_allclose(np.asarray(lat1), np.asarray(lat2), atol=1e-5)
    assert np.all(np.asarray(lat1)[0, 0, 0, 1] == 0) and np.any(np.asarray(lat1)[0, 0, 0, 0] != 0)
    loss, pred, flat = nnx.jit(lambda m, v: m(v, mask))(model, jnp.asarray(x))
    assert pred.shape == (1, 3, 16 ** 3 * 3) and np.isfinite(float(loss))
    g = jax.jit(jax.grad(lambda m: m(jnp.asarray(x), mask)[0]))(model)
    assert float(jnp.abs(g.encoder.stages[0][0].dwconv_kernel[...]).sum()) > 0
