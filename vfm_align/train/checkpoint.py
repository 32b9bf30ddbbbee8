"""Orbax checkpoints of a run: ``last/`` (the newest, for resume) and ``best/`` (the best validation
score), each a CheckpointManager with async saves. Restores go straight into the target shardings.

Layout: RUN/checkpoints/{last,best}/<step>/{state,meta}; meta is JSON (step, metrics).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from vfm_align.errors import CheckpointError


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


class RunCheckpoints:
    def __init__(self, directory: str, *, best_metric: str, best_mode: str = "max", keep_last: int = 1,
                 async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise CheckpointError(f"best_mode must be 'max' or 'min', got '{best_mode}'")
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        opts = dict(enable_async_checkpointing=async_save, create=True)
        self.last = ocp.CheckpointManager(
            os.path.join(self.directory, "last"), item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, **opts))
        self.best = ocp.CheckpointManager(
            os.path.join(self.directory, "best"), item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: float(m[best_metric]), best_mode=best_mode, **opts))

    def _args(self, state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save_last(self, step: int, state, meta: dict) -> None:
        self.last.save(step, args=self._args(state, meta), force=True)

    def save_best(self, step: int, state, meta: dict, metrics: dict) -> None:
        """Offer a validated state; the manager keeps it only if it beats the current best."""
        if self.best_metric not in metrics:
            raise CheckpointError(f"validation metrics lack '{self.best_metric}' (have {sorted(metrics)})")
        self.best.save(step, args=self._args(state, meta), metrics={k: float(v) for k, v in metrics.items()},
                       force=True)

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def restore(self, target_state, *, which: str = "last", step: int | None = None):
        """(state, meta) restored into the shardings and dtypes of ``target_state``."""
        mgr = self.last if which == "last" else self.best
        step = step if step is not None else (mgr.latest_step() if which == "last" else mgr.best_step())
        if step is None:
            raise CheckpointError(f"{mgr.directory}: no checkpoint to restore")
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target_state)),
                                                        meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()
