"""Losses, optimizer grouping, gradient accumulation, 2.5D slicing, recipe overrides and the restoration
head's identity start (fast unit checks)."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from vfm_align.errors import ConfigError
from vfm_align.models.task_model import volume_to_slices, window_index
from vfm_align.train import losses as L
from vfm_align.train.optim import make_optimizer, param_labels


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dice_ce_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 3, 4, 5))
    p = _np_softmax(logits.astype(np.float64))
    oh = np.eye(3)[labels]
    ce = -(oh * np.log(p)).sum(-1).mean()
    inter = (p * oh)[..., 1:].sum((1, 2, 3))
    den = p[..., 1:].sum((1, 2, 3)) + oh[..., 1:].sum((1, 2, 3))
    dice = (1 - (2 * inter + 1e-5) / (den + 1e-5)).mean()  # MONAI: include_background=False, mean over (N, C)
    with jax.default_matmul_precision("highest"):
        got = float(L.dice_ce(jnp.asarray(logits), jnp.asarray(labels)))
        aux = float(L.dice_ce(jnp.asarray(logits), jnp.asarray(labels), aux_logits=jnp.asarray(logits)))
    assert got == pytest.approx(ce + dice, rel=1e-5)
    assert aux == pytest.approx(1.4 * (ce + dice), rel=1e-5)  # auxiliary output weighted 0.4


def test_l1_l2_and_weighted_ce():
    a, b = jnp.array([[1.0, -2.0]]), jnp.array([[0.5, 0.0]])
    assert float(L.l1(a, b)) == pytest.approx(1.25)
    assert float(L.l2(a, b)) == pytest.approx((0.25 + 4.0) / 2)
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    per = -np.log(_np_softmax(np.array([[2.0, 0.0], [0.0, 2.0]])))[[0, 1], [1, 1]]
    got = float(L.cross_entropy(logits, jnp.array([1, 1]), class_weights=[1.0, 3.0]))
    assert got == pytest.approx(per.mean(), rel=1e-6)


def _optim_cfg(**kw):
    base = dict(name="adamw", lr=1e-2, min_lr=0.0, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                layer_decay=1.0, backbone_lr_mult=1.0, clip_norm=0.0, grad_accum=1)
    base.update(kw)
    return mlc.ConfigDict(base)


def _convnext_like():
    z = lambda *s: jnp.zeros(s)  # noqa: E731
    return {"backbone": {"downsample_layers": {0: {"kernel": z(4, 4)}, 1: {"kernel": z(4, 4)}},
                         "stages": {0: {0: {"kernel": z(4, 4)}, 1: {"kernel": z(4, 4)}}, 1: {0: {"kernel": z(4, 4)}}},
                         "norm": {"scale": z(4)}},
            "head": {"kernel": z(4, 2), "bias": z(2)}}


def test_layer_decay_labels_follow_profound_layer_ids():
    labels, scales = param_labels(_convnext_like(), layer_decay=0.5)
    bb = labels["backbone"]
    # depths (2, 1): downsample_layers.i -> sum(depths[:i]) + 1; stages.s.b -> sum(depths[:s]) + b + 1; rest -> 4
    assert bb["downsample_layers"][0]["kernel"] == "layer001/decay"
    assert bb["stages"][0][1]["kernel"] == "layer002/decay"
    assert bb["downsample_layers"][1]["kernel"] == "layer003/decay"
    assert bb["stages"][1][0]["kernel"] == "layer003/decay"
    assert bb["norm"]["scale"] == "layer004/nodecay"
    assert labels["head"]["bias"] == "head/nodecay"
    assert scales["layer001/decay"] == pytest.approx(0.5 ** 3) and scales["layer004/nodecay"] == 1.0


@pytest.mark.parametrize("flat", [True, False])
def test_optimizer_equals_one_optax_adamw_per_group(flat):
    """The raveled (or per-leaf) update against optax's own AdamW per label group, over three steps."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), _convnext_like())
    cfg = _optim_cfg()
    cfg.layer_decay, cfg.weight_decay, cfg.clip_norm = 0.5, 0.1, 1.0
    tx, sched = make_optimizer(cfg, params, 10, flat=flat)
    labels, scales = param_labels(params, layer_decay=0.5)
    ref = optax.chain(optax.clip_by_global_norm(float(cfg.clip_norm)), optax.multi_transform(
        {k: optax.adamw(lambda n, s=s: sched(n) * s, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=0.1 if k.endswith("/decay") else 0.0) for k, s in scales.items()}, labels))
    p, q, s, r = params, params, tx.init(params), ref.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
        u, s = jax.jit(tx.update)(g, s, p)
        v, r = ref.update(g, r, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(p["backbone"]["norm"]["scale"] - params["backbone"]["norm"]["scale"]).max()) > 0


def test_frozen_backbone_gets_no_update_and_head_does():
    params = _convnext_like()
    tx, _ = make_optimizer(_optim_cfg(), params, 10, freeze_backbone=True)
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(upd["backbone"]))
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(upd["head"]))


def test_grad_accumulation_equals_one_big_step():
    params = {"head": {"kernel": jnp.array([[1.0, -1.0], [0.5, 2.0]])}}
    g1 = {"head": {"kernel": jnp.array([[0.2, 0.1], [-0.3, 0.4]])}}
    g2 = {"head": {"kernel": jnp.array([[0.6, -0.5], [0.1, 0.0]])}}
    big, _ = make_optimizer(_optim_cfg(), params, 10)
    acc, _ = make_optimizer(_optim_cfg(grad_accum=2), params, 20)
    upd, _ = big.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), big.init(params), params)
    expected = optax.apply_updates(params, upd)
    s = acc.init(params)
    u1, s = acc.update(g1, s, params)
    p1 = optax.apply_updates(params, u1)
    np.testing.assert_array_equal(p1["head"]["kernel"], params["head"]["kernel"])  # no update mid-accumulation
    u2, s = acc.update(g2, s, p1)
    np.testing.assert_allclose(optax.apply_updates(p1, u2)["head"]["kernel"], expected["head"]["kernel"], rtol=1e-6)


def test_slices_shift_inward_at_the_edges():
    np.testing.assert_array_equal(np.asarray(window_index(5, 3)),
                                  [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]])
    x = jnp.arange(2 * 4 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 4, 2, 2, 3)
    s, pos = volume_to_slices(x, channel=1, window=3, size=None)
    assert s.shape == (8, 2, 2, 3)
    # case 1, slice 1 -> slices 0..2
    np.testing.assert_array_equal(np.asarray(s[5, :, :, 2]), np.asarray(x[1, 2, :, :, 1]))
    np.testing.assert_array_equal(np.asarray(pos[5]), [1.0, 4.0])
    with pytest.raises(ConfigError, match="fewer than the 2.5D window"):
        window_index(2, 3)


class _PoolBackbone:
    """A stand-in backbone (4x average pooling): the residual wiring needs a feature map, not a real encoder."""

    def features(self, x, pos=None):
        n, a, b, c = x.shape[0], x.shape[1] // 4, x.shape[2] // 4, x.shape[-1]
        if pos is not None:  # 2.5D slices (N*D, S, S, window)
            return {"pooled": x.mean((1, 2)), "patch": x.reshape(n, a, 4, b, 4, c).mean((2, 4))}
        return {"pooled": x.mean((1, 2, 3)), "stage0": x.reshape(n, a, 4, b, 4, x.shape[3] // 4, 4, c).mean((2, 4, 6))}


@pytest.mark.parametrize("family,task,channels", [("volume", "super_resolution", [0]),
                                                   ("volume", "distortion_correction", [1, 2]),
                                                   ("slices", "super_resolution", [0])])
def test_untrained_restoration_model_returns_the_degraded_input(family, task, channels):
    """Both parts of the residual head start at zero: training starts exactly at the identity baseline."""
    from flax import nnx

    from vfm_align.models.task_model import TaskModel

    x = np.random.default_rng(0).normal(size=(2, 8, 16, 16, 3)).astype(np.float32)
    model = TaskModel(_PoolBackbone(), task=task, family=family, input_shape=x.shape[1:], num_outputs=len(channels),
                      head_hidden=8, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, v: m(v)[0])(model, jnp.asarray(x))  # jitted: op-by-op dispatch is slower
    np.testing.assert_array_equal(np.asarray(out), x[..., channels])


def test_recipe_overrides_are_typed_and_checked(tmp_path):
    from vfm_align.cli import build_parser
    from vfm_align.config_file import load_config

    recipe = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune.py") + ":provicnet,segmentation"
    # The finetune command's --config.KEY=VALUE and --config.KEY VALUE flags arrive as KEY=VALUE.
    args = build_parser().parse_args(
        ["finetune", "--config", recipe + ",tiny", "--config.optim.lr=3e-4", "--config.train.steps", "7",
         "--config.model.freeze_backbone=true", "--config.data.shape=(16, 64, 64)", "--config.optim.warmup_steps=0"])
    assert args.overrides[:2] == ["optim.lr=3e-4", "train.steps=7"]
    cfg = load_config(args.config, args.overrides)
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.model.freeze_backbone is True
    assert tuple(cfg.data.shape) == (16, 64, 64) and cfg.optim.backbone_lr_mult == 0.05
    assert isinstance(cfg.optim.warmup_steps, int) and isinstance(cfg.data.shape, tuple)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(recipe, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(recipe, ["model.freeze_backbone=maybe"])
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(recipe, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(recipe, ["optim.lr"])


def test_study_overrides_reach_list_items():
    from vfm_align.config_file import default_config_path, load_config

    cfg = load_config(default_config_path("study_default"),
                      ["backbones.1.weights=models/provicnet", 'finetune.sites=["pooled"]', "mesh.devices=0"])
    assert cfg.backbones[1].weights == "models/provicnet" and cfg.backbones[0].weights == ""
    assert list(cfg.finetune.sites) == ["pooled"] and cfg.mesh.devices == 0
    with pytest.raises(ConfigError, match="not an index"):
        load_config(default_config_path("study_default"), ["backbones.5.weights=x"])
    with pytest.raises(ConfigError, match="no section"):
        load_config(default_config_path("study_default"), ["nosuch.key=1"])


def test_alignment_monitor_scores_against_the_bank():
    from vfm_align.train.monitor import AlignmentMonitor, linear_cka

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    feat = lambda w, probe: {"pooled": probe @ w}  # noqa: E731  (a "backbone" whose weights are w)
    w0 = np.eye(8, dtype=np.float32)
    mon = AlignmentMonitor(feat, x, ["pooled"], num_features=256, max_rows=1000, seed=0)
    mon.bank(w0)
    same = mon(w0)
    assert same["align/pooled/cka"] == pytest.approx(1.0, abs=1e-5)
    assert same["align/pooled/drift_cos"] == pytest.approx(0.0, abs=1e-6)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rot = mon(q.astype(np.float32))  # a rotation: CKA stays 1, the per-sample features move
    assert rot["align/pooled/cka"] == pytest.approx(1.0, abs=1e-4)
    assert rot["align/pooled/drift_rel"] > 0.5
    shifted = mon(w0 * 3.0)
    assert shifted["align/pooled/mmd2"] > 10 * abs(same["align/pooled/mmd2"]) + 1e-3
    # linear CKA against the numpy formula on unrelated data
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(50, 4))
    ac, bc = a - a.mean(0), b - b.mean(0)
    ref = np.linalg.norm(bc.T @ ac) ** 2 / (np.linalg.norm(ac.T @ ac) * np.linalg.norm(bc.T @ bc))
    assert float(linear_cka(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))) == pytest.approx(ref, rel=1e-4)


def test_bfloat16_compute_keeps_float32_weights_and_follows_the_float32_step():
    """train.compute_dtype=bfloat16: the forward/backward run in bf16 on float32 master weights, so the
    loss and the update agree with the float32 step to bf16 precision and the weights stay float32."""
    from train_toy import make_task
    from vfm_align.data.tasks import get_task
    from vfm_align.train import mesh as M
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.recipes import base_config
    from vfm_align.train.state import create_state
    from vfm_align.train.step import jit_train_step, make_train_step, task_objective

    cfg = base_config("provicnet", "segmentation", "tiny")
    cfg.optim.warmup_steps = 0
    data = make_task("segmentation", 4, seed=2)
    mesh = M.make_mesh(1, 1, devices=jax.devices()[:1])
    gdef, _, state, sh, tx = create_state(lambda: build_task_model(cfg, data["image"].shape[1:]),
                                          lambda p: make_optimizer(cfg.optim, p, 10)[0], mesh)
    init = jax.device_get(state)
    batch = M.global_batch(data, mesh)
    out = {}
    for dt in (jnp.float32, jnp.bfloat16):
        objective = task_objective("dense", get_task("segmentation").loss, augment=False, compute_dtype=dt)
        step = jit_train_step(make_train_step(gdef, objective, tx, seed=0, compute_dtype=dt), sh, mesh)
        new, m = step(jax.device_put(init, sh), batch)
        out[dt] = (float(m["loss"]), jax.device_get(new["params"]))
    (l32, p32), (l16, p16) = out[jnp.float32], out[jnp.bfloat16]
    assert abs(l16 - l32) < 2e-2 * abs(l32)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p16))
    d32 = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(init["params"]))])
    d16 = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(init["params"]))])
    assert np.linalg.norm(d32) > 0
    cos = d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32))
    assert cos > 0.9, cos
