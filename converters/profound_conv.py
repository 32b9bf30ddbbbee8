"""Key map for ProFound-Conv (3D ConvNeXt-V2): bare encoder, Classifier, UperNet, and the raw
MinkowskiEngine FCMAE pretrain file.

Sizes (depths, dims, classes, head widths) come from tensor shapes; what shapes cannot tell comes
from the checkpoint's pickled args or keyword overrides.

Minkowski layout (the FCMAE pretrain file) is first remapped to the dense torch layout with
:func:`remap_minkowski`, following the reference fine-tuning code: sparse kernels [kvol, in, out]
become [out, in, k, k, k] with the three spatial axes put in REVERSE order (a transpose of the
first and last kernel axes, not a flip). That axis convention generalises ConvNeXt-V2's 2-D remap
and has not been checked against a real MinkowskiEngine run.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from converters.keymap import KeyReader, assign, conv3d, linear
from vfm_align.errors import ConfigError, ConversionError

ARCHS = ("profound_conv", "profound_conv_cls", "profound_conv_upernet", "profound_fcmae")

_VIT_KEYS = re.compile(r"^(cls_token|pos_embed|blocks\.|patch_embed\.)")
_DECODER_KEY = re.compile(r"(decoder|mask_token|proj|pred)")


def _prefix(sd) -> str | None:
    for p in ("encoder.", ""):
        if f"{p}downsample_layers.0.0.weight" in sd:
            return p
    return None


def detect(state_dict) -> str | None:
    if any(_VIT_KEYS.match(k) for k in state_dict):
        return None
    p = _prefix(state_dict)
    if p is None:
        return None
    if any(k.startswith(f"{p}stages.") and k.endswith(".kernel") for k in state_dict):
        return "profound_fcmae"
    if "decode_head.classifier.weight" in state_dict:
        return "profound_conv_upernet"
    if "head.3.weight" in state_dict:
        return "profound_conv_cls"
    if p == "":
        return "profound_conv"
    return None


# --------------------------------------------------------------------------- Minkowski remap

def _mink_kernel_to_dense(w: np.ndarray) -> np.ndarray:
    """[kvol, in, out] -> [out, in, k, k, k], spatial axes reversed."""
    kvol, cin, cout = w.shape
    k = round(kvol ** (1 / 3))
    if k ** 3 != kvol:
        raise ConversionError(f"Minkowski kernel volume {kvol} is not a cube")
    return np.ascontiguousarray(w.transpose(2, 1, 0).reshape(cout, cin, k, k, k).transpose(0, 1, 4, 3, 2))


def _mink_dw_to_dense(w: np.ndarray) -> np.ndarray:
    """Depthwise [kvol, C] -> [C, 1, k, k, k], spatial axes reversed."""
    kvol, c = w.shape
    k = round(kvol ** (1 / 3))
    return np.ascontiguousarray(w.T.reshape(c, 1, k, k, k).transpose(0, 1, 4, 3, 2))


def remap_minkowski(state_dict: dict[str, np.ndarray]):
    """Raw FCMAE (Minkowski) state_dict -> (dense encoder state_dict, {dense key: raw key}, decoder keys).

    Rules: drop decoder/mask_token/proj/pred keys (returned separately), strip ``encoder.``,
    ``.kernel`` -> ``.weight`` with the layout transforms above, remove the ``ln``/``linear``
    path components, flatten [1, out] biases, unsqueeze GRN params to [1, 1, 1, 1, C]. The final
    ``norm`` is absent from pretrain files.
    """
    dense, origin, decoder = {}, {}, []
    for key, w in state_dict.items():
        if _DECODER_KEY.search(key):
            decoder.append(key)
            continue
        name = key[len("encoder."):] if key.startswith("encoder.") else key
        name = name.replace(".ln.", ".").replace(".linear.", ".")
        w = np.asarray(w)
        if name.endswith(".kernel"):
            name = name[: -len(".kernel")] + ".weight"
            if w.ndim == 3:
                w = _mink_kernel_to_dense(w)
            elif ".dwconv." in name:
                w = _mink_dw_to_dense(w)
            elif w.ndim == 2:  # 1x1x1 sparse conv stored [in, out]
                w = np.ascontiguousarray(w.T[:, :, None, None, None])
        elif name.endswith(".bias") and w.ndim == 2 and w.shape[0] == 1:
            w = w.reshape(-1)
        elif re.search(r"\.grn\.(gamma|beta)$", name) and w.ndim == 2:
            w = w.reshape(1, 1, 1, 1, -1)
        dense[name] = w
        origin[name] = key
    return dense, origin, decoder


def dense_to_minkowski(state_dict: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of :func:`remap_minkowski` for a dense encoder state_dict (tests, and writing pretrain files)."""
    out = {}
    for key, w in state_dict.items():
        name = key[len(prefix):]
        if name.startswith("norm."):
            continue  # pretrain files carry no final norm
        m = re.match(r"(downsample_layers\.[123])\.([01])\.(weight|bias)$", name)
        s = re.match(r"(stages\.\d+\.\d+)\.(dwconv|norm|pwconv1|pwconv2|grn)\.(\w+)$", name)
        if m and m.group(2) == "0":
            name = f"{m.group(1)}.0.ln.{m.group(3)}"
        elif m:
            if m.group(3) == "weight":
                name = f"{m.group(1)}.1.kernel"
                if w.shape[2:] == (1, 1, 1):
                    w = w[:, :, 0, 0, 0].T
                else:
                    o, i = w.shape[:2]
                    w = w.transpose(0, 1, 4, 3, 2).reshape(o, i, -1).transpose(2, 1, 0)
            else:
                w = w.reshape(1, -1)
        elif s:
            blk, layer, p = s.groups()
            if layer == "dwconv":
                if p == "weight":
                    name, w = f"{blk}.dwconv.kernel", w.transpose(0, 1, 4, 3, 2).reshape(w.shape[0], -1).T
                else:
                    w = w.reshape(1, -1)
            elif layer == "norm":
                name = f"{blk}.norm.ln.{p}"
            elif layer in ("pwconv1", "pwconv2"):
                name = f"{blk}.{layer}.linear.{p}"
            else:
                w = w.reshape(1, -1)
        out["encoder." + name] = np.ascontiguousarray(w)
    return out


# --------------------------------------------------------------------------- shared readers

def _encoder_sizes(sd, p: str, source: str):
    if f"{p}downsample_layers.0.0.weight" not in sd:
        raise ConversionError(f"{source}: no '{p}downsample_layers.0.0.weight' (not a ProFound-Conv checkpoint)")
    depths, dims = [], []
    for s in range(4):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(p)}stages\.{s}\.(\d+)\.", k))}
        if not blocks:
            raise ConversionError(f"{source}: stage {s} has no blocks ('{p}stages.{s}.*')")
        depths.append(max(blocks) + 1)
        dims.append(int(sd[f"{p}stages.{s}.0.dwconv.bias"].shape[0]))
    return {"in_chans": int(sd[f"{p}downsample_layers.0.0.weight"].shape[1]), "depths": tuple(depths),
            "dims": tuple(dims)}


def _read_encoder(r: KeyReader, p: str, depths, dims, cin, path=("encoder",), final_norm=True):
    out = {}
    P = tuple(path)

    def ln(src, dst, c):
        out[P + dst + ("scale",)] = r.take(f"{src}.weight", shape=(c,))
        out[P + dst + ("bias",)] = r.take(f"{src}.bias", shape=(c,))

    out[P + ("stem", "kernel")] = r.take(f"{p}downsample_layers.0.0.weight", conv3d, (dims[0], cin, 4, 4, 4))
    out[P + ("stem", "bias")] = r.take(f"{p}downsample_layers.0.0.bias", shape=(dims[0],))
    ln(f"{p}downsample_layers.0.1", ("stem_norm",), dims[0])
    for i in range(3):
        k = 2 if i < 2 else 1
        ln(f"{p}downsample_layers.{i + 1}.0", ("down_norms", i), dims[i])
        out[P + ("downs", i, "kernel")] = r.take(f"{p}downsample_layers.{i + 1}.1.weight", conv3d,
                                                 (dims[i + 1], dims[i], k, k, k))
        out[P + ("downs", i, "bias")] = r.take(f"{p}downsample_layers.{i + 1}.1.bias", shape=(dims[i + 1],))
    for s, (depth, c) in enumerate(zip(depths, dims)):
        for b in range(depth):
            src, dst = f"{p}stages.{s}.{b}", P + ("stages", s, b)
            out.update(_read_block(r, src, dst, c))
    if final_norm:
        ln(f"{p}norm", ("norm",), dims[-1])
    return out


def _read_block(r: KeyReader, src: str, dst: tuple, c: int):
    def depthwise(w):  # torch (C, 1, kD, kH, kW) -> (kD, kH, kW, C)
        return np.ascontiguousarray(w[:, 0].transpose(1, 2, 3, 0))

    out = {
        dst + ("dwconv_kernel",): r.take(f"{src}.dwconv.weight", depthwise, (c, 1, 7, 7, 7)),
        dst + ("dwconv_bias",): r.take(f"{src}.dwconv.bias", shape=(c,)),
        dst + ("norm", "scale"): r.take(f"{src}.norm.weight", shape=(c,)),
        dst + ("norm", "bias"): r.take(f"{src}.norm.bias", shape=(c,)),
        dst + ("pwconv1", "kernel"): r.take(f"{src}.pwconv1.weight", linear, (4 * c, c)),
        dst + ("pwconv1", "bias"): r.take(f"{src}.pwconv1.bias", shape=(4 * c,)),
        dst + ("grn", "gamma"): r.take(f"{src}.grn.gamma", lambda w: w.reshape(-1), (1, 1, 1, 1, 4 * c)),
        dst + ("grn", "beta"): r.take(f"{src}.grn.beta", lambda w: w.reshape(-1), (1, 1, 1, 1, 4 * c)),
        dst + ("pwconv2", "kernel"): r.take(f"{src}.pwconv2.weight", linear, (c, 4 * c)),
        dst + ("pwconv2", "bias"): r.take(f"{src}.pwconv2.bias", shape=(c,)),
    }
    return out


def _conv_module(r, src, dst, cout, cin, k):
    return {
        dst + ("kernel",): r.take(f"{src}.conv.weight", conv3d, (cout, cin, k, k, k)),
        dst + ("norm", "scale"): r.take(f"{src}.batch_norm.weight", shape=(cout,)),
        dst + ("norm", "bias"): r.take(f"{src}.batch_norm.bias", shape=(cout,)),
    }


def _make_config(cls, inferred: dict, overrides: dict, source: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"{source}: unknown config keys {sorted(unknown)} for {cls.__name__}; known {sorted(fields)}")
    for k, v in overrides.items():
        if k in inferred and inferred[k] != (tuple(v) if isinstance(v, list) else v):
            raise ConfigError(f"{source}: override {k}={v!r} contradicts the weights ({inferred[k]!r})")
    vals = {**inferred, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}}
    return cls(**vals)


def _build(arch, config):
    from flax import nnx

    from vfm_align.models.registry import build_model

    return build_model(arch, config, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- convert

def convert(state_dict, extras, arch, source, **config):
    if arch == "profound_fcmae":
        return _convert_fcmae(state_dict, source, **config)
    p = _prefix(state_dict)
    if p is None:
        raise ConversionError(f"{source}: no 'downsample_layers.0.0.weight' key; not a ProFound-Conv checkpoint")
    sizes = _encoder_sizes(state_dict, p, source)
    r = KeyReader(state_dict, source)
    args = dict(extras.get("args") or {})
    if arch == "profound_conv":
        from vfm_align.models.convnext3d import ConvNeXt3DConfig as Cfg

        cfg = _make_config(Cfg, sizes, config, source)
        params = _read_encoder(r, p, cfg.depths, cfg.dims, cfg.in_chans, path=())
    elif arch == "profound_conv_cls":
        from vfm_align.models.heads.classifier import ConvNeXt3DClassifierConfig as Cfg

        w0, w3 = r.shape("head.0.weight"), r.shape("head.3.weight")
        if w0 is None or w3 is None:
            raise ConversionError(f"{source}: classifier keys 'head.0.weight'/'head.3.weight' missing")
        inferred = {**sizes, "bottleneck_dim": w0[0], "num_classes": w3[0]}
        if "num_classes" in args and args["num_classes"] != w3[0]:
            raise ConversionError(
                f"{source}: args.num_classes={args['num_classes']} but head.3.weight has {w3[0]} rows")
        cfg = _make_config(Cfg, inferred, config, source)
        params = _read_encoder(r, p, cfg.depths, cfg.dims, cfg.in_chans)
        nb, k, c4 = cfg.bottleneck_dim, cfg.num_classes, cfg.dims[-1]
        params.update({
            ("fc1", "kernel"): r.take("head.0.weight", linear, (nb, c4)),
            ("fc1", "bias"): r.take("head.0.bias", shape=(nb,)),
            ("bn", "scale"): r.take("head.1.weight", shape=(nb,)),
            ("bn", "bias"): r.take("head.1.bias", shape=(nb,)),
            ("bn", "mean"): r.take("head.1.running_mean", shape=(nb,)),
            ("bn", "var"): r.take("head.1.running_var", shape=(nb,)),
            ("fc2", "kernel"): r.take("head.3.weight", linear, (k, nb)),
            ("fc2", "bias"): r.take("head.3.bias", shape=(k,)),
        })
        r.ignore(r"head\.1\.num_batches_tracked", "BatchNorm step counter; unused at inference (momentum is fixed)")
    elif arch == "profound_conv_upernet":
        params, cfg = _convert_upernet(r, state_dict, p, sizes, args, config, source)
    else:
        raise ConversionError(f"{source}: arch '{arch}' is not handled by the ProFound-Conv key map")
    report = r.finish()
    model = assign(_build(arch, cfg), params, source)
    return model, {"config": cfg, **report}


def _convert_upernet(r, sd, p, sizes, args, config, source):
    from vfm_align.models.heads.upernet3d import UperNet3DConfig as Cfg

    cls_w = r.shape("decode_head.classifier.weight")
    hs = cls_w[1]
    n_psp = len({k.split(".")[2] for k in sd if k.startswith("decode_head.psp_modules.")})
    inferred = {**sizes, "out_channels": cls_w[0], "hidden_size": hs}
    if r.has("auxiliary_head.convs.0.conv.weight"):
        inferred.update(use_auxiliary_head=True, auxiliary_channels=r.shape("auxiliary_head.convs.0.conv.weight")[0])
    else:
        inferred["use_auxiliary_head"] = False
    oc = args.get("out_channels", args.get("num_classes"))
    if oc is not None and oc != cls_w[0]:
        raise ConversionError(f"{source}: args out_channels={oc} but decode_head.classifier.weight has {cls_w[0]} rows")
    if "pool_scales" not in config and n_psp != 4:
        raise ConfigError(f"{source}: {n_psp} PPM branches; pass pool_scales= (the weights cannot tell the scales)")
    cfg = _make_config(Cfg, inferred, config, source)
    if len(cfg.pool_scales) != n_psp:
        raise ConfigError(f"{source}: pool_scales {cfg.pool_scales} but the checkpoint has {n_psp} PPM branches")
    dims = cfg.dims
    params = _read_encoder(r, p, cfg.depths, dims, cfg.in_chans)
    for i, c in enumerate(dims):
        params[("hidden_norm", i, "scale")] = r.take(f"hidden_norm.{i}.weight", shape=(c,))
        params[("hidden_norm", i, "bias")] = r.take(f"hidden_norm.{i}.bias", shape=(c,))
    D = ("decode_head",)
    for i in range(n_psp):
        params.update(_conv_module(r, f"decode_head.psp_modules.{i}.1", D + ("psp_modules", i), hs, dims[-1], 1))
    params.update(_conv_module(r, "decode_head.bottleneck", D + ("bottleneck",), hs, dims[-1] + n_psp * hs, 3))
    for i in range(3):
        params.update(_conv_module(r, f"decode_head.lateral_convs.{i}", D + ("lateral_convs", i), hs, dims[i], 1))
        params.update(_conv_module(r, f"decode_head.fpn_convs.{i}", D + ("fpn_convs", i), hs, hs, 3))
    params.update(_conv_module(r, "decode_head.fpn_bottleneck", D + ("fpn_bottleneck",), hs, 4 * hs, 3))
    o = cfg.out_channels
    params[D + ("classifier", "kernel")] = r.take("decode_head.classifier.weight", conv3d, (o, hs, 1, 1, 1))
    params[D + ("classifier", "bias")] = r.take("decode_head.classifier.bias", shape=(o,))
    if cfg.use_auxiliary_head:
        a, A = cfg.auxiliary_channels, ("auxiliary_head",)
        params.update(_conv_module(r, "auxiliary_head.convs.0", A + ("convs", 0), a, dims[2], 3))
        params[A + ("classifier", "kernel")] = r.take("auxiliary_head.classifier.weight", conv3d, (o, a, 1, 1, 1))
        params[A + ("classifier", "bias")] = r.take("auxiliary_head.classifier.bias", shape=(o,))
    return params, cfg


def _convert_fcmae(sd, source, with_decoder: bool = False, **config):
    """Raw FCMAE pretrain file -> dense encoder (``profound_conv``), or the whole FCMAE with ``with_decoder``."""
    dense, origin, decoder_keys = remap_minkowski(sd)
    p = _prefix(dense)
    if p != "":
        raise ConversionError(f"{source}: no 'encoder.downsample_layers.0.0.weight'; not an FCMAE pretrain file")
    sizes = _encoder_sizes(dense, "", source)
    has_norm = "norm.weight" in dense
    r = KeyReader(dense, source)
    if not with_decoder:
        from vfm_align.models.convnext3d import ConvNeXt3DConfig as Cfg

        cfg = _make_config(Cfg, sizes, config, source)
        model = _build("profound_conv", cfg)
        params = _read_encoder(r, "", cfg.depths, cfg.dims, cfg.in_chans, path=(), final_norm=has_norm)
        if not has_norm:  # stays at init (weight 1, bias 0), as the reference fine-tuning leaves it
            c = cfg.dims[-1]
            params[("norm", "scale")], params[("norm", "bias")] = np.ones(c, np.float32), np.zeros(c, np.float32)
        report = r.finish()
        model = assign(model, params, source)
        why = "FCMAE decoder / mask token; not part of the encoder (pass with_decoder=True to keep it)"
        ignored = {k: why for k in decoder_keys}
        return model, {"config": cfg, "used": [origin[k] for k in report["used"]], "ignored": ignored,
                       "arch": "profound_conv"}  # what was built: a bare encoder
    from vfm_align.models.fcmae import FCMAEConfig as Cfg

    dec = {k: np.asarray(sd[k]) for k in decoder_keys}
    rd = KeyReader(dec, source)
    pw = rd.shape("pred.weight")
    dw = rd.shape("proj.weight")
    if pw is None or dw is None:
        raise ConversionError(f"{source}: with_decoder=True but 'proj.weight'/'pred.weight' are missing")
    ddepth = len({k.split(".")[1] for k in dec if k.startswith("decoder.")})
    inferred = {**sizes, "decoder_dim": dw[0], "decoder_depth": ddepth}
    cfg = _make_config(Cfg, inferred, config, source)
    if pw[0] != cfg.in_chans * int(np.prod(cfg.patch_size)):
        raise ConfigError(
            f"{source}: pred.weight has {pw[0]} outputs, not in_chans*prod(patch_size) for {cfg.patch_size}")
    params = _read_encoder(r, "", cfg.depths, cfg.dims, cfg.in_chans, final_norm=has_norm)
    if not has_norm:
        c = cfg.dims[-1]
        params[("encoder", "norm", "scale")] = np.ones(c, np.float32)
        params[("encoder", "norm", "bias")] = np.zeros(c, np.float32)
    e = cfg.decoder_dim
    params[("proj", "kernel")] = rd.take("proj.weight", conv3d, (e, cfg.dims[-1], 1, 1, 1))
    params[("proj", "bias")] = rd.take("proj.bias", shape=(e,))
    params[("mask_token",)] = rd.take("mask_token", lambda w: w.reshape(-1), (1, e, 1, 1, 1))
    for b in range(cfg.decoder_depth):
        params.update(_read_block(rd, f"decoder.{b}", ("decoder", b), e))
    params[("pred", "kernel")] = rd.take("pred.weight", conv3d, (pw[0], e, 1, 1, 1))
    params[("pred", "bias")] = rd.take("pred.bias", shape=(pw[0],))
    report, dreport = r.finish(), rd.finish()
    model = assign(_build("profound_fcmae", cfg), params, source)
    return model, {"config": cfg, "used": [origin[k] for k in report["used"]] + dreport["used"], "ignored": {}}


__all__ = ["ARCHS", "detect", "convert", "remap_minkowski", "dense_to_minkowski"]
