"""Pretraining a backbone with one objective on the project's training engine, then saving it.

The step is the engine's functional form (``vfm_align.train.state`` split, jit with explicit
shardings and donation, per-step rng ``fold_in(seed, step)``); only the loss differs from
fine-tuning. The result is a model directory that :func:`vfm_align.load` restores: the backbone of
the family (for ``profound_conv`` the FCMAE is trained and only its ConvNeXt-V2 encoder is saved).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from vfm_align.errors import ConfigError, Stopped
from vfm_align.model_io import read_sidecar, save_model
from vfm_align.study.backbones import ARCHS, PRETRAIN_ARCHS, backbone_config, pretraining_model, saved_backbone
from vfm_align.study.objectives import OBJECTIVE_FAMILIES, make_objective
from vfm_align.train.mesh import global_batch, make_mesh
from vfm_align.train.optim import make_optimizer
from vfm_align.train.state import create_state


def study_mesh(cfg):
    """The study's mesh: ``mesh.devices`` devices (0 = all) as (data, fsdp)."""
    devs = jax.devices()
    n = int(cfg.devices) or len(devs)
    return make_mesh(int(cfg.data), int(cfg.fsdp), devices=devs[:n])


def _step_fn(gdef, objective, tx, seed):
    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])

        def f(params):
            model = nnx.merge(gdef, params, state["rest"])
            loss, metrics = objective(model, batch, rng)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (metrics, rest)), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1},
                {"loss": loss, **metrics})

    return step


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
    family = cfg.backbone
    if OBJECTIVE_FAMILIES.get(cfg.objective, family) != family:
        raise ConfigError(f"objective '{cfg.objective}' trains a '{OBJECTIVE_FAMILIES[cfg.objective]}' backbone, "
                          f"not '{family}'")
    config = backbone_config(family, cfg.model, tuple(data["image"].shape[1:4]))
    mesh = study_mesh(cfg.mesh)
    steps = int(cfg.steps)
    gdef, _, state, sh, tx = create_state(lambda: pretraining_model(family, config, int(cfg.seed)),
                                          lambda p: make_optimizer(cfg.optim, p, steps)[0], mesh)
    from vfm_align.train.mesh import batch_sharding

    step = jax.jit(_step_fn(gdef, make_objective(cfg.objective, cfg.objective_args), tx, int(cfg.seed)),
                   in_shardings=(sh, batch_sharding(mesh)), out_shardings=(sh, None), donate_argnums=0)
    rng = np.random.default_rng(int(cfg.seed))
    bs = int(cfg.batch_size)
    n = len(data["image"])
    curve = []
    bar = tqdm(range(steps), desc=f"pretrain {family}/{cfg.objective}", disable=not progress, leave=False)
    for i in bar:
        if stop is not None and stop.is_set():
            bar.close()
            raise Stopped(f"pretraining {family}/{cfg.objective}")
        idx = rng.choice(n, bs, replace=n < bs)
        batch = global_batch({"image": data["image"][idx], "cancer": data["cancer"][idx]}, mesh)
        state, metrics = step(state, batch)
        if i % max(1, steps // 20) == 0 or i == steps - 1:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            curve.append({"step": i + 1, **m})
            bar.set_postfix(loss=f"{m['loss']:.4f}")
    model = nnx.merge(gdef, state["params"], state["rest"])
    model.eval()
    info = {"objective": cfg.objective, "steps": steps, "curve": curve,
            "trained_arch": PRETRAIN_ARCHS.get(family, ARCHS[family]), "config": cfg.to_dict()}
    return model, config, info


def save_pretrained(family: str, model: nnx.Module, config, out_dir: str, info: dict) -> str:
    """Save the family's backbone part of a trained pretraining model (arch ``ARCHS[family]``) to ``out_dir``."""
    backbone, backbone_cfg = saved_backbone(family, model, config)
    return save_model(backbone, ARCHS[family], backbone_cfg, out_dir, extra={"pretraining": info})
