"""Data-parallel and FSDP layouts on the fake 8-device CPU mesh give the single-device result."""

import jax
import numpy as np
import pytest

from train_toy import make_task
from vfm_align.data.tasks import get_task
from vfm_align.train import mesh as M
from vfm_align.train.data import batch_indices
from vfm_align.train.loop import build_task_model
from vfm_align.train.optim import make_optimizer
from vfm_align.train.recipes import base_config
from vfm_align.train.state import abstract_state, create_state
from vfm_align.train.step import jit_train_step, make_train_step, task_objective

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices set by conftest")

LAYOUTS = [(8, 1), (2, 4), (1, 8)]
MIN_SIZE = 256  # small enough that the tiny models have fsdp-sharded weights


def _run(cfg, data, state_host, layout, steps=2):
    mesh = M.make_mesh(*layout, devices=jax.devices()[: layout[0] * layout[1]])
    kind, loss = get_task(cfg.task.name).head, get_task(cfg.task.name).loss
    build = lambda: build_task_model(cfg, data["image"].shape[1:])  # noqa: E731
    make_tx = lambda p: make_optimizer(cfg.optim, p, 10)[0]  # noqa: E731
    if state_host is None:
        gdef, _, state, sh, tx = create_state(build, make_tx, mesh, min_size=MIN_SIZE)
    else:  # the reference run's initial weights, re-laid out for this mesh
        gdef, _, _, sh, tx = abstract_state(build, make_tx, mesh, min_size=MIN_SIZE)
        state = jax.device_put(state_host, sh)
    init = jax.device_get(state)
    step = jit_train_step(make_train_step(gdef, task_objective(kind, loss), tx, seed=3), sh, mesh)
    losses = []
    for i in range(steps):
        idx = batch_indices(len(data["image"]), 8, i, seed=0)
        state, m = step(state, M.global_batch({k: v[idx] for k, v in data.items()}, mesh))
        losses.append(float(m["loss"]))
    return init, losses, state


@pytest.mark.parametrize("backbone", ["provicnet", "profound_conv"])
def test_layouts_match_single_device(backbone):
    cfg = base_config(backbone, "segmentation", "tiny")
    cfg.optim.warmup_steps = 0
    data = make_task("segmentation", 16, seed=1)
    init, ref_losses, ref_state = _run(cfg, data, None, (1, 1))
    ref_params = jax.device_get(ref_state["params"])
    assert ref_losses[1] != ref_losses[0]  # the step really updated the weights
    for layout in LAYOUTS:
        _, losses, state = _run(cfg, data, init, layout)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=f"losses differ on mesh {layout}")
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])]
        if layout[1] > 1:
            assert any("fsdp" in tuple(s) for s in specs), f"no weight sharded over fsdp on mesh {layout}"
        else:
            assert all(tuple(s) in ((), (None,) * len(s)) for s in specs)
        got = jax.device_get(state["params"])
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4,
                                       err_msg=f"{jax.tree_util.keystr(path)} differs on mesh {layout}")


def test_leaf_spec_rule():
    assert M.leaf_spec((384, 1152), 4, 16) == jax.sharding.PartitionSpec(None, "fsdp")  # largest divisible axis
    assert M.leaf_spec((6, 10), 4, 16) == jax.sharding.PartitionSpec()  # no axis divisible by 4
    assert M.leaf_spec((1024,), 4, 2048) == jax.sharding.PartitionSpec()  # below the size threshold
    assert M.leaf_spec((8, 12), 1, 0) == jax.sharding.PartitionSpec()  # no fsdp axis
