"""Key map for ProViCNet checkpoints (per-sequence ``ProViCNet_contrastive`` and ``FusionModalities``).

Every size comes from tensor shapes (width, depth, MLP width, patch size, registers, position
table, head widths, classes, contrastive-head widths, fusion widths). ``num_heads`` cannot be
read from the weights: it defaults to 6 (as released) and is overridable. The 37x37 DINOv2
position table is resized once here to the configured input grid (bicubic, antialias) and kept
alongside for other input sizes.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from flax import nnx

from converters.keymap import KeyReader, assign, conv2d, linear
from vfm_align.errors import ConfigError, ConversionError

ARCHS = ("provicnet", "provicnet_fusion")

_B = "backbone."
_HEAD = "head.segmentation_conv."
_FUSION_STREAMS = {"t2w": "Stream_T2W", "adc": "Stream_ADC", "dwi": "Stream_DWI"}


def detect(sd: dict) -> str | None:
    if f"{_B}blocks.0.attn.qkv.weight" in sd and "axis_pos.weight" in sd:
        return "provicnet"
    if "FusionSegmentation.1.weight" in sd and any(
            f"{s}.UpsampleModule.1.weight" in sd for s in _FUSION_STREAMS.values()):
        return "provicnet_fusion"
    return None


def _dim(r: KeyReader, key: str, axis: int, default: int) -> int:
    s = r.shape(key)
    return s[axis] if s is not None and -len(s) <= axis < len(s) else default


def _make_config(cls, inferred: dict, overrides: dict, source: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}  # JSON lists
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"{source}: unknown config override(s) {sorted(unknown)}; known: {sorted(fields)}")
    clash = {k: (inferred[k], v) for k, v in overrides.items() if k in inferred and inferred[k] != v}
    if clash:
        raise ConfigError(f"{source}: override(s) contradict the weights (weights, override): {clash}")
    return cls(**{**inferred, **overrides})


def _bn(r: KeyReader, prefix: str, c: int) -> dict:
    return {
        "scale": r.take(prefix + "weight", shape=(c,)),
        "bias": r.take(prefix + "bias", shape=(c,)),
        "mean": r.take(prefix + "running_mean", shape=(c,)),
        "var": r.take(prefix + "running_var", shape=(c,)),
    }


def _conv_bn(r: KeyReader, conv: str, bn: str, cin: int, cout: int, path: tuple) -> dict:
    out = {
        path + ("conv", "kernel"): r.take(conv + "weight", conv2d, shape=(cout, cin, 3, 3)),
        path + ("conv", "bias"): r.take(conv + "bias", shape=(cout,)),
    }
    out.update({path + ("bn", k): v for k, v in _bn(r, bn, cout).items()})
    return out


def _ignore_common(r: KeyReader) -> None:
    r.ignore(r".*num_batches_tracked", "BatchNorm step counter; not needed with running statistics")


def _infer_provicnet(r: KeyReader) -> dict:
    e = _dim(r, _B + "cls_token", -1, _dim(r, _B + "norm.weight", 0, 384))
    pw = r.shape(_B + "patch_embed.proj.weight") or (e, 3, 14, 14)
    depth = len({int(m.group(1)) for k in r.sd if (m := re.match(re.escape(_B) + r"blocks\.(\d+)\.", k))})
    n_pos = _dim(r, _B + "pos_embed", 1, 1 + 37 * 37)
    src_grid = math.isqrt(n_pos - 1)
    if src_grid * src_grid != n_pos - 1:
        r.problems.append(f"key '{_B}pos_embed' has {n_pos} rows, not 1 + a square grid")
    heads = []
    i = 1
    while r.has(f"{_HEAD}{i}.weight") and r.has(f"{_HEAD}{i + 1}.running_mean"):
        heads.append(r.shape(f"{_HEAD}{i}.weight")[0])
        i += 4
    cls_key = f"{_HEAD}{i}.weight"
    if not r.has(cls_key):
        r.problems.append(f"missing key '{cls_key}' (classifier conv of the segmentation head)")
    has_cl = r.has("CL_Head.last_layer.weight_v")
    return {
        "embed_dim": e,
        "patch_size": pw[-1],
        "in_chans": pw[1],
        "depth": depth,
        "mlp_hidden": _dim(r, _B + "blocks.0.mlp.fc1.weight", 0, 4 * e),
        "num_registers": _dim(r, _B + "register_tokens", 1, 0),
        "pos_src_grid": src_grid,
        "layer_scale": r.has(_B + "blocks.0.ls1.gamma"),
        "head_channels": tuple(heads),
        "num_classes": _dim(r, cls_key, 0, 4),
        "cl_hidden": _dim(r, "CL_Head.mlp.0.weight", 0, 2048) if has_cl else 0,
        "cl_bottleneck": _dim(r, "CL_Head.mlp.4.weight", 0, 256) if has_cl else 0,
        "cl_out": _dim(r, "CL_Head.last_layer.weight_v", 0, 65536) if has_cl else 0,
    }


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Legacy weight_norm (dim=0): W = g * v / ||v|| with the norm taken per output row."""
    return (g * v / np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True)).astype(v.dtype)


def _convert_provicnet(r: KeyReader, cfg, source: str):
    e, p, c = cfg.embed_dim, cfg.patch_size, cfg.in_chans
    P: dict[tuple, np.ndarray] = {}

    def lin(path, key, cin, cout, bias=True):
        P[path + ("kernel",)] = r.take(key + ".weight", linear, shape=(cout, cin))
        if bias:
            P[path + ("bias",)] = r.take(key + ".bias", shape=(cout,))

    def ln(path, key):
        P[path + ("scale",)] = r.take(key + ".weight", shape=(e,))
        P[path + ("bias",)] = r.take(key + ".bias", shape=(e,))

    w = r.take(_B + "patch_embed.proj.weight", shape=(e, c, p, p))
    P[("patch_embed", "kernel")] = None if w is None else conv2d(w).reshape(p * p * c, e)
    P[("patch_embed", "bias")] = r.take(_B + "patch_embed.proj.bias", shape=(e,))
    P[("cls_token",)] = r.take(_B + "cls_token", shape=(1, 1, e))
    P[("register_tokens",)] = r.take(_B + "register_tokens", shape=(1, cfg.num_registers, e)) \
        if cfg.num_registers else np.zeros((1, 0, e), np.float32)
    src = r.take(_B + "pos_embed", shape=(1, 1 + cfg.pos_src_grid ** 2, e))
    P[("pos_embed_src",)] = src
    if src is not None:
        from vfm_align.models.provicnet import resize_pos_table

        P[("pos_embed",)] = np.asarray(resize_pos_table(src, cfg.pos_src_grid, cfg.grid))
    else:
        P[("pos_embed",)] = None
    r.ignore(re.escape(_B) + "mask_token", "masked-image-modelling token; unused at inference and fine-tuning")
    lin(("axis_pos",), "axis_pos", 1, e)
    lin(("axis_max",), "axis_max", 1, e)
    for i in range(cfg.depth):
        b, t = ("blocks", i), f"{_B}blocks.{i}."
        ln(b + ("norm1",), t + "norm1")
        lin(b + ("attn", "qkv"), t + "attn.qkv", e, 3 * e)
        lin(b + ("attn", "proj"), t + "attn.proj", e, e)
        ln(b + ("norm2",), t + "norm2")
        lin(b + ("mlp", "fc1"), t + "mlp.fc1", e, cfg.mlp_hidden)
        lin(b + ("mlp", "fc2"), t + "mlp.fc2", cfg.mlp_hidden, e)
        if cfg.layer_scale:
            P[b + ("ls1",)] = r.take(t + "ls1.gamma", shape=(e,))
            P[b + ("ls2",)] = r.take(t + "ls2.gamma", shape=(e,))
    ln(("norm",), _B + "norm")
    widths = (e, *cfg.head_channels)
    for j, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
        P.update(_conv_bn(r, f"{_HEAD}{4 * j + 1}.", f"{_HEAD}{4 * j + 2}.", cin, cout, ("head", "stages", j)))
    k = 4 * len(cfg.head_channels) + 1
    P[("head", "classifier", "kernel")] = r.take(f"{_HEAD}{k}.weight", conv2d,
                                                 shape=(cfg.num_classes, widths[-1], 3, 3))
    P[("head", "classifier", "bias")] = r.take(f"{_HEAD}{k}.bias", shape=(cfg.num_classes,))
    if cfg.cl_out:
        dims = (e, cfg.cl_hidden, cfg.cl_hidden, cfg.cl_bottleneck)
        for j, name in enumerate(("fc1", "fc2", "fc3")):
            lin(("cl_head", name), f"CL_Head.mlp.{2 * j}", dims[j], dims[j + 1])
        g = r.take("CL_Head.last_layer.weight_g", shape=(cfg.cl_out, 1))
        v = r.take("CL_Head.last_layer.weight_v", shape=(cfg.cl_out, cfg.cl_bottleneck))
        P[("cl_head", "last", "kernel")] = None if g is None or v is None else linear(fold_weight_norm(g, v))
    _ignore_common(r)
    return P


def _infer_fusion(r: KeyReader) -> dict:
    present = [s for s, t in _FUSION_STREAMS.items() if r.has(f"{t}.UpsampleModule.1.weight")]
    ref = f"{_FUSION_STREAMS[present[0]]}.UpsampleModule.1.weight" if present else None
    ws = r.shape(ref) if ref else (128, 384, 3, 3)
    return {
        "embed_dim": ws[1],
        "stream_channels": ws[0],
        "fusion_channels": _dim(r, "FusionSegmentation.1.weight", 0, 128),
        "num_classes": _dim(r, "FusionSegmentation.5.weight", 0, 4),
    }


def _convert_fusion(r: KeyReader, cfg):
    P: dict[tuple, np.ndarray] = {}
    for name in cfg.sequences:
        t = f"{_FUSION_STREAMS[name]}.UpsampleModule."
        P.update(_conv_bn(r, t + "1.", t + "2.", cfg.embed_dim, cfg.stream_channels, ("streams", name)))
    P.update(_conv_bn(r, "FusionSegmentation.1.", "FusionSegmentation.2.",
                      len(cfg.sequences) * cfg.stream_channels, cfg.fusion_channels, ("fuse",)))
    P[("classifier", "kernel")] = r.take("FusionSegmentation.5.weight", conv2d,
                                         shape=(cfg.num_classes, cfg.fusion_channels, 3, 3))
    P[("classifier", "bias")] = r.take("FusionSegmentation.5.bias", shape=(cfg.num_classes,))
    _ignore_common(r)
    return P


def convert(sd: dict, extras: dict, arch: str, source: str, **config):
    """Convert a ProViCNet state_dict; ``config`` overrides what the weights cannot tell (num_heads, img_size)."""
    from vfm_align.models.provicnet import ProViCNet, ProViCNetConfig, ProViCNetFusion, ProViCNetFusionConfig

    r = KeyReader(sd, source)
    if arch == "provicnet":
        cfg = _make_config(ProViCNetConfig, _infer_provicnet(r), config, source)
        if cfg.embed_dim % cfg.num_heads:
            raise ConfigError(f"{source}: width {cfg.embed_dim} is not divisible by num_heads={cfg.num_heads}")
        params = _convert_provicnet(r, cfg, source)
        build = ProViCNet
    elif arch == "provicnet_fusion":
        cfg = _make_config(ProViCNetFusionConfig, _infer_fusion(r), config, source)
        params = _convert_fusion(r, cfg)
        build = ProViCNetFusion
    else:
        raise ConversionError(f"{source}: arch '{arch}' is not a ProViCNet architecture {ARCHS}")
    report = r.finish()  # one error listing every missing, mis-shaped or unexpected key
    # Abstract build: no random init (and no per-shape init compiles), every leaf gets a weight.
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    assign(model, params, source)
    return model, {"config": cfg, **report}
