"""The raw MinkowskiEngine FCMAE layout: remap rules, and a checkpoint built from the dense fixture
weights (inverse transform) that must reproduce the fixture's stage outputs after conversion.

The spatial-axis-reversal convention follows the reference fine-tuning remap; it is NOT verified
against a real MinkowskiEngine run (that needs MinkowskiEngine itself).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import convert_state_dict, detect_arch
from converters.profound_conv import dense_to_minkowski, remap_minkowski
from converters.torch_reader import load_state_dict


def test_kernel_axis_reversal_is_a_transpose_not_a_flip():
    # dense [out=1, in=1, kd, kh, kw] with value = 100*kd + 10*kh + kw, k = 2
    dense = np.zeros((1, 1, 2, 2, 2), np.float32)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                dense[0, 0, a, b, c] = 100 * a + 10 * b + c
    mink = dense_to_minkowski({"downsample_layers.1.1.weight": dense})["encoder.downsample_layers.1.1.kernel"]
    # Minkowski offset index i = kw*4 + kh*2 + kd (first kernel-volume axis runs over kd fastest)
    assert mink.shape == (8, 1, 1)
    assert mink[1, 0, 0] == 100 and mink[2, 0, 0] == 10 and mink[4, 0, 0] == 1
    back, origin, _ = remap_minkowski({"encoder.downsample_layers.1.1.kernel": mink})
    np.testing.assert_array_equal(back["downsample_layers.1.1.weight"], dense)


def test_remap_rules_on_raw_names():
    rng = np.random.default_rng(0)
    raw = {
        "encoder.stages.0.0.dwconv.kernel": rng.standard_normal((343, 4)).astype(np.float32),
        "encoder.stages.0.0.dwconv.bias": rng.standard_normal((1, 4)).astype(np.float32),
        "encoder.stages.0.0.norm.ln.weight": np.ones(4, np.float32),
        "encoder.stages.0.0.pwconv1.linear.weight": np.ones((16, 4), np.float32),
        "encoder.stages.0.0.grn.gamma": np.ones((1, 16), np.float32),
        "encoder.downsample_layers.3.1.kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "encoder.downsample_layers.1.0.ln.bias": np.zeros(4, np.float32),
        "decoder.0.dwconv.weight": np.zeros((8, 1, 7, 7, 7), np.float32),
        "mask_token": np.zeros((1, 8, 1, 1, 1), np.float32),
        "proj.weight": np.zeros((8, 32, 1, 1, 1), np.float32),
        "pred.bias": np.zeros(12, np.float32),
    }
    dense, origin, dec = remap_minkowski(raw)
    assert sorted(dec) == ["decoder.0.dwconv.weight", "mask_token", "pred.bias", "proj.weight"]
    assert dense["stages.0.0.dwconv.weight"].shape == (4, 1, 7, 7, 7)
    w = raw["encoder.stages.0.0.dwconv.kernel"]
    # channel 2, dense offset (kd, kh, kw) = (1, 2, 3) sits at Minkowski row kw*49 + kh*7 + kd
    assert dense["stages.0.0.dwconv.weight"][2, 0, 1, 2, 3] == w[3 * 49 + 2 * 7 + 1, 2]
    assert dense["stages.0.0.dwconv.bias"].shape == (4,)
    assert "stages.0.0.norm.weight" in dense and "stages.0.0.pwconv1.weight" in dense
    assert dense["stages.0.0.grn.gamma"].shape == (1, 1, 1, 1, 16)
    np.testing.assert_array_equal(dense["downsample_layers.3.1.weight"][:, :, 0, 0, 0], [[0, 3], [1, 4], [2, 5]])
    assert origin["downsample_layers.1.0.bias"] == "encoder.downsample_layers.1.0.ln.bias"


@pytest.fixture(scope="module")
def mink_ckpt(fixtures_dir):
    sd, _ = load_state_dict(fixtures_dir / "profound_conv_cls.pth.tar")
    enc = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    raw = dense_to_minkowski(enc, prefix="encoder.")
    e, c4 = 8, 128
    rng = np.random.default_rng(5)
    raw.update({  # a small FCMAE decoder, as the pretrain file carries one
        "proj.weight": rng.standard_normal((e, c4, 1, 1, 1)).astype(np.float32) * 0.1,
        "proj.bias": np.zeros(e, np.float32),
        "mask_token": rng.standard_normal((1, e, 1, 1, 1)).astype(np.float32),
        "decoder.0.dwconv.weight": rng.standard_normal((e, 1, 7, 7, 7)).astype(np.float32) * 0.05,
        "decoder.0.dwconv.bias": np.zeros(e, np.float32),
        "decoder.0.norm.weight": np.ones(e, np.float32), "decoder.0.norm.bias": np.zeros(e, np.float32),
        "decoder.0.pwconv1.weight": rng.standard_normal((4 * e, e)).astype(np.float32) * 0.3,
        "decoder.0.pwconv1.bias": np.zeros(4 * e, np.float32),
        "decoder.0.grn.gamma": np.zeros((1, 1, 1, 1, 4 * e), np.float32),
        "decoder.0.grn.beta": np.zeros((1, 1, 1, 1, 4 * e), np.float32),
        "decoder.0.pwconv2.weight": rng.standard_normal((e, 4 * e)).astype(np.float32) * 0.2,
        "decoder.0.pwconv2.bias": np.zeros(e, np.float32),
        "pred.weight": rng.standard_normal((16 ** 3 * 3, e, 1, 1, 1)).astype(np.float32) * 0.3,
        "pred.bias": np.zeros(16 ** 3 * 3, np.float32),
    })
    return raw


def test_minkowski_checkpoint_reproduces_fixture(mink_ckpt, golden, parity):
    assert detect_arch(mink_ckpt) == "profound_fcmae"
    assert not any(k.endswith("norm.weight") and k.startswith("encoder.norm") for k in mink_ckpt)
    model, info = convert_state_dict(mink_ckpt, source="mink.pth")
    assert info["arch"] == "profound_conv"
    assert "mask_token" in info["ignored"] and "encoder.stages.0.0.dwconv.kernel" in info["used"]
    g = golden("profound_conv_cls")
    x = jnp.asarray(g["input"].transpose(0, 2, 3, 4, 1))
    with jax.default_matmul_precision("highest"):
        pooled, stages = model(x, return_stages=True)
    for i in range(4):
        parity(np.asarray(stages[i]).transpose(0, 4, 1, 2, 3), g[f"stage{i}"], f"stage{i}")
    # the final norm is absent from pretrain files and stays at init (weight 1, bias 0)
    m = g["stage3"].mean(axis=(2, 3, 4)).astype(np.float64)
    ref = (m - m.mean(-1, keepdims=True)) / np.sqrt(m.var(-1, keepdims=True) + 1e-6)
    parity(pooled, ref, "pooled, final norm at init")


def test_minkowski_checkpoint_with_decoder(mink_ckpt, golden, parity):
    model, info = convert_state_dict(mink_ckpt, source="mink.pth", with_decoder=True)
    assert info["arch"] == "profound_fcmae" and info["ignored"] == {}
    assert info["config"].decoder_dim == 8 and info["config"].decoder_depth == 1
    g = golden("profound_conv_cls")
    x = jnp.asarray(g["input"].transpose(0, 2, 3, 4, 1))  # 32x32x48 -> mask grid 2x2x3
    with jax.default_matmul_precision("highest"):
        zero_mask = jnp.zeros((2, 2, 2, 3))
        latent = model.forward_encoder(x, zero_mask)
        parity(np.asarray(latent).transpose(0, 4, 1, 2, 3), g["stage3"], "latent, nothing masked")
        mask = zero_mask.at[:, 0, 1].set(1.0)
        loss, pred, flat = model(x, mask)
    assert pred.shape == (2, 12, 16 ** 3 * 3) and np.isfinite(float(loss))
