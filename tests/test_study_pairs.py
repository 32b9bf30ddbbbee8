"""Contrastive pair generator: a hand-worked label map, a plain-numpy loop reference, and the losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfm_align.study.pairs import info_nce, pair_loss, sample_pairs


def _np_candidates(cancer, block=8, hi=62, lo=2):
    """Loop reference written from the rule in words (not from the jitted code)."""
    n, h, w = cancer.shape
    gh, gw = h // block, w // block
    counts = np.zeros((n, gh, gw), int)
    for s in range(n):
        for y in range(gh):
            for x in range(gw):
                counts[s, y, x] = cancer[s, y * block:(y + 1) * block, x * block:(x + 1) * block].sum()
    inside = lambda y, x: 0 <= y < gh and 0 <= x < gw  # noqa: E731
    pos, neg = set(), set()
    for s in range(n):
        for y in range(gh):
            for x in range(gw):
                if counts[s, y, x] < hi:
                    continue
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if dy == dx == 0 or not inside(y + dy, x + dx):
                            continue
                        c = counts[s, y + dy, x + dx]
                        a = (s * gh + y) * gw + x
                        if c >= hi:
                            pos.add((a, (s * gh + y + dy) * gw + x + dx))
                        if c <= lo and inside(y + 2 * dy, x + 2 * dx) and counts[s, y + 2 * dy, x + 2 * dx] <= lo:
                            neg.add((a, (s * gh + y + 2 * dy) * gw + x + 2 * dx))
    return pos, neg


def _sampled(p):
    pos = {(int(a), int(o)) for a, o, v in zip(p.pos_anchor, p.pos_other, p.pos_valid) if v}
    neg = {(int(a), int(o)) for a, o, v in zip(p.neg_anchor, p.neg_other, p.neg_valid) if v}
    return pos, neg


def test_hand_worked_label_map():
    # 4x4 grid of 8x8 blocks; blocks (1,1) and (1,2) fully cancer, (3,3) holds 3 pixels (too many for a negative).
    lab = np.zeros((1, 32, 32), np.int32)
    lab[0, 8:16, 8:24] = 1
    lab[0, 24, 24:27] = 1
    cell = lambda y, x: y * 4 + x  # noqa: E731
    # Anchor (1,1): the only >=62 neighbour is (1,2); of its <=2 neighbours only the downward ones have an
    # in-grid cell two steps away: (3,1) (clean) and (3,3) (3 pixels: rejected).
    # Anchor (1,2): positive (1,1); distant negatives (3,0) and (3,2); (3,4) is off the grid.
    want_pos = {(cell(1, 1), cell(1, 2)), (cell(1, 2), cell(1, 1))}
    want_neg = {(cell(1, 1), cell(3, 1)), (cell(1, 2), cell(3, 0)), (cell(1, 2), cell(3, 2))}
    assert _np_candidates(lab) == (want_pos, want_neg)
    p = jax.jit(sample_pairs)(jnp.asarray(lab), jax.random.key(0))
    pos, neg = _sampled(p)
    assert pos == want_pos  # k = min(2, 3, 30) = 2: both positives, two of the three negatives
    assert len(neg) == 2 and neg <= want_neg


def test_threshold_edges():
    lab = np.zeros((1, 32, 32), np.int32)
    lab[0, 8:16, 8:16] = 1
    lab[0, 8:16, 16:24] = 1
    lab[0, 8, 16:18] = 0  # 62 pixels: still an anchor and a positive partner
    p = sample_pairs(jnp.asarray(lab), jax.random.key(1))
    assert len(_sampled(p)[0]) == 2
    lab[0, 8, 18] = 0  # 61 pixels: no longer, so the left block has no positive and k = 0
    p = sample_pairs(jnp.asarray(lab), jax.random.key(1))
    assert _sampled(p) == (set(), set())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    n, g = 3, 8
    # Random blocky maps: each block cancer-full, nearly full, sparse or empty, so every rule is exercised.
    kinds = rng.choice(4, size=(n, g, g), p=[0.45, 0.3, 0.1, 0.15])
    lab = np.zeros((n, g * 8, g * 8), np.int32)
    for s in range(n):
        for y in range(g):
            for x in range(g):
                blk = np.zeros(64, np.int32)
                blk[: {0: 0, 1: 64, 2: 62, 3: int(rng.integers(1, 5))}[kinds[s, y, x]]] = 1
                lab[s, y * 8:(y + 1) * 8, x * 8:(x + 1) * 8] = rng.permutation(blk).reshape(8, 8)
    want_pos, want_neg = _np_candidates(lab)
    max_pair = 30
    p = jax.jit(sample_pairs, static_argnames=("max_pair",))(jnp.asarray(lab), jax.random.key(seed), max_pair=max_pair)
    pos, neg = _sampled(p)
    k = min(len(want_pos), len(want_neg), max_pair)
    assert k > 0
    assert len(pos) == len(neg) == k
    assert pos <= want_pos and neg <= want_neg
    # Pairs never leave their slice.
    for a, o in pos | neg:
        assert a // (g * g) == o // (g * g)


def test_pair_loss_values():
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    from vfm_align.study.pairs import Pairs

    pairs = Pairs(jnp.array([0, 0]), jnp.array([1, 3]), jnp.array([True, False]),
                  jnp.array([0, 1]), jnp.array([1, 2]), jnp.array([True, True]))
    # positive (0,1): 1 - 0.6; negatives (0,1): relu(0.6-0.5)=0.1, (1,2): relu(0.8-0.5)=0.3; mean over 3 pairs.
    want = (0.4 + 0.1 + 0.3) / 3
    assert abs(float(pair_loss(jnp.asarray(emb), pairs)) - want) < 1e-6


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = an @ bn.T / 0.1
    lse_r = np.log(np.exp(s).sum(1))
    lse_c = np.log(np.exp(s).sum(0))
    want = -((np.diag(s) - lse_r).mean() + (np.diag(s) - lse_c).mean()) / 2
    got = float(info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert abs(got - want) < 1e-4
    assert float(info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(a, jnp.float32))) < got
