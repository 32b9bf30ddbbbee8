"""ProFound's 3D MAE-ViT: a ViT encoder over non-overlapping 3D patches plus the MAE decoder and loss.

Inputs are channels-last volumes (N, D, H, W, C). Tokens follow the flattened (d, h, w) patch grid,
row-major; a patch's pixels are ordered (pd, ph, pw, C) with C last, the order of the
reconstruction target. The positional tables are weights loaded from the checkpoint: the reference
sin-cos table scrambles the d and h axes, so regenerating a "correct" one would break parity. A model
trained from scratch here gets its tables from :meth:`MaeViT3d.set_sincos_pos_embed` instead.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfm_align.errors import ConfigError, DataError
from vfm_align.models.layers import Attention, Mlp, RematBlock, layer_norm, run_block
from vfm_align.models.registry import register

ARCH = "profound_mae_vit"


@dataclasses.dataclass(frozen=True)
class MaeViT3dConfig:
    """Sizes of the MAE-ViT; defaults are the released ``mae_vit_base_patch16`` factory."""

    patch_size: tuple[int, int, int] = (16, 32, 32)
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    decoder_embed_dim: int = 384
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_dim: int = 1536
    num_patches: int = 256  # length of the positional tables minus the class row
    img_size: tuple[int, int, int] | None = (64, 256, 256)  # None: any input whose grid has num_patches tokens
    norm_pix_loss: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        if len(self.patch_size) != 3:
            raise ConfigError(f"patch_size must have 3 entries (pd, ph, pw), got {self.patch_size}")
        for name, dim, heads in (("", self.embed_dim, self.num_heads),
                                 ("decoder_", self.decoder_embed_dim, self.decoder_num_heads)):
            if heads <= 0 or dim % heads:
                raise ConfigError(f"{name}embed_dim {dim} is not divisible by {name}num_heads {heads}")
        if self.img_size is not None:
            grid = self.grid_for(self.img_size)
            if math.prod(grid) != self.num_patches:
                raise ConfigError(f"img_size {tuple(self.img_size)} with patch {tuple(self.patch_size)} gives a "
                                  f"{grid} grid ({math.prod(grid)} tokens) but the positional tables hold "
                                  f"{self.num_patches}")

    @classmethod
    def large(cls, **kw) -> MaeViT3dConfig:
        """The reference ``mae_vit_large_patch16`` factory: 1024 wide, 24 blocks, 16 heads, same decoder."""
        return cls(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_dim": 4096, **kw})

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch_size) * self.in_chans

    def grid_for(self, spatial: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (gd, gh, gw) of a (D, H, W) volume; raises DataError unless it tiles exactly."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != 3 or any(s % p for s, p in zip(spatial, self.patch_size)):
            raise DataError(f"volume (D,H,W)={spatial} is not a whole number of {tuple(self.patch_size)} patches")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))


def patchify(x: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """(N, D, H, W, C) -> (N, T, pd*ph*pw*C): tokens row-major over (d, h, w), pixels (pd, ph, pw, C)."""
    n, d, h, w, c = x.shape
    pd, ph, pw = patch_size
    x = x.reshape(n, d // pd, pd, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify(p: jax.Array, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> jax.Array:
    """Inverse of :func:`patchify`: (N, T, pd*ph*pw*C) -> (N, D, H, W, C)."""
    n = p.shape[0]
    gd, gh, gw = grid
    pd, ph, pw = patch_size
    c = p.shape[-1] // (pd * ph * pw)
    x = p.reshape(n, gd, gh, gw, pd, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, gd * pd, gh * ph, gw * pw, c)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_table_3d(dim: int, grid: tuple[int, int, int]) -> np.ndarray:
    """(1, 1 + gd*gh*gw, dim) fixed table for a freshly initialised MAE (zero class row).

    Row-major over (d, h, w) with a third of the width per axis; used only for models trained
    from scratch here (converted checkpoints bring their own table).
    """
    if dim % 6:
        raise ConfigError(f"MAE embed width {dim} must be divisible by 6 for a 3-D sin-cos table")
    d, h, w = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 3, a) for a in (d, h, w)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)[None].astype(np.float32)


class FixedPosEmbed(nnx.Param):
    """A positional table saved and loaded with the weights but not meant to be trained.

    It subclasses Param so checkpoints carry it; optimisers can leave it out with
    ``nnx.All(nnx.Param, nnx.Not(FixedPosEmbed))``.
    """


class Block(RematBlock, nnx.Module):
    """timm pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, eps, rngs=rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=True, rngs=rngs)
        self.norm2 = layer_norm(dim, eps, rngs=rngs)
        self.mlp = Mlp(dim, mlp_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaeViT3d(nnx.Module):
    """Encoder (patch embed, cls token, blocks, norm) and MAE decoder with reconstruction loss."""

    def __init__(self, config: MaeViT3dConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        t = c.num_patches
        # The patch embedding is a stride=kernel conv, i.e. one matmul over patchified pixels.
        self.patch_embed = nnx.Linear(c.patch_dim, c.embed_dim, rngs=rngs)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, c.embed_dim)))
        self.pos_embed = FixedPosEmbed(jnp.zeros((1, t + 1, c.embed_dim)))
        self.blocks = nnx.List([Block(c.embed_dim, c.num_heads, c.mlp_dim, c.norm_eps, rngs=rngs)
                                for _ in range(c.depth)])
        self.norm = layer_norm(c.embed_dim, c.norm_eps, rngs=rngs)
        self.decoder_embed = nnx.Linear(c.embed_dim, c.decoder_embed_dim, rngs=rngs)
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, c.decoder_embed_dim)))
        self.decoder_pos_embed = FixedPosEmbed(jnp.zeros((1, t + 1, c.decoder_embed_dim)))
        self.decoder_blocks = nnx.List([
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.decoder_mlp_dim, c.norm_eps, rngs=rngs)
            for _ in range(c.decoder_depth)])
        self.decoder_norm = layer_norm(c.decoder_embed_dim, c.norm_eps, rngs=rngs)
        self.decoder_pred = nnx.Linear(c.decoder_embed_dim, c.patch_dim, rngs=rngs)

    def set_sincos_pos_embed(self) -> None:
        """Fill both positional tables with :func:`sincos_table_3d` over the grid of ``config.img_size`` (the
        start of a model trained from scratch; built models hold zeros until weights are loaded)."""
        c = self.config
        if c.img_size is None:
            raise ConfigError("a sin-cos positional table needs config.img_size (the grid it covers)")
        grid = c.grid_for(c.img_size)
        self.pos_embed.set_value(jnp.asarray(sincos_table_3d(c.embed_dim, grid)))
        self.decoder_pos_embed.set_value(jnp.asarray(sincos_table_3d(c.decoder_embed_dim, grid)))

    # -- shapes -------------------------------------------------------------------------------
    def _check_input(self, x: jax.Array) -> tuple[int, int, int]:
        c = self.config
        if x.ndim != 5 or x.shape[-1] != c.in_chans:
            raise DataError(
                f"MAE-ViT expects (N, D, H, W, {c.in_chans}) channels-last input, got shape {tuple(x.shape)}")
        if c.img_size is not None and tuple(x.shape[1:4]) != tuple(c.img_size):
            raise DataError(f"MAE-ViT was built for volumes (D,H,W)={tuple(c.img_size)}; got {tuple(x.shape[1:4])} "
                            "(its positional table is tied to that grid)")
        grid = c.grid_for(x.shape[1:4])
        if math.prod(grid) != c.num_patches:
            raise DataError(f"volume (D,H,W)={tuple(x.shape[1:4])} gives a {grid} grid = {math.prod(grid)} tokens; "
                            f"the positional table holds {c.num_patches}")
        return grid

    # -- encoder ------------------------------------------------------------------------------
    def _embed(self, x: jax.Array) -> jax.Array:
        self._check_input(x)
        return self.embed_patches(x) + self.pos_embed.get_value()[:, 1:]

    def embed_patches(self, x: jax.Array) -> jax.Array:
        """``patch_embed(patchify(x))`` as one stride = kernel convolution, (N, D, H, W, C) -> (N, T, E).

        Same weights and result; the convolution reads the volume in place instead of first
        writing the (N, T, pd*ph*pw*C) patch matrix (a 50 MB transpose at batch 4), which
        measured ~25% faster for this layer on the CPU.
        """
        c = self.config
        kernel = self.patch_embed.kernel.get_value().reshape(*c.patch_size, c.in_chans, c.embed_dim)
        y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), c.patch_size, "VALID",
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y.reshape(x.shape[0], -1, c.embed_dim) + self.patch_embed.bias.get_value().astype(x.dtype)

    def _encode_tokens(self, tokens: jax.Array, hidden: list | None = None) -> jax.Array:
        cls = self.cls_token.get_value() + self.pos_embed.get_value()[:, :1]
        cls = jnp.broadcast_to(cls, (tokens.shape[0], 1, cls.shape[-1])).astype(tokens.dtype)
        x = jnp.concatenate([cls, tokens], axis=1)
        for blk in self.blocks:
            x = run_block(blk, x)
            if hidden is not None:
                hidden.append(x)
        return self.norm(x)

    def encode(self, x: jax.Array) -> jax.Array:
        """Unmasked encoder: (N, D, H, W, C) -> (N, 1 + T, E) after the final norm; token 0 is cls."""
        return self._encode_tokens(self._embed(x))

    def features(self, x: jax.Array, *, layers: bool = False) -> dict[str, jax.Array]:
        """cls (N, E), patch tokens (N, T, E) and their mean ``pooled`` (N, E), all after the final norm.

        ``layers=True`` adds "layers" (N, depth, 1 + T, E): every block's raw output (before the
        final norm), and the same per block as "block0".."block{depth-1}": its patch tokens (N, T, E),
        for per-layer alignment scores.
        """
        hidden = [] if layers else None
        z = self._encode_tokens(self._embed(x), hidden)
        patch = z[:, 1:]
        out = {"cls": z[:, 0], "patch": patch, "pooled": patch.mean(axis=1)}
        if layers:
            out["layers"] = jnp.stack(hidden, axis=1)
            out.update({f"block{i}": h[:, 1:] for i, h in enumerate(hidden)})
        return out

    # -- MAE ----------------------------------------------------------------------------------
    def forward_encoder(self, x: jax.Array, noise: jax.Array, mask_ratio: float):
        """Masked encoder. Returns latent (N, 1+K, E), mask (N, T) with 1 = removed, ids_restore (N, T)."""
        tokens = self._embed(x)
        n, t, _ = tokens.shape
        if noise.shape != (n, t):
            raise DataError(f"noise must have shape {(n, t)} (batch, tokens), got {tuple(noise.shape)}")
        keep = int(t * (1 - mask_ratio))
        ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: small noise is kept
        ids_restore = jnp.argsort(ids_shuffle, axis=1)
        kept = jnp.take_along_axis(tokens, ids_shuffle[:, :keep, None], axis=1)
        mask = (ids_restore >= keep).astype(tokens.dtype)
        return self._encode_tokens(kept), mask, ids_restore

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """Decoder: latent (N, 1+K, E) -> per-patch prediction (N, T, pd*ph*pw*C), cls dropped."""
        x = self.decoder_embed(latent)
        n, _, e = x.shape
        t = ids_restore.shape[1]
        fill = jnp.broadcast_to(self.mask_token.get_value().astype(x.dtype), (n, t + 1 - x.shape[1], e))
        seq = jnp.take_along_axis(jnp.concatenate([x[:, 1:], fill], axis=1), ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], seq], axis=1) + self.decoder_pos_embed.get_value()
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, x: jax.Array, pred: jax.Array, mask: jax.Array, norm_pix_loss: bool | None = None) -> jax.Array:
        """Per-patch MSE averaged over removed patches; norm_pix_loss uses the unbiased per-patch variance."""
        norm_pix = self.config.norm_pix_loss if norm_pix_loss is None else norm_pix_loss
        target = patchify(x, self.config.patch_size)
        if norm_pix:
            mean = target.mean(axis=-1, keepdims=True)
            var = target.var(axis=-1, keepdims=True, ddof=1)
            target = (target - mean) / jnp.sqrt(var + 1e-6)
        per_patch = ((pred - target) ** 2).mean(axis=-1)
        return (per_patch * mask).sum() / mask.sum()

    def __call__(self, x: jax.Array, *, mask_ratio: float = 0.75, noise: jax.Array | None = None,
                 rng: jax.Array | None = None):
        """MAE forward: returns (loss, pred (N, T, pd*ph*pw*C), mask (N, T)).

        The masking noise is ``noise`` if given, else uniform noise drawn from the PRNG key ``rng``.
        ``mask_ratio`` is a Python float (it fixes the number of kept tokens, a static shape).
        """
        if noise is None:
            if rng is None:
                raise ConfigError("MAE forward needs either noise= (N, T) or rng= (a PRNG key) for the masking")
            noise = jax.random.uniform(rng, (x.shape[0], self.config.num_patches), dtype=jnp.float32)
        latent, mask, ids_restore = self.forward_encoder(x, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(x, pred, mask), pred, mask


@register(ARCH, MaeViT3dConfig)
def build(config: MaeViT3dConfig, *, rngs: nnx.Rngs) -> MaeViT3d:
    return MaeViT3d(config, rngs=rngs)
