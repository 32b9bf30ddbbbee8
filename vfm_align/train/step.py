"""Jitted train and eval steps (functional NNX: merge inside, split out, no Python objects carried).

The train step is ``jax.jit`` with explicit in/out shardings and the state donated; the per-step
rng is ``fold_in(seed, step)`` with the step read from the state, so a resumed run replays the
same randomness (random left-right flips here).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vfm_align.train import losses as L
from vfm_align.train.mesh import batch_sharding


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def task_loss(kind: str, loss_name: str) -> Callable:
    """loss(out, aux, batch) for a task kind ('label', 'dense', 'restore')."""
    if loss_name not in L.LOSSES:
        raise ValueError(f"unknown loss '{loss_name}'; known: {sorted(L.LOSSES)}")
    if loss_name == "dice_ce":
        return lambda out, aux, b: L.dice_ce(out, b["target"], aux_logits=aux)
    fn = L.LOSSES[loss_name]
    return lambda out, aux, b: fn(out, b["target"])


def _augment(rng, batch, kind: str):
    """Random flip along W (ProFound's RandFlipd on the left-right axis), p = 0.5 per sample."""
    img = batch["image"]
    flip = jax.random.bernoulli(rng, 0.5, (img.shape[0],))
    sel = lambda a: jnp.where(flip.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.flip(a, axis=3), a)
    out = dict(batch, image=sel(img))
    if kind != "label":
        out["target"] = sel(batch["target"])
    return out


def make_train_step(gdef, loss_fn: Callable, tx, *, kind: str, seed: int, augment: bool = True,
                    compute_dtype=jnp.float32):
    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        if augment:
            batch = _augment(rng, batch, kind)

        def f(params):
            model = nnx.merge(gdef, _cast(params, compute_dtype), state["rest"])
            out, aux = model(batch["image"].astype(compute_dtype))
            loss = loss_fn(out, aux, batch)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        rest = jax.tree.map(lambda new, old: new.astype(old.dtype), rest, state["rest"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def jit_train_step(step, shardings, mesh):
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=0)


def make_eval_step(gdef_eval, shardings, mesh, compute_dtype=jnp.float32):
    """Predictions of the eval-mode model (no donation; outputs stay batch-sharded)."""

    def run(state, image):
        model = nnx.merge(gdef_eval, _cast(state["params"], compute_dtype), state["rest"])
        out, _ = model(image.astype(compute_dtype))
        return out.astype(jnp.float32)

    bs = batch_sharding(mesh)
    return jax.jit(run, in_shardings=(shardings, bs), out_shardings=bs)


def make_feature_step(gdef_eval, shardings, mesh, sites):
    """Backbone features at ``sites``, each flattened to (samples, width) for alignment scoring."""

    def run(state, image):
        model = nnx.merge(gdef_eval, state["params"], state["rest"])
        feats = model.features(image)
        return {s: feats[s].reshape(-1, feats[s].shape[-1]).astype(jnp.float32) for s in sites}

    return jax.jit(run, in_shardings=(shardings, batch_sharding(mesh)))
