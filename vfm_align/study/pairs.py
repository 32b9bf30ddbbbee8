"""Patch-level contrastive pairs as ProViCNet draws them, in a fixed-size, jittable form.

The cancer label of each slice is cut into b x b blocks aligned with the token grid (b = 8 for
ProViCNet: a 32x32 token grid over 256x256 labels). A block is an *anchor* when it holds at least
``hi`` cancer pixels (62 of 64). Each anchor pairs with

* every 8-neighbour that is also >= ``hi`` (positive pair), and
* for every 8-neighbour with <= ``lo`` pixels (2 of 64), the block two steps away in that
  direction when it too has <= ``lo`` (distant negative pair),

always within one slice. Neighbours outside the grid are skipped (the reference's slicing at the
border is not well defined there). Positives and negatives are balanced by undersampling to
k = min(#pos, #neg, max_pair) each. Because k is data-dependent, the result has a fixed size of
``max_pair`` slots per kind plus a validity mask, so the whole thing runs under ``jax.jit``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# The 8 neighbour offsets (dy, dx) in row-major order of the 3x3 window, centre excluded.
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class Pairs(NamedTuple):
    """``max_pair`` slots per kind; indices are flat into (N, gh, gw); ``*_valid`` marks used slots."""

    pos_anchor: jax.Array
    pos_other: jax.Array
    pos_valid: jax.Array
    neg_anchor: jax.Array
    neg_other: jax.Array
    neg_valid: jax.Array


def block_counts(cancer: jax.Array, block: int) -> jax.Array:
    """(N, H, W) 0/1 cancer mask -> (N, H/b, W/b) cancer pixels per b x b block."""
    n, h, w = cancer.shape
    c = cancer.astype(jnp.int32).reshape(n, h // block, block, w // block, block)
    return c.sum(axis=(2, 4))


def _shift(a: jax.Array, dy: int, dx: int, fill) -> jax.Array:
    """out[:, y, x] = a[:, y + dy, x + dx], ``fill`` outside the grid."""
    n, gh, gw = a.shape
    p = 2  # offsets never exceed two steps
    padded = jnp.pad(a, ((0, 0), (p, p), (p, p)), constant_values=fill)
    return padded[:, p + dy: p + dy + gh, p + dx: p + dx + gw]


def candidate_pairs(counts: jax.Array, hi: int, lo: int):
    """All candidate pairs before balancing.

    Returns (pos, neg): boolean masks of shape (N, gh, gw, 8), one per anchor cell and direction,
    with OFFSETS[k] giving the positive partner (one step) or the negative partner (two steps).
    """
    anchor = counts >= hi
    big = jnp.iinfo(jnp.int32).max
    pos, neg = [], []
    for dy, dx in OFFSETS:
        near = _shift(counts, dy, dx, -1)  # -1: off-grid is neither >= hi nor a valid <= lo cell
        far = _shift(counts, 2 * dy, 2 * dx, big)
        pos.append(anchor & (near >= hi))
        neg.append(anchor & (near >= 0) & (near <= lo) & (far <= lo))
    return jnp.stack(pos, -1), jnp.stack(neg, -1)


def _pick(mask: jax.Array, k: jax.Array, max_pair: int, key: jax.Array):
    """Choose k of the True entries of ``mask`` uniformly at random, in ``max_pair`` fixed slots."""
    flat = mask.reshape(-1)
    scores = jnp.where(flat, jax.random.uniform(key, flat.shape), -1.0)
    _, idx = jax.lax.top_k(scores, max_pair)
    valid = jnp.arange(max_pair) < k
    return idx, valid


def sample_pairs(cancer: jax.Array, key: jax.Array, *, block: int = 8, hi: int = 62, lo: int = 2,
                 max_pair: int = 30) -> Pairs:
    """Balanced positive/negative block pairs from a (N, H, W) cancer mask (H, W multiples of ``block``)."""
    counts = block_counts(cancer, block)
    n, gh, gw = counts.shape
    pos, neg = candidate_pairs(counts, hi, lo)
    k = jnp.minimum(jnp.minimum(pos.sum(), neg.sum()), max_pair)
    kp, kn = jax.random.split(key)
    p_idx, p_valid = _pick(pos, k, max_pair, kp)
    n_idx, n_valid = _pick(neg, k, max_pair, kn)
    offsets = jnp.asarray(OFFSETS, jnp.int32)

    def resolve(idx, steps):
        cell, direction = idx // 8, idx % 8
        s, rem = cell // (gh * gw), cell % (gh * gw)
        y, x = rem // gw, rem % gw
        oy = jnp.clip(y + steps * offsets[direction, 0], 0, gh - 1)
        ox = jnp.clip(x + steps * offsets[direction, 1], 0, gw - 1)
        return cell, s * gh * gw + oy * gw + ox

    pa, po = resolve(p_idx, 1)
    na, no = resolve(n_idx, 2)
    return Pairs(pa, po, p_valid, na, no, n_valid)


def pair_loss(emb: jax.Array, pairs: Pairs, *, margin: float = 0.5) -> jax.Array:
    """ProViCNet's pair loss on (N*gh*gw, F) token embeddings: positives 1 - cos, negatives relu(cos - margin).

    Mean over the 2k used pairs; 0 when the batch holds no usable pair.
    """
    e = emb.astype(jnp.float32)
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-8)
    cos_p = (e[pairs.pos_anchor] * e[pairs.pos_other]).sum(-1)
    cos_n = (e[pairs.neg_anchor] * e[pairs.neg_other]).sum(-1)
    total = (jnp.where(pairs.pos_valid, 1.0 - cos_p, 0.0).sum()
             + jnp.where(pairs.neg_valid, jax.nn.relu(cos_n - margin), 0.0).sum())
    count = pairs.pos_valid.sum() + pairs.neg_valid.sum()
    return total / jnp.maximum(count, 1)


def info_nce(a: jax.Array, b: jax.Array, *, temperature: float = 0.1) -> jax.Array:
    """Symmetric InfoNCE between matched rows of (M, F) embeddings (e.g. the same patch in two views)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    logits = a @ b.T / temperature
    labels = jnp.arange(a.shape[0])
    lab = jax.nn.log_softmax(logits, axis=1)[labels, labels]
    lba = jax.nn.log_softmax(logits, axis=0)[labels, labels]
    return -(lab.mean() + lba.mean()) / 2
