"""The study's fine-tuning runs: one (backbone, task) from several initial weights and seeds, trained together.

Runs of one (backbone, task) share every shape, so they train as one stacked, ``jax.vmap``-ed step
of the training engine (:func:`vfm_align.train.step.make_stacked_step`) through its loop
(:func:`vfm_align.train.loop.train_loop`): the pretrained and the random-init run of each seed, and
every seed. Each run keeps its own batches, random streams, alignment monitor (which banks the
run's starting backbone features on a fixed probe set and scores MMD^2 / CKA / drift at every
evaluation) and stop state: a run that diverges is frozen at its last good weights, marked with
the step, and the others go on. Each run's numbers equal those of the run trained alone, to
float32 rounding.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfm_align.align.cka import linear_cka
from vfm_align.align.kernels import median_sigma
from vfm_align.align.mmd import mmd
from vfm_align.data.tasks import get_task
from vfm_align.models.task_model import TaskModel, layer_sites
from vfm_align.study import taskdata
from vfm_align.study.backbones import GridFeatures, fresh_backbone
from vfm_align.train.data import DrawnBatches
from vfm_align.train.loop import Hook, train_loop
from vfm_align.train.mesh import global_batch
from vfm_align.train.monitor import AlignmentMonitor, align_probe
from vfm_align.train.optim import make_optimizer
from vfm_align.train.recipes import BACKBONES
from vfm_align.train.state import abstract_state, create_state, with_backbone
from vfm_align.train.step import (
    jit_train_step,
    make_eval_step,
    make_feature_step,
    make_stacked_step,
    stack_states,
    stacked_batch_sharding,
    stacked_shardings,
    task_objective,
)


@dataclass(frozen=True)
class Run:
    """One fine-tune of a group: its starting backbone (None: random initialisation) and its seed."""

    pretrained: nnx.Module | None
    seed: int


class _LRU:
    """The last few compiled step sets (or initial states), by run shape: bounded, as a process may run many."""

    def __init__(self, size: int = 4):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key not in self.items:
                self.items[key] = make()
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
            self.items.move_to_end(key)
            return self.items[key]


_COMPILED = _LRU()
# Host copies of whole train states (weights and Adam moments): a pair's groups run seed by seed, so the last few
# are all a pair reuses, and at released sizes each one is gigabytes.
_INITIAL = _LRU(3)


def grid_task_model(name: str, backbone: nnx.Module, task: str, input_shape, cfg, seed: int) -> TaskModel:
    """The study's TaskModel: a backbone with its dense ``patch_map`` (GridFeatures) and the task head."""
    # A slice backbone built for another slice size (a converted ProViCNet: 448) gets its slices resized to it.
    size = getattr(backbone.config, "img_size", None) if BACKBONES[name].family == "slices" else None
    return TaskModel(GridFeatures(backbone, name), task=task, family=BACKBONES[name].family, input_shape=input_shape,
                     num_outputs=get_task(task).num_outputs, head_hidden=int(cfg.head_hidden), feature_site="patch_map",
                     slice_channel=int(cfg.slice_channel), slice_window=int(cfg.slice_window),
                     slice_size=int(size) if size and int(size) != input_shape[1] else None, rngs=nnx.Rngs(seed))


def backbone_layers(build, input_shape) -> list[str]:
    """The per-block feature sites of the model ``build`` makes, in network order (shapes only, no weights)."""
    gdef, abstract = nnx.split(nnx.eval_shape(build))
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    feats = jax.eval_shape(lambda st, x: nnx.merge(gdef, st).features(x, layers=True), abstract, x)
    return layer_sites(feats)


def _steps(build, spec, cfg, steps: int, mesh, keep: int, input_shape):
    """The stacked train / eval / feature steps of one run shape (and, for the layer profile, the per-block
    feature step and its sites), and one run's shardings."""
    gdef_t, gdef_e, _, sh, tx = abstract_state(build, lambda p: make_optimizer(cfg.optim, p, steps)[0], mesh)
    objective = task_objective(spec.head, spec.loss, augment=bool(cfg.augment))
    train = jit_train_step(make_stacked_step(gdef_t, objective, tx), sh, mesh, stacked=True)
    layers = tuple(backbone_layers(build, input_shape))
    return (sh, train, make_eval_step(gdef_e, sh, mesh, stacked=True),
            make_feature_step(gdef_e, sh, mesh, tuple(cfg.sites), keep=keep, stacked=True),
            (layers, make_feature_step(gdef_e, sh, mesh, layers, keep=keep, stacked=True,
                                       max_rows=int(cfg.get("layer_rows", 2048)))))


def layer_profile(start: dict, end: dict, layers, seed: int = 0) -> dict:
    """{"layers", "mmd2", "cka", "sigma"}: per block (in ``layers`` order), the exact unbiased MMD^2 (bandwidth:
    the median heuristic on that block's starting features) and linear CKA between one run's probe features
    before and after fine-tuning, on the same rows."""
    out = {"layers": list(layers), "mmd2": [], "cka": [], "sigma": []}
    for name in layers:
        x, y = np.asarray(start[name], np.float32), np.asarray(end[name], np.float32)
        sigma = median_sigma(x, seed=seed)
        out["mmd2"].append(float(mmd(x, y, sigma=sigma)))
        out["cka"].append(float(linear_cka(x, y)))
        out["sigma"].append(sigma)
    return out


def run_finetunes(backbone: str, config, runs: list[Run], task: str, data: dict, probe: np.ndarray, cfg, mesh, *,
                  sigma: dict | None = None, desc: str = "", progress: bool = True,
                  stop: threading.Event | None = None) -> list[dict]:
    """Fine-tune a ``backbone`` (profound_conv, profound_mae, provicnet) of ``config`` on ``task`` once per
    :class:`Run`, all in one stacked step.

    ``data``: {"train", "val", "test"} (:func:`taskdata.make_task_data`): the curves (and so convergence)
    are measured on val, the final metric once on test. ``sigma`` ({site: bandwidth}) is the kernel of
    every MMD^2 of these runs; None: the median heuristic on the first pretrained run's starting probe
    features (the pair's pretrained model), shared by all runs of the call.

    Returns, per run, its val metric and alignment curves (plain Python values), the test metric
    (``final_metric``), the σ used, the paired probe features before and after (for the permutation
    test) and ``diverged_step`` (None, or the first step whose loss
    or gradient was not finite; the run's curves end at its last evaluation before it). ``stop``, when
    set, ends the runs at their next step with :class:`~vfm_align.errors.Stopped`.
    """
    spec = get_task(task, seed=runs[0].seed)
    input_shape = data["train"]["image"].shape[1:]
    steps = int(cfg.steps)
    seeds = [r.seed for r in runs]

    def build_for(seed):
        def build():
            return grid_task_model(backbone, fresh_backbone(backbone, config, seed + 1), task, input_shape, cfg, seed)

        return build

    probe, n_probe = align_probe(probe, len(probe), mesh.size)
    key = (backbone, config, spec.head, spec.loss, spec.num_outputs, input_shape, steps, bool(cfg.augment),
           int(cfg.head_hidden), int(cfg.slice_channel), int(cfg.slice_window), tuple(cfg.sites), n_probe,
           int(cfg.get("layer_rows", 2048)),
           cfg.optim.to_json(sort_keys=True), tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    sh, train_step, eval_step, feature_step, (layers, layer_step) = _COMPILED.get(
        key, lambda: _steps(build_for(seeds[0]), spec, cfg, steps, mesh, n_probe, input_shape))
    profile = bool(cfg.get("layer_profile", True)) and bool(layers)

    make_tx = lambda p: make_optimizer(cfg.optim, p, steps)[0]  # noqa: E731
    states = []
    for r in runs:  # the random initial state of a seed is built once and kept on the host (a pair shares it)
        def fresh(seed=r.seed):  # called at once by the cache, within this iteration
            return jax.device_get(create_state(build_for(seed), make_tx, mesh)[2])

        initial = _INITIAL.get((key, r.seed), fresh)
        state = jax.device_put(initial, sh)  # each run its own copy: the step donates its input
        if r.pretrained is not None:
            state = with_backbone(state, GridFeatures(r.pretrained, backbone), sh)
        states.append(state)
    state = jax.device_put(stack_states(states, seeds), stacked_shardings(sh, mesh))
    del states

    probe_x = global_batch({"x": probe}, mesh)["x"]
    def run_features(state):
        feats = feature_step(state, probe_x)
        return [{s: f[i] for s, f in feats.items()} for i in range(len(runs))]

    start = run_features(state)
    # Each block's probe features before fine-tuning, kept on the host for the layer profile at the end.
    start_layers = jax.device_get(layer_step(state, probe_x)) if profile else None
    if sigma is None:  # the pretrained model's probe features fix the kernel (any run, any seed: the same σ)
        ref = next((i for i, r in enumerate(runs) if r.pretrained is not None), 0)
        sigma = {s: median_sigma(np.asarray(f), seed=0) for s, f in start[ref].items()}
    sigma = {s: float(v) for s, v in sigma.items()}
    monitors = [AlignmentMonitor(None, None, tuple(cfg.sites), num_features=int(cfg.rff_features),
                                 max_rows=int(cfg.max_rows), seed=s, sigma=sigma) for s in seeds]
    for m, f in zip(monitors, start):
        m.bank_features(f)  # each run's starting backbone
    del start
    val_x = global_batch({"x": data["val"]["image"]}, mesh)["x"]
    curves = [{"step": [], "metric": [], "loss": []} for _ in runs]

    def record(done, state, loop):
        outs = np.asarray(jax.device_get(eval_step(state, val_x)))
        for i, (feats, c) in enumerate(zip(run_features(state), curves)):
            if i in loop.diverged:
                continue
            c["step"].append(done)
            c["loss"].append(float(loop.metrics[done - 1]["loss"][i]) if done else float("nan"))
            c["metric"].append(taskdata.evaluate(task, outs[i], data["val"], seed=seeds[i]))
            for k, v in monitors[i].score_features(feats).items():
                c.setdefault(k, []).append(v)

    draws = {s: DrawnBatches(data["train"], int(cfg.batch_size), s) for s in dict.fromkeys(seeds)}
    bsh = stacked_batch_sharding(mesh)

    def batch(step):
        drawn = {s: d.next() for s, d in draws.items()}
        return jax.device_put({k: np.stack([drawn[s][k] for s in seeds]) for k in ("image", "target")}, bsh)

    every = max(1, int(cfg.eval_every))
    loop = train_loop(train_step, state, batch, total=steps, hooks=[Hook(every, record, at_start=True)],
                      log_every=every, stop=stop, stacked=True, desc=desc, progress=progress, leave=False)
    # The final metric, once, on the test split (a diverged run: its last good weights).
    test_outs = np.asarray(jax.device_get(eval_step(loop.state, global_batch({"x": data["test"]["image"]}, mesh)["x"])))
    end_layers = jax.device_get(layer_step(loop.state, probe_x)) if profile else None
    out = []
    for i, (m, feats, c) in enumerate(zip(monitors, run_features(loop.state), curves)):
        post = m.rows(feats)  # paired features before/after for the permutation test (pre = banked)
        out.append({"curve": c, "final_metric": taskdata.evaluate(task, test_outs[i], data["test"], seed=seeds[i]),
                    "final_val_metric": c["metric"][-1], "sigma": sigma, "metric_name": spec.primary,
                    "diverged_step": loop.diverged.get(i),
                    "layer_profile": (layer_profile({n: start_layers[n][i] for n in layers},
                                                    {n: end_layers[n][i] for n in layers}, layers, seeds[i])
                                      if profile else None),
                    "pairs": {s: (np.asarray(m.pre[s]), np.asarray(post[s])) for s in m.sites}})
    return out


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
