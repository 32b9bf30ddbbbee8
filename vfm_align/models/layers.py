"""The few building blocks shared by several networks, with the reference numerics made explicit.

Flax defaults differ from PyTorch's in ways that silently break parity (tanh GELU, fast
variance, BatchNorm momentum, antialiased resizes); every constructor here takes the
reference value instead of relying on a library default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch's nn.GELU() computes it."""
    return jax.nn.gelu(x, approximate=False)


class RematBlock:
    """Mixin of a backbone block that can be rematerialised: with ``remat`` set (by :func:`set_remat`), a
    call through :func:`run_block` keeps only the block's input for the backward pass and recomputes its
    activations there (``nnx.remat``), trading one more forward of the block for its activation memory."""

    remat: bool = False


def run_block(blk, *args):
    """``blk(*args)``, under ``nnx.remat`` when the block's ``remat`` flag is set."""
    if not getattr(blk, "remat", False):
        return blk(*args)
    # jax.checkpoint of a pure function of the block's state (blocks hold no mutable state in a forward);
    # nnx.remat would write the state back, which fails for a model merged inside the train step's grad.
    gdef, state = nnx.split(blk)
    return jax.checkpoint(lambda st, *a: nnx.merge(gdef, st)(*a))(state, *args)


def set_remat(model: nnx.Module, on: bool = True) -> int:
    """Set ``remat`` on every :class:`RematBlock` inside ``model``; returns how many blocks were set."""
    n = 0
    for _, m in nnx.iter_modules(model):
        if isinstance(m, RematBlock):
            m.remat = on
            n += 1
    return n


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with torch semantics (two-pass variance, explicit eps)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def batch_norm(dim: int, *, eps: float = 1e-5, torch_momentum: float = 0.1, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm with torch semantics: running stats at eval, momentum converted (flax = 1 - torch)."""
    return nnx.BatchNorm(dim, epsilon=eps, momentum=1.0 - torch_momentum, use_running_average=True,
                         use_fast_variance=False, rngs=rngs)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (timm / DINOv2 layout)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with torch's fused qkv layout.

    ``qkv`` is one Dense(dim -> 3*dim) whose output splits as (3, heads, head_dim), exactly the
    row order of torch's ``attn.qkv.weight``; ``proj`` is the output projection.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(n, t, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, H, Dh)
        if jax.default_backend() == "cpu":
            out = blocked_attention(q, k, v)
        else:  # fused kernels (cuDNN flash on GPU) beat anything hand-written there
            out = jax.nn.dot_product_attention(q, k, v)
        return self.proj(out.reshape(n, t, d))


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_block: int = 256) -> jax.Array:
    """Exact softmax attention for XLA:CPU, (N, T, H, Dh) in and out.

    XLA:CPU materialises the whole (N, H, T, T) score tensor and runs softmax as separate passes
    over it (200 MB for ViT-S at 1031 tokens, batch 8). Here a loop runs over (sample, head) and,
    inside, over blocks of ``q_block`` queries, so each score block (q_block x T) stays in cache
    while it is exponentiated, summed and multiplied by V. Same math, no approximation. Measured
    on 2 shared cores at (8, 1031, 6, 64): ~0.27 s vs ~1.5 s (einsum + softmax) and ~2.3 s
    (jax.nn.dot_product_attention); per-(sample, head) without query blocks ~0.45 s, batching
    heads inside the loop was slower. Whole model: scripts/bench/bench_provicnet.py.
    """
    n, t, h, dh = q.shape
    scale = dh ** -0.5

    def heads_first(a):
        return a.transpose(0, 2, 1, 3).reshape(n * h, t, dh)

    def one_head(args):
        qh, kh, vh = args
        kt = kh.T
        outs = []
        for s0 in range(0, t, q_block):
            s = qh[s0: s0 + q_block] @ kt
            e = jnp.exp(s - s.max(axis=-1, keepdims=True))
            outs.append((e @ vh) / e.sum(axis=-1, keepdims=True))
        return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]

    out = jax.lax.map(one_head, (heads_first(q * scale), heads_first(k), heads_first(v)))
    return out.reshape(n, h, t, dh).transpose(0, 2, 1, 3)


class Conv1(nnx.Module):
    """1x1x1 Conv3d with bias, channels-last (UperNet classifiers, FCMAE proj/pred)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (1, 1, 1, cin, cout)) * cin ** -0.5)
        self.bias = nnx.Param(jnp.zeros((cout,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...c,co->...o", x, self.kernel[...][0, 0, 0]) + self.bias[...]
