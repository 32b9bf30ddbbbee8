"""Task losses. Logits and predictions are channels-last; class axis last.

Dice+CE follows MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)`` (smooth 1e-5 in numerator
and denominator, Dice averaged over classes and samples, CE averaged over voxels); the auxiliary
output of a deep-supervised head is weighted 0.4 as in ProFound's segmentation engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUX_WEIGHT = 0.4


def cross_entropy(logits: jax.Array, labels: jax.Array, class_weights=None) -> jax.Array:
    """Mean softmax CE; ``labels`` are integer class ids with the shape of logits[..., 0]."""
    logits = logits.astype(jnp.float32)
    # One-hot form: the gather in optax's integer-label CE transposes to a scatter that XLA:CPU
    # spends seconds constant-folding on dense (voxel-wise) outputs.
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    ce = -(onehot * jax.nn.log_softmax(logits, axis=-1)).sum(-1)
    if class_weights is None:
        return ce.mean()
    w = jnp.asarray(class_weights, jnp.float32)[labels]
    return (ce * w).sum() / jnp.maximum(w.sum(), 1e-12)


def dice_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = False,
              smooth: float = 1e-5) -> jax.Array:
    """1 - soft Dice per (sample, class), mean over both; spatial axes are all but first and last."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if not include_background and logits.shape[-1] > 1:
        # lax.slice, not fancy indexing: the gather's transpose is slow to constant-fold in XLA.
        k = logits.shape[-1]
        probs, onehot = jax.lax.slice_in_dim(probs, 1, k, axis=-1), jax.lax.slice_in_dim(onehot, 1, k, axis=-1)
    axes = tuple(range(1, logits.ndim - 1))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def dice_ce(logits: jax.Array, labels: jax.Array, *, aux_logits: jax.Array | None = None,
            aux_weight: float = AUX_WEIGHT) -> jax.Array:
    """Dice + CE on the main output, plus ``aux_weight`` x the same on the auxiliary output."""
    loss = dice_loss(logits, labels) + cross_entropy(logits, labels)
    if aux_logits is not None:
        loss = loss + aux_weight * (dice_loss(aux_logits, labels) + cross_entropy(aux_logits, labels))
    return loss


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean()


def l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean()


LOSSES = {"ce": cross_entropy, "dice_ce": dice_ce, "l1": l1, "l2": l2}
