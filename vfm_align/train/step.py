"""Jitted train and eval steps (functional NNX: merge inside, split out, no Python objects carried).

The step is one function for every way the project trains: it takes an *objective*
``objective(model, batch, rng) -> (loss, metrics)`` (a task loss, see :func:`task_objective`, or a
pretraining objective of ``vfm_align.study.objectives``). The per-step rng is ``fold_in(seed, step)``
with the step read from the state, so a resumed run replays the same randomness.

The train step is ``jax.jit`` with explicit in/out shardings and the state donated. Several runs
of one shape train as one compiled program (:func:`make_stacked_step`): their states are stacked
on a leading axis and the step is ``jax.vmap``-ed over it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vfm_align.models.task_model import is_layer_site
from vfm_align.train import losses as L
from vfm_align.train.mesh import BATCH_AXES, batch_sharding


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

    def sel(a):
        return jnp.where(flip.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.flip(a, axis=3), a)

    out = dict(batch, image=sel(img))
    if kind != "label":
        out["target"] = sel(batch["target"])
    return out


def task_objective(kind: str, loss_name: str, *, augment: bool = True, compute_dtype=jnp.float32) -> Callable:
    """The fine-tuning objective: (optionally flipped) batch through the TaskModel, then the task loss."""
    loss_fn = task_loss(kind, loss_name)

    def objective(model, batch, rng):
        if augment:
            batch = _augment(rng, batch, kind)
        out, aux = model(batch["image"].astype(compute_dtype))
        return loss_fn(out, aux, batch), {}

    return objective


def _step(gdef, objective: Callable, tx, compute_dtype):
    """step(state, batch, seed) -> (state, metrics): one optimizer update of ``objective``."""

    def step(state, batch, seed):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])

        def f(params):
            model = nnx.merge(gdef, _cast(params, compute_dtype), state["rest"])
            loss, metrics = objective(model, batch, rng)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (metrics, rest)), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        rest = jax.tree.map(lambda new, old: new.astype(old.dtype), rest, state["rest"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return step


def make_train_step(gdef, objective: Callable, tx, *, seed: int, compute_dtype=jnp.float32):
    """step(state, batch) -> (state, {"loss", "grad_norm", **objective metrics}) of one run."""
    step = _step(gdef, objective, tx, compute_dtype)
    return lambda state, batch: step(state, batch, seed)


_CONV = jax.lax.conv_general_dilated_p
_CONV_LOCK = threading.RLock()


@contextlib.contextmanager
def _per_run_convs():
    """While tracing a stacked function: a convolution whose input and kernel both carry the run axis becomes
    R plain convolutions, one per run, instead of JAX's default, one grouped convolution with R groups.

    XLA:CPU runs grouped 3-D convolutions (and their kernel gradients) several times slower than the same
    work as separate convolutions, which made stacked conv models slower than solo runs. The result is the
    same computation, run by run. Uses JAX's batching-rule table, the one extension point for this.
    """
    from jax._src.interpreters import batching

    table = batching.fancy_primitive_batchers
    default = table[_CONV]

    def rule(axis_data, vals, dims, **params):
        (lhs, rhs), (lb, rb) = vals, dims
        if lb is None or rb is None:
            return default(axis_data, vals, dims, **params)
        lhs, rhs = jnp.moveaxis(lhs, lb, 0), jnp.moveaxis(rhs, rb, 0)
        return jnp.stack([_CONV.bind(lhs[i], rhs[i], **params) for i in range(lhs.shape[0])]), 0

    with _CONV_LOCK:
        table[_CONV] = rule
        try:
            yield
        finally:
            table[_CONV] = default


def _traced_per_run(fn):
    """``fn`` (a vmapped function) traced with :func:`_per_run_convs` in effect."""

    def wrapped(*args):
        with _per_run_convs():
            return fn(*args)

    return wrapped


def make_stacked_step(gdef, objective: Callable, tx, *, compute_dtype=jnp.float32):
    """The step of R runs at once: ``jax.vmap`` over states stacked by :func:`stack_states`.

    Each run keeps its own seed (``state["seed"]``) and stop state (``state["active"]``): a run whose
    loss or gradient turns non-finite, or that is already inactive, keeps its previous state (its last
    good weights) and is reported with ``metrics["active"] = False`` while the others go on. Batches
    are stacked too, (R, B, ...).
    """
    step = _step(gdef, objective, tx, compute_dtype)

    def one(state, batch):
        inner = {k: v for k, v in state.items() if k not in ("seed", "active")}
        new, metrics = step(inner, batch, state["seed"])
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        ok = state["active"] & finite
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, inner)
        return {**new, "seed": state["seed"], "active": ok}, {**metrics, "active": ok}

    return _traced_per_run(jax.vmap(one))


def stack_states(states, seeds):
    """Stack the states of runs of one shape (leading axis = run), with each run's seed and active flag."""
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    return {**stacked, "seed": jnp.asarray(seeds, jnp.int32), "active": jnp.ones((len(states),), bool)}


def unstack_state(stacked, run: int):
    """The state of one run of a stacked state (without its seed and active flag)."""
    return jax.tree.map(lambda a: a[run], {k: v for k, v in stacked.items() if k not in ("seed", "active")})


def stacked_shardings(shardings, mesh):
    """Shardings of a stacked state: each run's layout, with the run axis whole (every run on every device)."""
    sh = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), shardings)
    rep = NamedSharding(mesh, P())
    return {**sh, "seed": rep, "active": rep}


def stacked_batch_sharding(mesh) -> NamedSharding:
    """A stacked batch (R, B, ...): the batch axis over every device, the run axis whole."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def jit_train_step(step, shardings, mesh, *, stacked: bool = False):
    """jit with the state donated; ``stacked``: ``shardings`` are a single run's, the step is a stacked one."""
    if stacked:
        shardings, bs = stacked_shardings(shardings, mesh), stacked_batch_sharding(mesh)
    else:
        bs = batch_sharding(mesh)
    return jax.jit(step, in_shardings=(shardings, bs), out_shardings=(shardings, None), donate_argnums=0)


def _in_shardings(shardings, mesh, stacked: bool):
    return (stacked_shardings(shardings, mesh) if stacked else shardings), batch_sharding(mesh)


def make_eval_step(gdef_eval, shardings, mesh, compute_dtype=jnp.float32, *, stacked: bool = False):
    """Predictions of the eval-mode model (no donation). ``stacked``: of every run, on one shared input."""

    def run(state, image):
        model = nnx.merge(gdef_eval, _cast(state["params"], compute_dtype), state["rest"])
        out, _ = model(image.astype(compute_dtype))
        return out.astype(jnp.float32)

    if stacked:
        return jax.jit(_traced_per_run(jax.vmap(run, in_axes=(0, None))),
                       in_shardings=_in_shardings(shardings, mesh, True))
    bs = batch_sharding(mesh)
    return jax.jit(run, in_shardings=(shardings, bs), out_shardings=bs)


def make_feature_step(gdef_eval, shardings, mesh, sites, *, keep: int | None = None, stacked: bool = False,
                      max_rows: int | None = None):
    """Backbone features at ``sites``, each flattened to (samples, width) for alignment scoring.

    Per-block sites ("block3", "stage1_block0") run the model with ``layers=True``.
    ``keep``: only the first ``keep`` samples' rows (the rest padded the probe set to the device count).
    ``max_rows``: at most this many rows per site, a fixed seeded subset (the same rows on every call, so
    features of two states stay paired); dense per-block maps at full size can be millions of rows.
    ``stacked``: features of every run, (R, rows, width), on one shared input.
    """

    layers = any(is_layer_site(s) for s in sites)

    def run(state, image):
        model = nnx.merge(gdef_eval, state["params"], state["rest"])
        feats = model.features(image, layers=True) if layers else model.features(image)
        out = {}
        for s in sites:
            f = feats[s].reshape(-1, feats[s].shape[-1]).astype(jnp.float32)  # sample-major rows
            f = f if keep is None else f[: f.shape[0] // image.shape[0] * keep]
            if max_rows is not None and f.shape[0] > max_rows:  # a fixed row subset, taken on the device
                f = f[np.sort(np.random.default_rng(0).choice(f.shape[0], max_rows, replace=False))]
            out[s] = f
        return out

    if stacked:
        return jax.jit(_traced_per_run(jax.vmap(run, in_axes=(0, None))),
                       in_shardings=_in_shardings(shardings, mesh, True))
    return jax.jit(run, in_shardings=(shardings, batch_sharding(mesh)))
