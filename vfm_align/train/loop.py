"""The training loop (one for every way the project trains) and ``fit``, the fine-tuning run built on it.

:func:`train_loop` drives a jitted step (``vfm_align.train.step``) and calls hooks between steps:
evaluation, in-loop alignment, checkpoints, a progress bar; it stops on a stop flag and on a
non-finite loss or gradient (the NaN stop). Fine-tuning (:func:`fit`), pretraining and the study's
fine-tunes all run through it. A stacked step (several runs of one shape, see
:func:`~vfm_align.train.step.make_stacked_step`) goes through it too: each run's divergence is
tracked apart and only a loop whose every run has diverged stops.

``fit(cfg, data)`` trains a :class:`~vfm_align.models.task_model.TaskModel` described by ``cfg``
(an ml_collections recipe, see ``configs/``) on in-memory arrays::

    data = {"train": {"image": (N,D,H,W,C), "target": ...}, "val": {...}}

or ``train`` / ``val`` objects from :mod:`vfm_align.train.data` (a cohort through the loader).

Batches are chosen by ``(seed, step)`` alone (a fresh permutation per epoch), the per-step rng is
``fold_in(seed, step)`` and the optimizer state is checkpointed, so a killed run resumed from its
last checkpoint replays exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vfm_align.data.tasks import get_task
from vfm_align.errors import ConfigError, Stopped, VfmAlignError
from vfm_align.models.task_model import TaskModel
from vfm_align.train import mesh as M
from vfm_align.train.checkpoint import RunCheckpoints
from vfm_align.train.data import ArrayBatches, ArrayValidation
from vfm_align.train.monitor import AlignmentMonitor, align_probe
from vfm_align.train.optim import make_optimizer
from vfm_align.train.state import create_state
from vfm_align.train.step import jit_train_step, make_eval_step, make_feature_step, make_train_step, task_objective


class TrainingDiverged(VfmAlignError):
    """A non-finite loss or gradient; the run stopped (``step``: the first bad step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@dataclass
class Hook:
    """``fn(done, state, loop)`` after every ``every``-th step (0: never), after the last step
    (``at_end``) and, for a run that starts at step 0, once before the first step (``at_start``)."""

    every: int
    fn: Callable
    at_start: bool = False
    at_end: bool = True

    def due(self, done: int, total: int) -> bool:
        return (self.every > 0 and done % self.every == 0) or (self.at_end and done == total)


@dataclass
class Loop:
    """What the loop knows so far; hooks read it. ``metrics``: host values per drained step (arrays
    over runs for a stacked step); ``diverged``: first non-finite step per run (key None for one run)."""

    start: int
    total: int
    stacked: bool
    metrics: dict = field(default_factory=dict)
    diverged: dict = field(default_factory=dict)
    seconds: float | None = None  # wall time after the first step (its compile excluded)
    t0: float | None = None
    state: Any = None


def diverged_message(step: int, m: dict) -> str:
    return f"non-finite training loss or gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']})"


def train_loop(step_fn, state, batch_fn, *, total: int, start: int = 0, hooks=(), log_every: int = 1,
               on_metrics=None, on_diverged=None, stop=None, stop_after: int | None = None, stacked: bool = False,
               desc: str = "", progress: bool = True, leave: bool = True, postfix=None) -> Loop:
    """Run steps ``start`` .. ``total - 1`` of ``step_fn(state, batch_fn(step)) -> (state, metrics)``.

    Metrics stay on the device until a hook is due or every ``log_every`` steps; then they are read
    once, checked and handed to ``on_metrics(step, metrics)``. NaN stop: a non-finite value of one run
    calls ``on_diverged(step, metrics)`` (default: raise :class:`TrainingDiverged`); a stacked step
    freezes that run on the device (``metrics["active"]``) and the loop only stops when every run has
    diverged. ``stop`` (a threading.Event), when set, ends the loop at its next step with ``Stopped``;
    ``stop_after`` ends it after that many steps (a simulated kill, for tests). Returns the :class:`Loop`.
    """
    loop = Loop(start=start, total=total, stacked=stacked, state=state)
    pending = []

    def drain():
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host):
            if stacked:
                m = {k: np.asarray(v) for k, v in m.items()}
                for r in np.nonzero(~m["active"])[0]:
                    loop.diverged.setdefault(int(r), s)
            else:
                m = {k: float(v) for k, v in m.items()}
                if not all(math.isfinite(v) for v in m.values()):
                    loop.diverged[None] = s
                    pending.clear()
                    if on_diverged is None:
                        raise TrainingDiverged(diverged_message(s, m) + "; stopped", step=s)
                    on_diverged(s, m)
                    return
            loop.metrics[s] = m
            if on_metrics is not None:
                on_metrics(s, m)
        pending.clear()

    def all_diverged():
        return len(loop.diverged) == (int(state["active"].shape[0]) if stacked else 1)

    if start == 0:
        for h in hooks:
            if h.at_start:
                h.fn(0, state, loop)
    bar = tqdm(range(start, total), initial=start, total=total, unit="step", disable=not progress, desc=desc,
               leave=leave)
    try:
        for s in bar:
            if stop is not None and stop.is_set():
                raise Stopped(desc or f"training at step {s}")
            state, metrics = step_fn(state, batch_fn(s))
            loop.state = state
            pending.append((s, metrics))
            if s == start:
                jax.block_until_ready(state)
                loop.t0 = time.perf_counter()  # throughput excludes the compile of the first step
            done = s + 1
            due = [h for h in hooks if h.due(done, total)]
            if due or done % log_every == 0:
                drain()
                if loop.diverged and (not stacked or all_diverged()):
                    break
                if progress and s in loop.metrics:
                    bar.set_postfix(postfix(loop, s) if postfix else {"loss": np.round(loop.metrics[s]["loss"], 4)})
            for h in due:
                h.fn(done, state, loop)
            if stop_after is not None and done >= stop_after:
                break
        drain()
        jax.block_until_ready(state)
        if loop.t0 is not None:
            loop.seconds = time.perf_counter() - loop.t0
    finally:
        bar.close()
    loop.state = state
    return loop


def load_backbone(cfg):
    """The pretrained backbone of ``cfg.model.pretrained`` (a model directory), or None."""
    if not cfg.model.get("pretrained"):
        return None
    from vfm_align.model_io import load

    return load(cfg.model.pretrained)


def build_task_model(cfg, input_shape):
    """A fresh backbone from the registry + the head for ``cfg.task.name``."""
    from flax import nnx

    from vfm_align.models.registry import build_model

    m = cfg.model
    backbone = build_model(m.arch, dict(m.config), rngs=nnx.Rngs(cfg.run.seed))
    return TaskModel(backbone, task=cfg.task.name, family=m.family, input_shape=input_shape,
                     num_outputs=int(cfg.task.num_outputs), head_hidden=int(m.head_hidden),
                     feature_site=m.get("feature_site") or None, freeze_backbone=bool(m.freeze_backbone),
                     slice_channel=int(m.slice_channel), slice_window=int(m.slice_window),
                     slice_size=m.get("slice_size") or None, remat=bool(cfg.train.get("remat", False)),
                     rngs=nnx.Rngs(cfg.run.seed + 1))


class _Logger:
    """Metrics to RUN/metrics.jsonl (and TensorBoard when tensorboardX is installed)."""

    def __init__(self, workdir):
        self.fh = open(os.path.join(workdir, "metrics.jsonl"), "a") if jax.process_index() == 0 else None
        self.tb = None
        if self.fh is not None:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, step, split, values):
        if self.fh is None:
            return
        self.fh.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _predict(eval_fn, state, images, batch, mesh):
    """Eval-mode predictions for all rows; the last batch is padded to the mesh-divisible size."""
    n = images.shape[0]
    outs = []
    for i in range(0, n, batch):
        x = images[i:i + batch]
        pad = batch - x.shape[0]
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
        outs.append(eval_fn(state, M.global_batch({"x": x[M.process_rows(batch)]}, mesh)["x"]))
    if jax.process_count() > 1:  # every host scores the whole split
        from jax.experimental import multihost_utils

        outs = [multihost_utils.process_allgather(o, tiled=True) for o in outs]
    return np.concatenate([np.asarray(jax.device_get(o)) for o in outs])[:n]


def fit(cfg, data, *, workdir: str | None = None, build=None, stop_after: int | None = None, progress: bool = True):
    """Train; returns a summary dict. ``stop_after`` ends the process early (a simulated kill, for tests).

    Summary: {"losses": {step: loss}, "val": [...], "align": [...], "best": {...}, "state": final state,
    "shardings": ...}. A non-finite loss or gradient raises :class:`TrainingDiverged` naming the step and
    the last good checkpoint (checkpoints are only written after the step's metrics are checked).
    """
    workdir = os.path.abspath(workdir or cfg.run.workdir)
    os.makedirs(workdir, exist_ok=True)
    t = cfg.train
    task = get_task(cfg.task.name)
    kind = task.head
    seed = int(cfg.run.seed)
    gbatch = int(t.batch_size)
    if "train" not in data or "val" not in data:
        raise ConfigError("data needs a 'train' and a 'val' entry")
    train = data["train"] if hasattr(data["train"], "batch") else ArrayBatches(data["train"], gbatch, seed)
    val = data["val"] if hasattr(data["val"], "evaluate") else ArrayValidation(data["val"], kind)
    mesh = M.make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp))
    if gbatch % mesh.size:
        raise ConfigError(f"train.batch_size {gbatch} must be divisible by the {mesh.size} devices of the mesh")
    if build is None:
        build = lambda: build_task_model(cfg, train.input_shape)  # noqa: E731
    total = int(t.steps)
    compute_dtype = jnp.dtype(t.compute_dtype)
    with jax.set_mesh(mesh):
        sched = None

        def make_tx(params):
            nonlocal sched
            tx, sched = make_optimizer(cfg.optim, params, total, freeze_backbone=bool(cfg.model.freeze_backbone))
            return tx

        gdef, gdef_eval, state, sh, tx = create_state(build, make_tx, mesh, min_size=int(cfg.mesh.fsdp_min_size),
                                                      backbone=load_backbone(cfg))
        objective = task_objective(kind, cfg.task.get("loss") or task.loss, augment=bool(t.augment),
                                   compute_dtype=compute_dtype)
        step_fn = jit_train_step(make_train_step(gdef, objective, tx, seed=seed, compute_dtype=compute_dtype),
                                 sh, mesh)
        eval_fn = make_eval_step(gdef_eval, sh, mesh, compute_dtype)

        monitor = None
        a = cfg.align
        if int(a.every) > 0:
            probe, n_probe = align_probe(val.images, int(a.probe_cases), mesh.size)
            monitor = AlignmentMonitor(make_feature_step(gdef_eval, sh, mesh, tuple(a.sites), keep=n_probe),
                                       M.global_batch({"x": probe}, mesh)["x"], a.sites,
                                       num_features=int(a.num_features), max_rows=int(a.max_rows), seed=seed)
            monitor.bank(state)  # the pretrained features, before any update or restore

        primary = val.primary
        ckpts = RunCheckpoints(os.path.join(workdir, "checkpoints"), best_metric=primary, best_mode="max",
                               async_save=bool(t.async_checkpoint))
        start = 0
        if ckpts.latest_step() is not None:
            state, meta = ckpts.restore(state)
            start = int(meta["step"])
        log = _Logger(workdir)
        summary = {"losses": {}, "val": [], "align": [], "start_step": start, "timing": {}}
        t_align = 0.0

        def on_metrics(s, m):
            summary["losses"][s] = m["loss"]
            log.write(s, "train", {**m, "lr": float(sched(s // int(cfg.optim.grad_accum)))})

        def on_diverged(s, m):
            ckpts.wait()
            raise TrainingDiverged(f"{diverged_message(s, m)}; stopped; the last good checkpoint is "
                                   f"{ckpts.latest_step()} in {ckpts.directory}/last", step=s)

        def align(done, state, loop):
            nonlocal t_align
            ta = time.perf_counter()
            scores = monitor(state)
            t_align += time.perf_counter() - ta
            summary["align"].append({"step": done, **scores})
            log.write(done, "align", scores)

        def evaluate(done, state, loop):
            vm = val.evaluate(_predict(eval_fn, state, val.images, gbatch, mesh))
            summary["val"].append({"step": done, **vm})
            log.write(done, "val", vm)
            if math.isfinite(vm[primary]):
                ckpts.save_best(done, state, {"step": done}, vm)

        def postfix(loop, s):
            rate = (s - loop.start) * gbatch / max(time.perf_counter() - loop.t0, 1e-9)
            return {"loss": f"{loop.metrics[s]['loss']:.4f}", "img_s": f"{rate:.2f}"}

        hooks = [Hook(int(a.every), align)] if monitor is not None else []
        hooks += [Hook(int(t.eval_every), evaluate),
                  Hook(int(t.ckpt_every), lambda done, state, loop: ckpts.save_last(done, state, {"step": done}))]
        try:
            loop = train_loop(step_fn, state, lambda s: M.global_batch(train.batch(s), mesh), total=total, start=start,
                              hooks=hooks, log_every=int(t.log_every), on_metrics=on_metrics, on_diverged=on_diverged,
                              stop_after=stop_after, desc=f"finetune {cfg.task.name}", progress=progress,
                              postfix=postfix)
            state = loop.state
            if loop.seconds is not None:
                summary["timing"] = {"seconds": loop.seconds, "align_seconds": t_align, "steps": len(summary["losses"])}
        finally:
            ckpts.wait()
            summary["best"] = {"step": ckpts.best.best_step(), "metric": primary}
            ckpts.close()
            log.close()
        summary["state"] = state
        summary["graphdef"] = gdef_eval
        return summary
