"""One fine-tuning run of the study: (backbone weights, task) -> learning and alignment curves.

Uses the training engine as is (TaskModel, optimizer recipe, born-sharded state, jitted steps)
and the in-loop AlignmentMonitor, which banks the starting backbone's features on a fixed probe
set and scores MMD^2 / CKA / drift at every evaluation. Jitted functions are cached per
(backbone, task) shape so the pretrained and the random-init run share one compilation.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vfm_align.errors import Stopped
from vfm_align.models.task_model import TaskModel
from vfm_align.study import taskdata
from vfm_align.study.backbones import FAMILIES, GridFeatures, fresh_backbone
from vfm_align.train.mesh import global_batch
from vfm_align.train.monitor import AlignmentMonitor
from vfm_align.train.optim import make_optimizer
from vfm_align.train.state import create_state, with_backbone
from vfm_align.train.step import jit_train_step, make_eval_step, make_feature_step, make_train_step, task_loss

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}


def _build_cached(build, spec, cfg, steps: int, seed: int, mesh):
    """Sharded initial state (kept on the host) and the jitted train / eval / feature steps of one run shape."""
    gdef_t, gdef_e, state, sh, tx = create_state(build, lambda p: make_optimizer(cfg.optim, p, steps)[0], mesh)
    train = jit_train_step(make_train_step(gdef_t, task_loss(spec.kind, spec.loss), tx, kind=spec.kind,
                                           seed=seed, augment=bool(cfg.augment)), sh, mesh)
    return (sh, jax.device_get(state), train, make_eval_step(gdef_e, sh, mesh),
            make_feature_step(gdef_e, sh, mesh, tuple(cfg.sites)))


def build_task_model(family: str, backbone: nnx.Module, task: str, input_shape, cfg, seed: int) -> TaskModel:
    spec = taskdata.get_spec(task)
    return TaskModel(GridFeatures(backbone, family), task=task, family=FAMILIES[family], input_shape=input_shape,
                     num_outputs=spec.num_outputs, head_hidden=int(cfg.head_hidden), feature_site="patch_map",
                     slice_channel=int(cfg.slice_channel), slice_window=int(cfg.slice_window),
                     rngs=nnx.Rngs(seed))


def run_finetune(family: str, config, pretrained: nnx.Module | None, task: str, data: dict, probe: np.ndarray, cfg,
                 mesh, *, seed: int, desc: str = "", progress: bool = True, stop: threading.Event | None = None) -> dict:
    """Fine-tune a ``family`` backbone of ``config`` on ``task``, from ``pretrained`` weights or (None) from a
    random initialisation; returns metric and alignment curves (plain Python values). Safe to call from
    several threads at once; ``stop``, when set, ends the run at its next step with :class:`Stopped`."""
    spec = taskdata.get_spec(task, seed)
    input_shape = data["train"]["image"].shape[1:]
    steps = int(cfg.steps)
    build = lambda: build_task_model(family, fresh_backbone(family, config, seed + 1), task, input_shape, cfg, seed)  # noqa: E731
    # One compile per head, loss and shapes, shared by the pretrained and random-init runs (and by a resumed study);
    # the random initial state is kept on the host too, so the second run of a pair does not compile its init.
    key = (family, config, spec.kind, spec.loss, spec.num_outputs, input_shape, steps, seed, bool(cfg.augment),
           int(cfg.head_hidden), int(cfg.slice_channel), int(cfg.slice_window), cfg.optim.to_json(sort_keys=True), tuple(mesh.shape.items()),
           tuple(d.id for d in mesh.devices.flat))
    with _CACHE_LOCK:
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # concurrent runs of one shape build its initial state and jitted steps once
        if key not in _CACHE:
            _CACHE[key] = _build_cached(build, spec, cfg, steps, seed, mesh)
    sh, initial, train_step, eval_step, feature_step = _CACHE[key]
    state = jax.device_put(initial, sh)  # a fresh copy: the train step donates its input
    if pretrained is not None:
        state = with_backbone(state, GridFeatures(pretrained, family), sh)
    monitor = AlignmentMonitor(feature_step, global_batch({"x": probe}, mesh)["x"], tuple(cfg.sites),
                               num_features=int(cfg.rff_features), max_rows=int(cfg.max_rows), seed=seed)
    monitor.bank(state)
    val_x = global_batch({"x": data["val"]["image"]}, mesh)["x"]

    def evaluate(state):
        return taskdata.evaluate(task, np.asarray(jax.device_get(eval_step(state, val_x))), data["val"], seed=seed)

    rng = np.random.default_rng(seed)
    n, bs = len(data["train"]["image"]), int(cfg.batch_size)
    every = max(1, int(cfg.eval_every))
    curve = {"step": [0], "metric": [evaluate(state)], "loss": [float("nan")]}
    for k, v in monitor(state).items():
        curve.setdefault(k, []).append(v)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for i in bar:
        if stop is not None and stop.is_set():
            bar.close()
            raise Stopped(desc)
        idx = rng.choice(n, bs, replace=n < bs)
        batch = global_batch({"image": data["train"]["image"][idx], "target": data["train"]["target"][idx]}, mesh)
        state, m = train_step(state, batch)
        if i % every == 0 or i == steps:
            curve["step"].append(i)
            curve["loss"].append(float(m["loss"]))
            curve["metric"].append(evaluate(state))
            for k, v in monitor(state).items():
                curve[k].append(v)
            bar.set_postfix(metric=f"{curve['metric'][-1]:.3f}")
    # Paired features before/after for the permutation test (pre = banked, post = final).
    post = monitor._rows(monitor.feature_fn(state, monitor.probe))
    pairs = {s: (np.asarray(monitor.pre[s]), np.asarray(post[s])) for s in monitor.sites}
    return {"curve": curve, "final_metric": curve["metric"][-1], "metric_name": spec.metric, "pairs": pairs}


def steps_to_fraction(steps, metric, fraction: float = 0.9) -> int:
    """First evaluated step whose progress (m - m0) / (m_final - m0) reaches ``fraction``.

    Progress is measured from the starting value so offsets such as the PSNR of the raw input do not
    make every run "converged" at step 0. A run that never improved counts as converged at its end.
    """
    m = np.asarray(metric, float)
    gain = m[-1] - m[0]
    if not np.isfinite(gain) or gain <= 0:
        return int(steps[-1])
    hit = np.nonzero((m - m[0]) / gain >= fraction)[0]
    return int(steps[hit[0]])
