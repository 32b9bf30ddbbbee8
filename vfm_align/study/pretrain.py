"""Pretraining a backbone with one objective on the project's training engine, then saving it.

Training runs on the project's engine (``vfm_align.train``: the jitted step with the
objective of :mod:`vfm_align.study.objectives` in place of a task loss, and the loop with its NaN
stop and stop flag); only the objective differs from fine-tuning. The result is a model directory
that :func:`vfm_align.load` restores: the backbone (for ``profound_conv`` the FCMAE is
trained and only its ConvNeXt-V2 encoder is saved).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from vfm_align.errors import ConfigError
from vfm_align.model_io import read_sidecar, save_model
from vfm_align.study.backbones import ARCHS, PRETRAIN_ARCHS, backbone_config, pretraining_model, saved_backbone
from vfm_align.study.objectives import OBJECTIVE_BACKBONES, make_objective
from vfm_align.train.data import DrawnBatches
from vfm_align.train.loop import TrainingDiverged, diverged_message, train_loop
from vfm_align.train.mesh import global_batch, make_mesh
from vfm_align.train.optim import make_optimizer
from vfm_align.train.state import create_state
from vfm_align.train.step import jit_train_step, make_train_step


def study_mesh(cfg):
    """The study's mesh: ``mesh.devices`` devices (0 = all) as (data, fsdp)."""
    devs = jax.devices()
    n = int(cfg.devices) or len(devs)
    return make_mesh(int(cfg.data), int(cfg.fsdp), devices=devs[:n])


def pretrain(cfg, data: dict[str, np.ndarray], out_dir: str, *, progress: bool = True, stop=None) -> dict:
    """Pretrain ``cfg.backbone`` with ``cfg.objective`` on ``data`` ("image" (N,D,H,W,3), "cancer" (N,D,H,W)).

    Writes the model directory ``out_dir`` (skipped when it already holds a finished model) and
    returns its sidecar ``extra`` (loss curve, config). ``stop`` (a threading.Event): see run_pretraining.
    """
    if os.path.isdir(out_dir):
        return read_sidecar(out_dir).get("pretraining", {})
    model, config, info = run_pretraining(cfg, data, progress=progress, stop=stop)
    save_pretrained(cfg.backbone, model, config, out_dir, info)
    return info


def run_pretraining(cfg, data: dict[str, np.ndarray], *, progress: bool = True, stop=None):
    """The training part of :func:`pretrain`: (trained pretraining model in eval mode, its config, info dict).

    The model is what the objective trains (for ``profound_conv`` the whole FCMAE, decoder included).
    ``stop``, when set (another run failed, or the study was interrupted), ends it early with ``Stopped``.
    """
    backbone = cfg.backbone
    if OBJECTIVE_BACKBONES.get(cfg.objective, backbone) != backbone:
        raise ConfigError(f"objective '{cfg.objective}' trains a '{OBJECTIVE_BACKBONES[cfg.objective]}' backbone, "
                          f"not '{backbone}'")
    config = backbone_config(backbone, cfg.model, tuple(data["image"].shape[1:4]))
    mesh = study_mesh(cfg.mesh)
    steps = int(cfg.steps)
    gdef, _, state, sh, tx = create_state(lambda: pretraining_model(backbone, config, int(cfg.seed)),
                                          lambda p: make_optimizer(cfg.optim, p, steps)[0], mesh)
    objective = make_objective(cfg.objective, cfg.objective_args)
    step = jit_train_step(make_train_step(gdef, objective, tx, seed=int(cfg.seed)), sh, mesh)
    draws = DrawnBatches(data, int(cfg.batch_size), int(cfg.seed), keys=("image", "cancer"))
    every = max(1, steps // 20)
    curve = []
    name = f"pretraining {backbone}/{cfg.objective}"

    def record(s, m):  # the curve keeps every ``every``-th step from the first, and the last
        if s % every == 0 or s == steps - 1:
            curve.append({"step": s + 1, **m})

    def diverged(s, m):
        raise TrainingDiverged(f"{name}: {diverged_message(s, m)}; stopped (nothing was saved)", step=s)

    loop = train_loop(step, state, lambda s: global_batch(draws.next(), mesh), total=steps, log_every=every,
                      on_metrics=record, on_diverged=diverged, stop=stop, desc=name, progress=progress, leave=False)
    state = loop.state
    model = nnx.merge(gdef, state["params"], state["rest"])
    model.eval()
    info = {"objective": cfg.objective, "steps": steps, "curve": curve,
            "trained_arch": PRETRAIN_ARCHS.get(backbone, ARCHS[backbone]), "config": cfg.to_dict()}
    return model, config, info


def save_pretrained(backbone: str, model: nnx.Module, config, out_dir: str, info: dict) -> str:
    """Save the backbone part of a trained pretraining model (arch ``ARCHS[backbone]``) to ``out_dir``."""
    module, module_cfg = saved_backbone(backbone, model, config)
    return save_model(module, ARCHS[backbone], module_cfg, out_dir, extra={"pretraining": info})
