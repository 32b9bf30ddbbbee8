"""Memory levers of fine-tuning: rematerialised blocks, gradient accumulation through the train step, and the
per-device bytes FSDP saves on the fake 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vfm_align.train import mesh as M
from vfm_align.train.loop import build_task_model
from vfm_align.train.optim import make_optimizer
from vfm_align.train.recipes import recipe_config
from vfm_align.train.state import create_state, split_model
from vfm_align.train.step import jit_train_step, make_train_step, task_objective

SHAPE = (16, 32, 32, 3)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, *SHAPE)).astype(np.float32),
            "target": rng.integers(0, 3, (n, *SHAPE[:3])).astype(np.int32)}


def _loss_and_grads(cfg, batch):
    gdef, _, params, rest = split_model(build_task_model(cfg, SHAPE))
    objective = task_objective("dense", "dice_ce", augment=False)

    def f(p):
        return objective(nnx.merge(gdef, p, rest), batch, None)[0]

    grad = jax.value_and_grad(f)
    return jax.jit(grad)(params), str(jax.make_jaxpr(grad)(params))


# ProFound-Conv's tiny model takes over a minute to compile twice on 2 cores: slow tier.
@pytest.mark.parametrize("backbone", [pytest.param("profound_conv", marks=pytest.mark.slow), "profound_mae",
                                      "provicnet"])
def test_remat_gives_the_same_loss_and_gradients(backbone):
    batch = {k: jnp.asarray(v) for k, v in _batch(2).items()}
    ref_cfg = recipe_config(backbone, "segmentation", "tiny")
    cfg = recipe_config(backbone, "segmentation", "tiny")
    cfg.train.remat = True
    (loss0, g0), jaxpr0 = _loss_and_grads(ref_cfg, batch)
    (loss1, g1), jaxpr1 = _loss_and_grads(cfg, batch)
    # The flag takes effect: the blocks are recomputed in the backward pass (remat) only when it is set.
    assert "remat" in jaxpr1 and "remat" not in jaxpr0
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(flat0) == len(flat1) and any(float(jnp.abs(g).max()) > 0 for g in flat0)
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def _train(cfg, batches):
    mesh = M.make_mesh(1, 1, devices=jax.devices()[:1])
    gdef, _, state, sh, tx = create_state(lambda: build_task_model(cfg, SHAPE),
                                          lambda p: make_optimizer(cfg.optim, p, 10)[0], mesh)
    step = jit_train_step(make_train_step(gdef, task_objective("dense", "dice_ce", augment=False), tx, seed=0),
                          sh, mesh)
    for b in batches:
        state, _ = step(state, M.global_batch(b, mesh))
    return jax.device_get(state["params"])


def test_grad_accumulation_of_micro_batches_equals_the_large_batch():
    """k = 2 micro-batches of 3 with optim.grad_accum = 2 give the update of one batch of 6 (the loss is a mean
    over samples and voxels, so the mean of the micro-batch gradients is the large batch's gradient)."""
    big = _batch(6, seed=1)
    cfg = recipe_config("profound_conv", "segmentation", "tiny")
    cfg.optim.warmup_steps = 0  # the first update at the peak lr, so it is not zero
    expected = _train(cfg, [big])
    cfg.optim.grad_accum = 2
    got = _train(cfg, [{k: v[:3] for k, v in big.items()}, {k: v[3:] for k, v in big.items()}])
    init = jax.device_get(split_model(build_task_model(cfg, SHAPE))[2])
    moved = 0
    for e, g, i in zip(jax.tree.leaves(expected), jax.tree.leaves(got), jax.tree.leaves(init)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
        moved += int(np.any(e != i))
    assert moved > 0  # the update is not empty


def _per_device_bytes(tree, device):
    """Bytes of ``tree``'s arrays that live on ``device``, read from the arrays' own shards."""
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == device)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices set by conftest")
def test_fsdp_shards_params_and_optimizer_state_as_the_shapes_say():
    cfg = recipe_config("profound_mae", "segmentation", "tiny")
    cfg.mesh.fsdp_min_size = 256
    build = lambda: build_task_model(cfg, SHAPE)  # noqa: E731
    out = {}
    for fsdp in (1, 8):
        mesh = M.make_mesh(1, fsdp, devices=jax.devices()[:fsdp])
        _, _, state, _, _ = create_state(build, lambda p: make_optimizer(cfg.optim, p, 10, flat=False)[0], mesh,
                                         min_size=256)
        dev = jax.devices()[0]
        out[fsdp] = {k: _per_device_bytes(state[k], dev) for k in ("params", "opt")}
        if fsdp == 8:
            shapes = [(a.shape, a.dtype.itemsize) for a in jax.tree.leaves(state["params"])]
            opt_shapes = [(a.shape, a.dtype.itemsize) for a in jax.tree.leaves(state["opt"])]

    def expect(shapes):
        """A leaf of >= 256 elements with an axis divisible by 8 is split 8 ways; the rest is whole on each device."""
        tot = 0
        for shape, item in shapes:
            n = int(np.prod(shape)) * item
            tot += n // 8 if int(np.prod(shape)) >= 256 and any(d % 8 == 0 for d in shape) else n
        return tot

    whole = sum(int(np.prod(s)) * i for s, i in shapes)
    assert out[1]["params"] == whole
    assert out[8]["params"] == expect(shapes) < whole
    assert out[8]["opt"] == expect(opt_shapes)
    # AdamW keeps two moments per weight, laid out as the weight, plus two int32 step counts (Adam's, the
    # lr schedule's).
    assert out[1]["opt"] == 2 * whole + 2 * 4
    assert out[8]["opt"] < out[1]["opt"] / 3
