"""The fine-tuning loop: mesh, born-sharded state, jitted steps, validation, checkpoints, alignment.

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

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vfm_align.errors import ConfigError, VfmAlignError
from vfm_align.models.task_model import TaskModel, task_kind
from vfm_align.train import mesh as M
from vfm_align.train.checkpoint import RunCheckpoints
from vfm_align.train.data import ArrayBatches, ArrayValidation, batch_indices  # noqa: F401 (re-exported)
from vfm_align.train.monitor import AlignmentMonitor
from vfm_align.train.optim import make_optimizer
from vfm_align.train.state import create_state
from vfm_align.train.losses import DEFAULT_LOSS  # noqa: F401 (re-exported)
from vfm_align.train.step import jit_train_step, make_eval_step, make_feature_step, make_train_step, task_loss


class TrainingDiverged(VfmAlignError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


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
                     slice_size=m.get("slice_size") or None, rngs=nnx.Rngs(cfg.run.seed + 1))


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
    "shardings": ...}.
    """
    workdir = os.path.abspath(workdir or cfg.run.workdir)
    os.makedirs(workdir, exist_ok=True)
    t = cfg.train
    kind = task_kind(cfg.task.name)
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
        loss_fn = task_loss(kind, cfg.task.get("loss") or DEFAULT_LOSS[kind])
        step_fn = jit_train_step(make_train_step(gdef, loss_fn, tx, kind=kind, seed=seed, augment=bool(t.augment),
                                                 compute_dtype=compute_dtype), sh, mesh)
        eval_fn = make_eval_step(gdef_eval, sh, mesh, compute_dtype)

        monitor = None
        a = cfg.align
        if int(a.every) > 0:
            probe = val.images[: int(a.probe_cases)]
            probe = probe[: (len(probe) // mesh.size) * mesh.size]
            if len(probe) == 0:
                raise ConfigError(f"align.probe_cases must give at least {mesh.size} validation cases")
            monitor = AlignmentMonitor(make_feature_step(gdef_eval, sh, mesh, tuple(a.sites)),
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
        pending = []
        bar = tqdm(range(start, total), initial=start, total=total, unit="step", disable=not progress,
                   desc=f"finetune {cfg.task.name}")
        t_align = 0.0
        t0 = None

        def drain():
            for s, mdev in pending:
                m = {k: float(v) for k, v in jax.device_get(mdev).items()}
                if not all(math.isfinite(v) for v in m.values()):
                    ckpts.wait()
                    raise TrainingDiverged(
                        f"non-finite training loss or gradient at step {s} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
                        f"stopped; the last good checkpoint is {ckpts.latest_step()} in {ckpts.directory}/last")
                summary["losses"][s] = m["loss"]
                log.write(s, "train", {**m, "lr": float(sched(s // int(cfg.optim.grad_accum)))})
            pending.clear()

        try:
            for s in bar:
                batch = M.global_batch(train.batch(s), mesh)
                state, metrics = step_fn(state, batch)
                pending.append((s, metrics))
                if s == start:
                    jax.block_until_ready(state)
                    t0 = time.perf_counter()  # throughput excludes the compile of the first step
                done = s + 1
                if done % int(t.log_every) == 0 or done == total:
                    drain()
                    if progress and summary["losses"]:
                        el = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{summary['losses'][s]:.4f}",
                                        img_s=f"{(done - start - 1) * gbatch / max(el, 1e-9):.2f}")
                if monitor is not None and (done % int(a.every) == 0 or done == total):
                    drain()
                    ta = time.perf_counter()
                    scores = monitor(state)
                    t_align += time.perf_counter() - ta
                    summary["align"].append({"step": done, **scores})
                    log.write(done, "align", scores)
                if done % int(t.eval_every) == 0 or done == total:
                    drain()
                    vm = val.evaluate(_predict(eval_fn, state, val.images, gbatch, mesh))
                    summary["val"].append({"step": done, **vm})
                    log.write(done, "val", vm)
                    if math.isfinite(vm[primary]):
                        ckpts.save_best(done, state, {"step": done}, vm)
                if done % int(t.ckpt_every) == 0 or done == total:
                    drain()
                    ckpts.save_last(done, state, {"step": done})
                if stop_after is not None and done >= stop_after:
                    break
            drain()
            jax.block_until_ready(state)
            if t0 is not None:
                summary["timing"] = {"seconds": time.perf_counter() - t0, "align_seconds": t_align,
                                     "steps": len(summary["losses"])}
        finally:
            bar.close()
            ckpts.wait()
            summary["best"] = {"step": ckpts.best.best_step(), "metric": primary}
            ckpts.close()
            log.close()
        summary["state"] = state
        summary["graphdef"] = gdef_eval
        return summary
