"""Key map: ProFound 3D MAE-ViT (``MaskedAutoencoderViT``, models/mae.py) -> :class:`MaeViT3d`.

Every size the tensors determine is read from their shapes. Head counts are not stored in the
weights: they come from keyword overrides, else the checkpoint's pickled args, else the released
``mae_vit_base_patch16`` values (12 encoder heads, 16 decoder heads). The sin-cos positional tables
are copied from the checkpoint, never regenerated.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from flax import nnx

from converters.keymap import KeyReader, assign, conv3d, linear
from vfm_align.errors import ConfigError, ConversionError
from vfm_align.models.mae_vit3d import ARCH, MaeViT3d, MaeViT3dConfig

ARCHS = (ARCH,)

_RELEASED = MaeViT3dConfig()  # the released factory's values for what the weights cannot tell
_OVERRIDABLE = ("num_heads", "decoder_num_heads", "norm_pix_loss", "img_size")


def detect(state_dict: dict) -> str | None:
    w = state_dict.get("patch_embed.proj.weight")
    if w is not None and np.ndim(w) == 5 and "pos_embed" in state_dict and "decoder_pred.weight" in state_dict:
        return ARCH
    return None


def _depth(sd: dict, prefix: str) -> int:
    rx = re.compile(rf"{prefix}\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    if idx != set(range(len(idx))):
        raise ConversionError(f"non-contiguous {prefix} indices {sorted(idx)}")
    return len(idx)


def infer_config(sd: dict, extras: dict, source: str, **overrides: Any) -> tuple[MaeViT3dConfig, dict[str, str]]:
    """Build the config from tensor shapes, then args / overrides; also say where each setting came from."""
    unknown = set(overrides) - set(_OVERRIDABLE)
    if unknown:
        raise ConfigError(f"{source}: unknown settings {sorted(unknown)} for {ARCH}; allowed: {list(_OVERRIDABLE)}")
    for key in ("patch_embed.proj.weight", "pos_embed", "decoder_embed.weight", "decoder_pred.weight"):
        if key not in sd:
            raise ConversionError(f"{source}: missing key '{key}' needed to infer the MAE-ViT sizes")
    e, c, pd, ph, pw = sd["patch_embed.proj.weight"].shape
    de = sd["decoder_embed.weight"].shape[0]
    depth, ddepth = _depth(sd, "blocks"), _depth(sd, "decoder_blocks")
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * e
    dmlp = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] if ddepth else 4 * de
    num_patches = sd["pos_embed"].shape[1] - 1
    args = extras.get("args") if isinstance(extras.get("args"), dict) else {}

    origin: dict[str, str] = {}

    def pick(name, default):
        if name in overrides:
            origin[name] = "override"
            return overrides[name]
        if name in args and args[name] is not None:
            origin[name] = "checkpoint args"
            return args[name]
        origin[name] = "released default"
        return default

    num_heads = int(pick("num_heads", _RELEASED.num_heads))
    decoder_num_heads = int(pick("decoder_num_heads", _RELEASED.decoder_num_heads))
    norm_pix_loss = bool(pick("norm_pix_loss", False))

    def tiles(size) -> bool:
        return (size is not None and len(size) == 3 and all(int(s) % p == 0 for s, p in zip(size, (pd, ph, pw)))
                and math.prod(int(s) // p for s, p in zip(size, (pd, ph, pw))) == num_patches)

    if "img_size" in overrides:
        img_size = overrides["img_size"]
        origin["img_size"] = "override"
    else:
        # The reference factory ignores the CLI input size, so args.input_size is only trusted when it
        # matches the stored table; otherwise fall back to the factory's size, else leave it open.
        img_size, origin["img_size"] = None, "unknown: any input whose grid has the table's token count"
        for cand, where in ((args.get("input_size"), "checkpoint args"), (_RELEASED.img_size, "released default")):
            if isinstance(cand, (list, tuple)) and tiles(cand):
                img_size, origin["img_size"] = cand, where
                break
    img_size = None if img_size is None else tuple(int(s) for s in img_size)

    try:
        config = MaeViT3dConfig(
            patch_size=(int(pd), int(ph), int(pw)), in_chans=int(c), embed_dim=int(e), depth=depth,
            num_heads=num_heads, mlp_dim=int(mlp), decoder_embed_dim=int(de), decoder_depth=ddepth,
            decoder_num_heads=decoder_num_heads, decoder_mlp_dim=int(dmlp), num_patches=int(num_patches),
            img_size=img_size, norm_pix_loss=norm_pix_loss)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return config, origin


def _block(r: KeyReader, src: str, dst: tuple, dim: int, mlp: int) -> dict[tuple, np.ndarray]:
    out = {}
    for n in ("norm1", "norm2"):
        out[dst + (n, "scale")] = r.take(f"{src}.{n}.weight", shape=(dim,))
        out[dst + (n, "bias")] = r.take(f"{src}.{n}.bias", shape=(dim,))
    linears = (("attn.qkv", 3 * dim, dim), ("attn.proj", dim, dim), ("mlp.fc1", mlp, dim), ("mlp.fc2", dim, mlp))
    for name, o, i in linears:
        path = dst + tuple(name.split("."))
        out[path + ("kernel",)] = r.take(f"{src}.{name}.weight", linear, shape=(o, i))
        out[path + ("bias",)] = r.take(f"{src}.{name}.bias", shape=(o,))
    return out


def convert(state_dict: dict, extras: dict, arch: str, source: str, **overrides: Any):
    config, origin = infer_config(state_dict, extras, source, **overrides)
    c = config
    r = KeyReader(state_dict, source)
    t1 = c.num_patches + 1

    def patch_kernel(w):  # Conv3d [E, C, pd, ph, pw] -> Dense [(pd, ph, pw, C), E], patchify's pixel order
        return conv3d(w).reshape(-1, w.shape[0])

    p: dict[tuple, np.ndarray] = {
        ("patch_embed", "kernel"): r.take("patch_embed.proj.weight", patch_kernel,
                                          shape=(c.embed_dim, c.in_chans, *c.patch_size)),
        ("patch_embed", "bias"): r.take("patch_embed.proj.bias", shape=(c.embed_dim,)),
        ("cls_token",): r.take("cls_token", shape=(1, 1, c.embed_dim)),
        ("pos_embed",): r.take("pos_embed", shape=(1, t1, c.embed_dim)),
        ("norm", "scale"): r.take("norm.weight", shape=(c.embed_dim,)),
        ("norm", "bias"): r.take("norm.bias", shape=(c.embed_dim,)),
        ("decoder_embed", "kernel"): r.take("decoder_embed.weight", linear, shape=(c.decoder_embed_dim, c.embed_dim)),
        ("decoder_embed", "bias"): r.take("decoder_embed.bias", shape=(c.decoder_embed_dim,)),
        ("mask_token",): r.take("mask_token", shape=(1, 1, c.decoder_embed_dim)),
        ("decoder_pos_embed",): r.take("decoder_pos_embed", shape=(1, t1, c.decoder_embed_dim)),
        ("decoder_norm", "scale"): r.take("decoder_norm.weight", shape=(c.decoder_embed_dim,)),
        ("decoder_norm", "bias"): r.take("decoder_norm.bias", shape=(c.decoder_embed_dim,)),
        ("decoder_pred", "kernel"): r.take("decoder_pred.weight", linear, shape=(c.patch_dim, c.decoder_embed_dim)),
        ("decoder_pred", "bias"): r.take("decoder_pred.bias", shape=(c.patch_dim,)),
    }
    for i in range(c.depth):
        p.update(_block(r, f"blocks.{i}", ("blocks", i), c.embed_dim, c.mlp_dim))
    for i in range(c.decoder_depth):
        p.update(_block(r, f"decoder_blocks.{i}", ("decoder_blocks", i), c.decoder_embed_dim, c.decoder_mlp_dim))
    report = r.finish()

    # Built abstractly: every variable is overwritten, so random init would only cost time and memory.
    model = nnx.eval_shape(lambda: MaeViT3d(c, rngs=nnx.Rngs(0)))
    assign(model, p, source)
    return model, {"config": c, "config_origin": origin, **report}


__all__ = ["ARCHS", "detect", "convert", "infer_config"]
