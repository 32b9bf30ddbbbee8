"""The train state as one pytree, and its born-sharded creation.

State = {"params": nnx.State of Params, "rest": nnx.State of everything else (BatchNorm
statistics), "opt": optax state, "step": int32}. Graph definitions (train mode and eval mode)
stay outside it, so the jitted step is a pure function of (state, batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vfm_align.train.mesh import replicated, state_shardings


def split_model(model: nnx.Module):
    """(train graphdef, eval graphdef, params, rest)."""
    model.train()
    gdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    gdef_eval, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    return gdef_train, gdef_eval, params, rest


def init_state(params, rest, tx):
    return {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def shardings_for(state_like, mesh, *, min_size: int):
    """Shardings for a state (or its abstract shape): step replicated, the rest by the fsdp rule."""
    sh = state_shardings({k: v for k, v in state_like.items() if k != "step"}, mesh, min_size=min_size)
    sh["step"] = replicated(mesh)
    return sh


def abstract_state(build, make_tx, mesh, *, min_size: int = 2**14):
    """(gdef_train, gdef_eval, abstract state, shardings, tx) without allocating anything."""
    gdef_train, gdef_eval, abs_params, abs_rest = split_model(nnx.eval_shape(build))
    tx = make_tx(abs_params)
    abstract = jax.eval_shape(lambda p, r: init_state(p, r, tx), abs_params, abs_rest)
    return gdef_train, gdef_eval, abstract, shardings_for(abstract, mesh, min_size=min_size), tx


def create_state(build, make_tx, mesh, *, min_size: int = 2**14, backbone=None):
    """Build the model and optimizer state directly in their target layout (born sharded).

    ``build()`` constructs the (randomly initialised) model; it runs once abstractly for shapes and
    once inside ``jax.jit(out_shardings=...)``, so no device ever holds an unsharded copy.
    ``make_tx(abstract_params)`` returns the optax transformation. ``backbone``: an optional
    pretrained module whose weights replace the model's ``backbone`` subtree.
    Returns (gdef_train, gdef_eval, state, shardings, tx).
    """
    gdef_train, gdef_eval, _, sh, tx = abstract_state(build, make_tx, mesh, min_size=min_size)

    def init():
        _, _, params, rest = split_model(build())
        return init_state(params, rest, tx)

    init = jax.jit(init, out_shardings=sh)
    if all(d.platform == "cpu" for d in mesh.devices.flat):
        # XLA:CPU spends seconds optimising the inlined random-number code of every parameter (12 s for
        # the study's tiny ViT, per task head); the init runs once, so it skips backend optimisation (2 s).
        # The values agree with an optimised build to 1-2 ulp.
        state = init.lower().compile({"xla_backend_optimization_level": 0})()
    else:
        state = init()
    if backbone is not None:
        state = with_backbone(state, backbone, sh)
    return gdef_train, gdef_eval, state, sh, tx


def with_backbone(state, backbone, sh):
    """Replace, in place, the weights of ``state``'s ``backbone`` subtree by those of ``backbone``.

    Adam moments start at zero whatever the weights, so only the weights need replacing; they go
    straight into the state's shardings ``sh``. Returns ``state``.
    """
    for key, filt in (("params", nnx.Param), ("rest", nnx.Not(nnx.Param))):
        src = nnx.state(backbone, filt)
        if "backbone" not in state[key]:
            continue
        tgt = state[key]["backbone"]
        if jax.tree.structure(src) != jax.tree.structure(tgt):
            from vfm_align.errors import CheckpointError

            raise CheckpointError("pretrained backbone does not match the configured architecture")
        state[key]["backbone"] = jax.device_put(src, sh[key]["backbone"])
    return state
