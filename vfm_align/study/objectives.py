"""Pretraining objectives, each a jittable ``loss(model, batch, rng) -> (loss, metrics)``.

* ``mae``: ProFound's masked reconstruction on the MAE-ViT (random masking at ``mask_ratio``,
  per-patch normalised MSE on the removed patches; the model's own loss).
* ``fcmae``: ProFound's masked reconstruction on the ConvNeXt-V2 (backbone ``profound_conv``): a
  random mask over the 16^3 patch grid drawn from the step's rng by
  :func:`vfm_align.models.fcmae.random_mask` (each sample keeps exactly int(L * (1 - mask_ratio))
  patches, as the reference), then the FCMAE's own loss: MSE to per-patch normalised targets
  (mean, unbiased variance) averaged over the removed patches only. ProFound uses mask_ratio 0.6.
* ``contrastive``: ProViCNet's patch-level pair loss on the contrastive head's outputs, with pairs
  drawn from cancer label blocks aligned with the token grid (:mod:`vfm_align.study.pairs`), plus
  an optional InfoNCE term between the same patches seen in two augmented views.
"""

from __future__ import annotations

import jax

from vfm_align.errors import ConfigError
from vfm_align.models.fcmae import random_mask
from vfm_align.models.task_model import volume_to_slices
from vfm_align.study.pairs import info_nce, pair_loss, sample_pairs

OBJECTIVES = ("mae", "contrastive", "fcmae")
# The backbone each objective trains (it calls that backbone's pretraining model).
OBJECTIVE_BACKBONES = {"mae": "profound_mae", "contrastive": "provicnet", "fcmae": "profound_conv"}


def mae_loss(cfg):
    def loss(model, batch, rng):
        value, _, mask = model(batch["image"], mask_ratio=float(cfg.mask_ratio), rng=rng)
        return value, {"masked_fraction": mask.mean()}

    return loss


def fcmae_grid(model, image_shape) -> tuple[int, int, int]:
    """The FCMAE mask grid (gd, gh, gw) for an (N, D, H, W, C) input."""
    return tuple(s // p for s, p in zip(image_shape[1:4], model.config.patch_size))


def fcmae_loss(cfg):
    ratio = float(cfg.mask_ratio)

    def loss(model, batch, rng):
        x = batch["image"]
        grid = fcmae_grid(model, x.shape)
        length = grid[0] * grid[1] * grid[2]
        keep = int(length * (1 - ratio))
        if not 0 < keep < length:  # static shapes: raised once, at trace time
            raise ConfigError(f"FCMAE mask_ratio {ratio} keeps {keep} of the {length} patches of grid {grid}; "
                              "at least one must be kept and one removed")
        mask = random_mask(rng, x.shape[0], grid, ratio)
        value, _, flat = model(x, mask)
        return value, {"masked_fraction": flat.mean()}

    return loss


def _augment(rng, s):
    """Photometric view of (N, H, W, C) slices: random gain/offset per slice plus Gaussian noise."""
    kg, ko, kn = jax.random.split(rng, 3)
    n = s.shape[0]
    gain = jax.random.uniform(kg, (n, 1, 1, 1), minval=0.8, maxval=1.2)
    off = jax.random.normal(ko, (n, 1, 1, 1)) * 0.1
    return s * gain + off + 0.1 * jax.random.normal(kn, s.shape)


def contrastive_loss(cfg):
    window = int(cfg.slice_window)

    def loss(model, batch, rng):
        kp, k1, k2, ks = jax.random.split(rng, 4)
        slices, pos = volume_to_slices(batch["image"], int(cfg.slice_channel), window, None)
        n, d = batch["cancer"].shape[:2]
        cancer = batch["cancer"].reshape(n * d, *batch["cancer"].shape[2:])
        tok = model.patch_tokens(_augment(k1, slices), pos)  # (N*D, T, E)
        emb = model.contrastive(tok.reshape(-1, tok.shape[-1]))
        pairs = sample_pairs(cancer, kp, block=int(cfg.pair_block), hi=int(cfg.pair_hi), lo=int(cfg.pair_lo),
                             max_pair=int(cfg.max_pair))
        lp = pair_loss(emb, pairs, margin=float(cfg.margin))
        total = float(cfg.pair_weight) * lp
        metrics = {"pair_loss": lp, "num_pairs": pairs.pos_valid.sum() + pairs.neg_valid.sum()}
        if float(cfg.infonce_weight) > 0:
            tok2 = model.patch_tokens(_augment(k2, slices), pos)
            flat1, flat2 = tok.reshape(-1, tok.shape[-1]), tok2.reshape(-1, tok2.shape[-1])
            idx = jax.random.choice(ks, flat1.shape[0], (int(cfg.infonce_samples),), replace=False)
            h = model.cl_head

            def project(t):
                return h.fc3(jax.nn.gelu(h.fc2(jax.nn.gelu(h.fc1(t), approximate=False)), approximate=False))

            a, b = project(flat1[idx]), project(flat2[idx])
            ln = info_nce(a, b, temperature=float(cfg.temperature))
            total = total + float(cfg.infonce_weight) * ln
            metrics["infonce"] = ln
        return total, metrics

    return loss


def make_objective(name: str, cfg):
    if name == "mae":
        return mae_loss(cfg)
    if name == "contrastive":
        return contrastive_loss(cfg)
    if name == "fcmae":
        return fcmae_loss(cfg)
    raise ConfigError(f"unknown pretraining objective '{name}'; known: {list(OBJECTIVES)}")
