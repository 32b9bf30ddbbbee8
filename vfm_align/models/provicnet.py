"""ProViCNet in Flax NNX: DINOv2 ViT-S/14 with registers run on 2.5D slices, plus its heads.

Two architectures:

* ``provicnet`` (:class:`ProViCNet`): one MRI sequence. Input (N, H, W, 3) channels-last slices
  (three consecutive slices as channels) and ``pos`` (N, 2) = (slice index, slice count) as raw
  floats. Tokens are [cls | registers | axis_pos | axis_max | patches]; the conv head turns the
  patch grid into logits at 8x the grid (448 px input -> 32x32 grid -> 256x256 logits).
* ``provicnet_fusion`` (:class:`ProViCNetFusion`): fuses the patch tokens of the T2, ADC and DWI
  models into one segmentation.

Numerics follow the reference: exact GELU, LayerNorm eps 1e-6 with two-pass variance, BatchNorm
with running statistics, nearest x2 upsampling, position table resized bicubic with antialias.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfm_align.models.layers import Attention, Mlp, RematBlock, batch_norm, layer_norm, run_block
from vfm_align.models.registry import register


@dataclasses.dataclass(frozen=True)
class ProViCNetConfig:
    """Per-sequence ProViCNet. Defaults are the released model (ViT-S/14-reg, 4 classes)."""

    img_size: int = 448  # input side the stored position table is resized for (grid = img_size // patch_size)
    patch_size: int = 14
    in_chans: int = 3  # 2.5D: consecutive slices as channels
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6  # not recoverable from the weights; 6 as released
    mlp_hidden: int = 1536
    num_registers: int = 4
    pos_src_grid: int = 37  # DINOv2's 518 px table (37 x 37 patches + class row)
    layer_scale: bool = True
    ln_eps: float = 1e-6
    bn_eps: float = 1e-5
    head_channels: tuple[int, ...] = (128, 64)  # conv_head8 widths before the classifier conv
    num_classes: int = 4  # background, gland, indolent cancer, csPCa
    cl_hidden: int = 2048  # contrastive (DINO-style) head; cl_out = 0 means no head
    cl_bottleneck: int = 256
    cl_out: int = 65536

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix(self) -> int:
        """cls + registers + the two slice-position tokens."""
        return 1 + self.num_registers + 2


@dataclasses.dataclass(frozen=True)
class ProViCNetFusionConfig:
    """Three-sequence fusion head (FusionModalities). Defaults as released."""

    embed_dim: int = 384
    stream_channels: int = 128
    fusion_channels: int = 128
    num_classes: int = 4
    bn_eps: float = 1e-5
    sequences: tuple[str, ...] = ("t2w", "adc", "dwi")  # call order of the reference


# Which of a 3x3 kernel's taps land on each low-resolution neighbour after a nearest x2 upsampling:
# output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i; row 2i+1 reads i, i, i+1.
# _PHASE_TAPS[parity, tap, k] says whether kernel row k falls on the parity's tap-th neighbour.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                        [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample2_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """A 3x3 convolution (padding 1) of x upsampled x2 nearest-neighbour (torch's nn.Upsample(scale_factor=2)),
    computed on the low-resolution grid.

    Each of the four output phases is a 2x2 convolution of the input with summed kernel taps, so
    all four come from one 2x2 convolution with 4x the output channels followed by an interleave.
    That is 16 instead of 36 multiply-adds per input pixel and channel pair and never materialises
    the upsampled tensor; the result equals the direct form up to float rounding of the summed taps.
    x: (N, H, W, Cin); kernel: (3, 3, Cin, Cout) (flax HWIO) -> (N, 2H, 2W, Cout).
    """
    n, h, w, _ = x.shape
    cout = kernel.shape[-1]
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    # (a, b, tap_row, tap_col, Cin, Cout) -> (tap_row, tap_col, Cin, a, b, Cout)
    k = jnp.einsum("apk,bql,klio->pqiabo", taps, taps, kernel).reshape(2, 2, kernel.shape[2], 4 * cout)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(xp, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(n, h + 1, w + 1, 2, 2, cout)
    # phase (a, b) of output pixel (i, j) sits at low-res position (i + a, j + b)
    rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    out = jnp.stack(rows, axis=2)  # (N, H, 2, W, 2, Cout)
    out = out.reshape(n, 2 * h, 2 * w, cout)
    return out if bias is None else out + bias


def resize_pos_table(table: jax.Array, src_grid: int, dst_grid: int) -> jax.Array:
    """[1, 1 + s*s, E] -> [1, 1 + d*d, E]: class row kept, grid resized bicubic with antialias.

    jax.image.resize('cubic', antialias=True) reproduces torch's bicubic antialiased
    interpolation used by DINOv2 (Keys a = -0.5); computed in float32 as upstream does.
    """
    table = table.astype(jnp.float32)
    if src_grid == dst_grid:
        return table
    cls_row, grid = table[:, :1], table[:, 1:]
    e = grid.shape[-1]
    grid = grid.reshape(src_grid, src_grid, e)
    grid = jax.image.resize(grid, (dst_grid, dst_grid, e), method="cubic", antialias=True)
    return jnp.concatenate([cls_row, grid.reshape(1, dst_grid * dst_grid, e)], axis=1)


class ConvBNReLU(nnx.Module):
    """nearest x2 -> Conv 3x3 (pad 1) -> BatchNorm (running stats) -> ReLU."""

    def __init__(self, cin: int, cout: int, *, bn_eps: float, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = batch_norm(cout, eps=bn_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(upsample2_conv3x3(x, self.conv.kernel[...], self.conv.bias[...])))


class ConvHead8(nnx.Module):
    """conv_head8: (N, g, g, E) -> (N, 8g, 8g, K) through three nearest x2 upsamplings."""

    def __init__(self, dim: int, channels: tuple[int, ...], num_classes: int, *, bn_eps: float, rngs: nnx.Rngs):
        widths = (dim, *channels)
        self.stages = nnx.List([ConvBNReLU(a, b, bn_eps=bn_eps, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.classifier = nnx.Conv(widths[-1], num_classes, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for stage in self.stages:
            x = stage(x)
        return upsample2_conv3x3(x, self.classifier.kernel[...], self.classifier.bias[...])


class ContrastiveHead(nnx.Module):
    """DINO-style head: 3-layer MLP (exact GELU) -> L2 normalise -> bias-free projection.

    The reference's weight-normalised last layer is folded into ``last`` at conversion.
    """

    def __init__(self, dim: int, hidden: int, bottleneck: int, out: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, bottleneck, rngs=rngs)
        self.last = nnx.Linear(bottleneck, out, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        x = jax.nn.gelu(self.fc2(x), approximate=False)
        x = self.fc3(x)
        # torch F.normalize: x / max(||x||, 1e-12)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return self.last(x)


class Block(RematBlock, nnx.Module):
    """DINOv2 pre-norm block with LayerScale: x += ls1*attn(norm1 x); x += ls2*mlp(norm2 x)."""

    def __init__(self, cfg: ProViCNetConfig, *, rngs: nnx.Rngs):
        e = cfg.embed_dim
        self.norm1 = layer_norm(e, cfg.ln_eps, rngs=rngs)
        self.attn = Attention(e, cfg.num_heads, qkv_bias=True, rngs=rngs)
        self.norm2 = layer_norm(e, cfg.ln_eps, rngs=rngs)
        self.mlp = Mlp(e, cfg.mlp_hidden, rngs=rngs)
        if cfg.layer_scale:
            self.ls1 = nnx.Param(jnp.ones((e,), jnp.float32))
            self.ls2 = nnx.Param(jnp.ones((e,), jnp.float32))
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.attn(self.norm1(x))
        x = x + (a * self.ls1[...] if self.ls1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.ls2[...] if self.ls2 is not None else m)


class ProViCNet(nnx.Module):
    """Per-sequence ProViCNet (ProViCNet_contrastive): backbone, slice-position tokens, conv head, CL head."""

    def __init__(self, cfg: ProViCNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        e, p = cfg.embed_dim, cfg.patch_size
        init = nnx.initializers.truncated_normal(0.02)
        # The 14x14/14 patch conv as one matmul over (kh, kw, C)-flattened patches (exact, faster).
        self.patch_embed = nnx.Linear(p * p * cfg.in_chans, e, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, e)))
        self.register_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_registers, e)))
        # Table resized once for cfg.img_size, and the source table for any other input size.
        self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + cfg.grid ** 2, e)))
        self.pos_embed_src = nnx.Param(init(rngs.params(), (1, 1 + cfg.pos_src_grid ** 2, e)))
        self.axis_pos = nnx.Linear(1, e, rngs=rngs)
        self.axis_max = nnx.Linear(1, e, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = layer_norm(e, cfg.ln_eps, rngs=rngs)
        self.head = ConvHead8(e, tuple(cfg.head_channels), cfg.num_classes, bn_eps=cfg.bn_eps, rngs=rngs)
        self.cl_head = (ContrastiveHead(e, cfg.cl_hidden, cfg.cl_bottleneck, cfg.cl_out, rngs=rngs)
                        if cfg.cl_out else None)
        # Eval mode (the default; model.train() / model.eval() switch it like BatchNorm's flag).
        self.deterministic = True

    def _pos_table(self, grid: int) -> jax.Array:
        if grid == self.config.grid:
            return self.pos_embed[...]
        return resize_pos_table(self.pos_embed_src[...], self.config.pos_src_grid, grid)

    def _patchify(self, x: jax.Array) -> tuple[jax.Array, int, int]:
        n, h, w, c = x.shape
        p = self.config.patch_size
        gh, gw = h // p, w // p
        x = x[:, : gh * p, : gw * p]  # a VALID strided conv drops the remainder
        x = x.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p * c)
        return self.patch_embed(x), gh, gw

    def tokens(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, int, int]:
        """Final-normed tokens (N, 7 + gh*gw, E) in the order [cls, registers, axis_pos, axis_max, patches]."""
        t, gh, gw = self._input_tokens(x, pos, with_grid=True)
        return self.norm(self._run_blocks(t)), gh, gw

    def _input_tokens(self, x: jax.Array, pos: jax.Array, with_grid: bool = False):
        """The token sequence entering the first block: [cls, registers, axis_pos, axis_max, patches]."""
        n = x.shape[0]
        patches, gh, gw = self._patchify(x)
        if gh != gw:
            raise ValueError(f"ProViCNet needs square inputs (the position table is square); got grid {gh}x{gw}")
        table = self._pos_table(gh).astype(patches.dtype)
        cls = self.cls_token[...] + table[:, :1]
        patches = patches + table[:, 1:]
        pos = pos.astype(patches.dtype)
        e = patches.shape[-1]
        t = jnp.concatenate([
            jnp.broadcast_to(cls, (n, 1, e)),
            jnp.broadcast_to(self.register_tokens[...], (n, self.config.num_registers, e)),
            self.axis_pos(pos[:, 0:1])[:, None],
            self.axis_max(pos[:, 1:2])[:, None],
            patches,
        ], axis=1)
        return (t, gh, gw) if with_grid else t

    def _run_blocks(self, t: jax.Array) -> jax.Array:
        """The transformer blocks, batched or, for inference on one CPU device, one slice at a time.

        Run slice by slice (lax.map), a slice's activations (1031 x 1536 floats at most) stay in
        cache from one op to the next instead of streaming the whole batch through memory for every
        elementwise pass: ~5 % less time for the 12 blocks at batch 8 on 2 cores
        (scripts/bench/bench_provicnet.py). Training keeps the batched form, whose backward is
        faster, and so do multi-device runs, whose batch axis is sharded. Same math either way.
        """
        def run(x):
            for blk in self.blocks:
                x = run_block(blk, x)
            return x

        if self.deterministic and t.shape[0] > 1 and jax.default_backend() == "cpu" and jax.device_count() == 1:
            return jax.lax.map(lambda ti: run(ti[None])[0], t)
        return run(t)

    def features(self, x: jax.Array, pos: jax.Array, *, layers: bool = False) -> dict[str, jax.Array]:
        """Named feature sets for alignment scoring (all after the final LayerNorm).

        ``layers=True`` adds "block0".."block{depth-1}": each block's patch tokens (N, gh*gw, E), raw
        (before the final norm), for per-layer alignment scores; the other outputs are unchanged.
        """
        if layers:
            hidden = self.block_outputs(x, pos)
            t, gh, gw = self.norm(hidden[-1]), *self._grid(x)
        else:
            t, gh, gw = self.tokens(x, pos)
        r = self.config.num_registers
        patch = t[:, self.config.num_prefix:]
        out = {
            "cls": t[:, 0],
            "registers": t[:, 1: 1 + r],
            "axis": t[:, 1 + r: 3 + r],
            "patch": patch,
            "pooled": patch.mean(axis=1),
            "patch_map": patch.reshape(x.shape[0], gh, gw, -1),
        }
        if layers:
            out.update({f"block{i}": h[:, self.config.num_prefix:] for i, h in enumerate(hidden)})
        return out

    def _grid(self, x: jax.Array) -> tuple[int, int]:
        p = self.config.patch_size
        return x.shape[1] // p, x.shape[2] // p

    def block_outputs(self, x: jax.Array, pos: jax.Array) -> list[jax.Array]:
        """Every block's raw output (N, 7 + gh*gw, E), batched (the per-slice CPU path is for inference speed)."""
        t = self._input_tokens(x, pos)
        hidden = []
        for blk in self.blocks:
            t = run_block(blk, t)
            hidden.append(t)
        return hidden

    def patch_tokens(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """(N, gh*gw, E) normed patch tokens, row-major over the patch grid."""
        return self.tokens(x, pos)[0][:, self.config.num_prefix:]

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """(N, H, W, C) slices and (N, 2) positions -> (N, 8*H/14, 8*W/14, K) logits."""
        t, gh, gw = self.tokens(x, pos)
        fmap = t[:, self.config.num_prefix:].reshape(x.shape[0], gh, gw, -1)
        return self.head(fmap)

    def contrastive(self, tokens: jax.Array) -> jax.Array:
        """The contrastive head on (..., E) tokens (the reference's forward_head path)."""
        if self.cl_head is None:
            raise ValueError("this ProViCNet was built without a contrastive head (cl_out=0)")
        return self.cl_head(tokens)


class ProViCNetFusion(nnx.Module):
    """FusionModalities: per-sequence x2 streams, concatenated in (T2, ADC, DWI) order, then x4 to logits."""

    def __init__(self, cfg: ProViCNetFusionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.streams = nnx.Dict({s: ConvBNReLU(cfg.embed_dim, cfg.stream_channels, bn_eps=cfg.bn_eps, rngs=rngs)
                                 for s in cfg.sequences})
        self.fuse = ConvBNReLU(len(cfg.sequences) * cfg.stream_channels, cfg.fusion_channels, bn_eps=cfg.bn_eps,
                               rngs=rngs)
        self.classifier = nnx.Conv(cfg.fusion_channels, cfg.num_classes, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, *tokens: jax.Array) -> jax.Array:
        """Each argument (N, T, E) patch tokens of a square grid, in config.sequences order -> (N, 8g, 8g, K)."""
        if len(tokens) != len(self.config.sequences):
            raise ValueError(
                f"expected {len(self.config.sequences)} token sets {self.config.sequences}, got {len(tokens)}")
        maps = []
        for name, tok in zip(self.config.sequences, tokens):
            n, t, e = tok.shape
            g = math.isqrt(t)
            if g * g != t:
                raise ValueError(f"{name} tokens: {t} is not a square grid")
            maps.append(self.streams[name](tok.reshape(n, g, g, e)))
        x = self.fuse(jnp.concatenate(maps, axis=-1))
        return upsample2_conv3x3(x, self.classifier.kernel[...], self.classifier.bias[...])


def load_stream_heads(fusion: ProViCNetFusion, **per_sequence: ProViCNet) -> ProViCNetFusion:
    """Replicate the reference inference step ``load_partial_weights``.

    Overwrites each fusion stream's conv and BatchNorm with the first conv and BatchNorm of the
    matching per-sequence model's head (``t2w=``, ``adc=``, ``dwi=``), in place.
    """
    for name, model in per_sequence.items():
        if name not in fusion.config.sequences:
            raise ValueError(f"unknown sequence '{name}'; expected one of {fusion.config.sequences}")
        src = model.head.stages[0]
        dst = fusion.streams[name]
        nnx.update(dst, nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat)))
    return fusion


@register("provicnet", ProViCNetConfig)
def build_provicnet(config: ProViCNetConfig, *, rngs: nnx.Rngs) -> ProViCNet:
    return ProViCNet(config, rngs=rngs)


@register("provicnet_fusion", ProViCNetFusionConfig)
def build_provicnet_fusion(config: ProViCNetFusionConfig, *, rngs: nnx.Rngs) -> ProViCNetFusion:
    return ProViCNetFusion(config, rngs=rngs)
