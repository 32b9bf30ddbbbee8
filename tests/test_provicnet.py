"""ProViCNet parity with the PyTorch goldens, the converter's size inference and its error reporting."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters import convert_state_dict, detect_arch, from_pytorch
from converters.provicnet import fold_weight_norm
from converters.torch_reader import load_state_dict
from vfm_align.errors import ConfigError, ConversionError
from vfm_align.models.layers import gelu
from vfm_align.models.provicnet import load_stream_heads, resize_pos_table, upsample2_conv3x3


def _jit_method(model, name):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), name)(*args)

    return lambda *args: run(state, *args)


@pytest.fixture(scope="module")
def t2(fixtures_dir):
    model, info = from_pytorch(fixtures_dir / "provicnet_t2.pth")
    return model, info


@pytest.fixture(scope="module")
def t2_out(t2, golden):
    g = golden("provicnet_t2")
    model, _ = t2
    x = jnp.asarray(g["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    pos = jnp.asarray(g["pos"])
    with jax.default_matmul_precision("highest"):
        feats = _jit_method(model, "features")(x, pos)
        logits = _jit_method(model, "__call__")(x, pos)
        tokens = _jit_method(model, "tokens")(x, pos)[0]
        cl = _jit_method(model, "contrastive")(jnp.asarray(g["cl_input"]))
    return {"features": feats, "logits": logits, "tokens": tokens, "cl": cl}


def _maxerr(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def test_config_inferred_from_shapes(t2):
    _, info = t2
    cfg = info["config"]
    # The fixture README: depth 2, mlp_ratio 1, 4 registers, 37x37 table, CL head 96/32/256, 4 classes.
    assert (cfg.embed_dim, cfg.depth, cfg.mlp_hidden, cfg.num_registers) == (384, 2, 384, 4)
    assert (cfg.patch_size, cfg.in_chans, cfg.pos_src_grid, cfg.grid) == (14, 3, 37, 32)
    assert (cfg.head_channels, cfg.num_classes) == ((128, 64), 4)
    assert (cfg.cl_hidden, cfg.cl_bottleneck, cfg.cl_out) == (96, 32, 256)
    assert cfg.num_heads == 6
    assert set(info["ignored"]) == {"backbone.mask_token", "head.segmentation_conv.2.num_batches_tracked",
                                    "head.segmentation_conv.6.num_batches_tracked"}
    assert len(info["used"]) + len(info["ignored"]) == 64


def test_pos_embed_resized_once_matches_torch(t2, golden, parity):
    model, _ = t2
    parity(model.pos_embed[...], golden("provicnet_t2")["pos_embed_interp"], "pos_embed_interp")


def test_logits_parity(t2_out, golden, parity):
    g = golden("provicnet_t2")
    assert t2_out["logits"].shape == (2, 256, 256, 4)
    parity(np.asarray(t2_out["logits"]).transpose(0, 3, 1, 2), g["logits"], "logits")


def test_tokens_parity(t2_out, golden, parity):
    g = golden("provicnet_t2")
    f = t2_out["features"]
    parity(f["patch"], g["patch_tokens"], "patch_tokens")
    parity(t2_out["tokens"][:, :7], g["prefix_tokens"], "prefix_tokens")
    parity(f["cls"], g["prefix_tokens"][:, 0], "cls")
    parity(f["registers"], g["prefix_tokens"][:, 1:5], "registers")
    parity(f["pooled"], g["patch_tokens"].mean(axis=1), "pooled")
    parity(f["patch_map"], g["patch_tokens"].reshape(2, 32, 32, 384), "patch_map")


def test_slice_by_slice_and_batched_blocks_both_match_the_golden(t2, golden, monkeypatch, parity):
    """On one CPU device, eval mode runs the blocks one slice at a time (a scan over the 2 slices)
    and train mode batched; the suite's 8 fake devices keep the batched form everywhere. Both
    forms must give the golden tokens."""
    model, _ = t2
    g = golden("provicnet_t2")
    x = jnp.asarray(g["x"].transpose(0, 2, 3, 1))
    pos = jnp.asarray(g["pos"])
    scan_over_slices = re.compile(r"length=2\s")

    def jaxpr_and_tokens():
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).tokens(x, pos)[0])(state))
        with jax.default_matmul_precision("highest"):
            return jaxpr, _jit_method(model, "tokens")(x, pos)[0]

    assert not scan_over_slices.search(jaxpr_and_tokens()[0])  # 8 devices: batched
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    jaxpr, tokens = jaxpr_and_tokens()
    assert scan_over_slices.search(jaxpr)
    results = [tokens]
    model.train()
    try:
        jaxpr, tokens = jaxpr_and_tokens()
    finally:
        model.eval()
    assert not scan_over_slices.search(jaxpr)
    results.append(tokens)
    for tokens in results:
        parity(tokens[:, 7:], g["patch_tokens"], "patch_tokens")
        parity(tokens[:, :7], g["prefix_tokens"], "prefix_tokens")


def test_contrastive_head_parity(t2_out, golden, parity):
    parity(t2_out["cl"], golden("provicnet_t2")["cl_output"], "cl_output")


def test_weight_norm_fold_matches_definition():
    rng = np.random.default_rng(0)
    g, v = rng.uniform(0.5, 2, (5, 1)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    w = fold_weight_norm(g, v)
    for i in range(5):
        norm = math.sqrt(float((v[i].astype(np.float64) ** 2).sum()))
        np.testing.assert_allclose(w[i], g[i, 0] * v[i] / norm, rtol=1e-6)


def _upsample_conv_numpy(x, kernel, bias):
    """The reference order of operations: nearest x2 (torch nn.Upsample), then a padded 3x3 conv."""
    up = x.repeat(2, axis=1).repeat(2, axis=2)
    n, h, w, _ = up.shape
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]), np.float64) + bias
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
    return out


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 1, 1, 2, 3), (3, 8, 6, 16, 5)])
def test_upsample_conv_on_the_low_resolution_grid_is_exact(shape):
    n, h, w, cin, cout = shape
    r = np.random.default_rng(h * w)
    x = r.normal(size=(n, h, w, cin))
    kernel, bias = r.normal(size=(3, 3, cin, cout)), r.normal(size=cout)
    got = jax.jit(upsample2_conv3x3)(*(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)))
    np.testing.assert_allclose(np.asarray(got), _upsample_conv_numpy(x, kernel, bias), atol=1e-4, rtol=1e-5)


def test_gelu_is_exact_erf():
    x = np.linspace(-4, 4, 81).astype(np.float32)
    expected = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), expected, atol=1e-6)
    # the tanh form differs by far more than the parity tolerance used elsewhere
    assert np.abs(np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True)) - expected).max() > 1e-4


def test_other_input_size_uses_source_table(t2):
    model, _ = t2
    # 518 px = the source 37x37 grid: upstream adds the raw table unchanged.
    np.testing.assert_array_equal(np.asarray(model._pos_table(37)), np.asarray(model.pos_embed_src[...]))
    # 224 px = 16x16 grid: resized from the source table, not from the 32x32 one.
    np.testing.assert_allclose(np.asarray(model._pos_table(16)),
                               np.asarray(resize_pos_table(model.pos_embed_src[...], 37, 16)), atol=0)
    out = _jit_method(model, "__call__")(jnp.zeros((1, 224, 224, 3)), jnp.array([[0.0, 1.0]]))
    assert out.shape == (1, 128, 128, 4) and bool(jnp.isfinite(out).all())


def test_fusion_parity_and_stream_overwrite(fixtures_dir, golden, t2, parity):
    fusion, info = from_pytorch(fixtures_dir / "provicnet_fusion.pth")
    assert info["arch"] == "provicnet_fusion"
    cfg = info["config"]
    assert (cfg.embed_dim, cfg.stream_channels, cfg.fusion_channels, cfg.num_classes) == (384, 128, 128, 4)
    g = golden("provicnet_fusion")
    tokens = [jnp.asarray(g[k]) for k in ("token_T2W", "token_ADC", "token_DWI")]
    with jax.default_matmul_precision("highest"):
        out = _jit_method(fusion, "__call__")(*tokens)
        assert out.shape == (2, 128, 128, 4)
        parity(np.asarray(out).transpose(0, 3, 1, 2), g["logits"], "fusion logits")
        t2_model, _ = t2
        load_stream_heads(fusion, t2w=t2_model, adc=t2_model, dwi=t2_model)
        out2 = _jit_method(fusion, "__call__")(*tokens)
    parity(np.asarray(out2).transpose(0, 3, 1, 2), g["logits_streams_from_t2_head"], "fusion logits, streams from t2")
    assert _maxerr(out, out2) > 1e-2  # the overwrite really changed the streams


@pytest.fixture(scope="module")
def t2_sd(fixtures_dir):
    return load_state_dict(str(fixtures_dir / "provicnet_t2.pth"))[0]


def test_detect_arch(t2_sd, fixtures_dir):
    assert detect_arch(t2_sd) == "provicnet"
    assert detect_arch(load_state_dict(str(fixtures_dir / "provicnet_fusion.pth"))[0]) == "provicnet_fusion"


def test_all_key_problems_in_one_error(t2_sd):
    sd = dict(t2_sd)
    del sd["backbone.norm.bias"]
    sd["axis_max.bias"] = np.zeros((383,), np.float32)
    sd["backbone.something_new"] = np.zeros((2,), np.float32)
    with pytest.raises(ConversionError) as exc:
        convert_state_dict(sd, source="bad.pth")
    msg = str(exc.value)
    assert "bad.pth" in msg and "3 problem(s)" in msg
    assert "missing key 'backbone.norm.bias'" in msg
    assert "'axis_max.bias' has shape (383,), expected (384,)" in msg
    assert "unexpected key 'backbone.something_new'" in msg


def test_sizes_follow_the_weights(t2_sd):
    sd = {k: v for k, v in t2_sd.items() if not k.startswith(("backbone.blocks.1.", "CL_Head."))}
    model, info = convert_state_dict(sd)
    assert info["config"].depth == 1 and info["config"].cl_out == 0
    assert len(model.blocks) == 1 and model.cl_head is None
    with pytest.raises(ValueError):
        model.contrastive(jnp.zeros((1, 384)))


def test_config_overrides(t2_sd):
    with pytest.raises(ConfigError, match="num_heads=5"):
        convert_state_dict(t2_sd, num_heads=5)
    with pytest.raises(ConfigError, match="contradict"):
        convert_state_dict(t2_sd, embed_dim=192)
    with pytest.raises(ConfigError, match="unknown"):
        convert_state_dict(t2_sd, heads=6)
    assert convert_state_dict(t2_sd, head_channels=[128, 64])[1]["config"].head_channels == (128, 64)  # CLI JSON list
    model, info = convert_state_dict(t2_sd, num_heads=3)
    assert info["config"].num_heads == 3 and model.blocks[0].attn.num_heads == 3


def _numpy_attention(q, k, v):
    q, k, v = (a.astype(np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))  # (N, H, T, Dh)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("t, q_block", [(300, 128), (37, 256)])
def test_blocked_attention_is_exact(t, q_block):
    from vfm_align.models.layers import blocked_attention

    rng = np.random.default_rng(t)
    q, k, v = (rng.normal(scale=2.0, size=(2, t, 3, 16)).astype(np.float32) for _ in range(3))
    out = jax.jit(lambda a, b, c: blocked_attention(a, b, c, q_block=q_block))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=2e-5)


def test_img_size_override_resizes_the_table_for_that_grid(t2_sd):
    model, info = convert_state_dict(t2_sd, img_size=224)
    assert info["config"].grid == 16 and model.pos_embed[...].shape == (1, 257, 384)
    src = t2_sd["backbone.pos_embed"]
    np.testing.assert_array_equal(np.asarray(model.pos_embed_src[...]), src)
    np.testing.assert_allclose(np.asarray(model.pos_embed[...]), np.asarray(resize_pos_table(src, 37, 16)), atol=0)
    # the class row is never resized
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...])[:, 0], src[:, 0])


@pytest.mark.parametrize("entry", ["provicnet_contrastive", "provicnet_fusion"])
def test_full_size_key_manifest_converts(fixtures_dir, entry):
    """Every key of the released models (shapes from the manifest, random values) is consumed or ignored."""
    import json

    manifest = json.load(open(fixtures_dir / "manifests.json"))[entry]
    rng = np.random.default_rng(0)
    sd = {}
    for item in manifest["keys"]:
        shape = tuple(item["shape"])
        sd[item["key"]] = (np.zeros(shape, np.int64) if item["dtype"] == "int64"
                           else rng.uniform(0.5, 1.0, size=shape).astype(np.float32))
    model, info = convert_state_dict(sd)
    assert len(info["used"]) + len(info["ignored"]) == manifest["num_tensors"]
    cfg = info["config"]
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if entry == "provicnet_fusion":
        assert (cfg.embed_dim, cfg.stream_channels, cfg.fusion_channels, cfg.num_classes) == (384, 128, 128, 4)
        assert n_params == manifest["num_parameter_elements"]
        return
    assert (cfg.depth, cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads, cfg.num_registers) == (12, 384, 1536, 6, 4)
    assert (cfg.cl_hidden, cfg.cl_bottleneck, cfg.cl_out, cfg.grid) == (2048, 256, 65536, 32)
    # the manifest's count minus mask_token (ignored) and the folded weight_g column, plus the resized table
    expected = manifest["num_parameter_elements"] - 384 - 65536 + 1025 * 384
    assert n_params == expected
