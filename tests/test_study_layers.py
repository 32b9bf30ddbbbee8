"""Per-block alignment: the layer sites of every backbone in network order, the feature step that reads them (the
in-loop monitor and the study share it), and the study's per-layer MMD^2 / CKA against a numpy reference."""

import jax
import numpy as np
import pytest

from vfm_align.align.kernels import median_sigma
from vfm_align.models.task_model import is_layer_site, layer_sites
from vfm_align.study.finetune import layer_profile
from vfm_align.train import mesh as M
from vfm_align.train.loop import build_task_model
from vfm_align.train.optim import make_optimizer
from vfm_align.train.recipes import base_config
from vfm_align.train.state import create_state
from vfm_align.train.step import make_feature_step


def test_layer_sites_in_network_order():
    names = ["pooled", "stage1_block0", "stage0_block1", "stage10_block0", "stage0_block0", "stage3", "patch"]
    assert layer_sites(names) == ["stage0_block0", "stage0_block1", "stage1_block0", "stage10_block0"]
    assert layer_sites(["block10", "block2", "cls", "block0"]) == ["block0", "block2", "block10"]
    assert not any(is_layer_site(n) for n in ("blocks", "stage3", "patch_map", "block", "layers"))


def _numpy_mmd2_unbiased(x, y, sigma):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def _numpy_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_layer_profile_matches_numpy():
    rng = np.random.default_rng(0)
    start = {"block0": rng.normal(size=(80, 6)), "block1": rng.normal(size=(80, 4))}
    end = {"block0": start["block0"] + 0.05 * rng.normal(size=(80, 6)),  # nearly unchanged
           "block1": 1.5 * start["block1"] + 1.0}                          # moved a lot
    p = layer_profile(start, end, ["block0", "block1"], seed=0)
    assert p["layers"] == ["block0", "block1"]
    for i, name in enumerate(p["layers"]):
        x, y = start[name].astype(np.float32).astype(np.float64), end[name].astype(np.float32).astype(np.float64)
        sigma = median_sigma(start[name].astype(np.float32), seed=0)
        assert p["sigma"][i] == pytest.approx(sigma)
        assert p["mmd2"][i] == pytest.approx(_numpy_mmd2_unbiased(x, y, sigma), rel=1e-4, abs=1e-6)
        assert p["cka"][i] == pytest.approx(_numpy_cka(x, y), rel=1e-5)
    assert p["mmd2"][1] > p["mmd2"][0]


@pytest.mark.parametrize("backbone,layers", [("provicnet", ["block0", "block1"]),
                                             ("profound_conv", ["stage0_block0", "stage1_block0", "stage2_block0",
                                                                "stage3_block0"])])
def test_feature_step_reads_layer_sites(backbone, layers):
    cfg = base_config(backbone, "segmentation", "tiny")
    shape = (*cfg.data.shape, 3)
    mesh = M.make_mesh(-1, 1, devices=jax.devices()[:1])
    gdef, gdef_eval, state, sh, _ = create_state(lambda: build_task_model(cfg, shape),
                                                 lambda p: make_optimizer(cfg.optim, p, 10)[0], mesh)
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    from flax import nnx

    model = nnx.merge(gdef_eval, state["params"], state["rest"])
    want = model.features(x, layers=True)
    assert layer_sites(want) == layers
    got = make_feature_step(gdef_eval, sh, mesh, tuple(layers))(state, M.global_batch({"x": x}, mesh)["x"])
    for name in layers:
        ref = np.asarray(want[name]).reshape(-1, want[name].shape[-1])
        np.testing.assert_allclose(np.asarray(got[name]), ref, rtol=1e-5, atol=1e-6)  # jitted vs eager
    # a row cap takes a fixed subset of the same rows on every call
    capped = make_feature_step(gdef_eval, sh, mesh, tuple(layers), max_rows=10)
    a, b = (capped(state, M.global_batch({"x": x}, mesh)["x"]) for _ in range(2))
    for name in layers:
        ref = np.asarray(want[name]).reshape(-1, want[name].shape[-1])
        rows = min(10, len(ref))
        assert a[name].shape == (rows, ref.shape[1])
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        assert all(np.abs(ref - r).max(1).min() < 1e-5 for r in np.asarray(a[name]))  # rows of the full set
