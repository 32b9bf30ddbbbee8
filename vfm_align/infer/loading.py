"""Any model directory -> what inference needs: the module, its task, window size and preprocessing recipe.

Three kinds of directory are recognised:

* a converted ProFound model (``vfm-align convert``): ``profound_conv_upernet`` (1 output: lesion
  likelihood, sigmoid -> detection; more: anatomy classes, softmax -> segmentation) or
  ``profound_conv_cls`` (softmax -> classification). Recipe "profound_reference" (64x224x224 windows);
* a converted ProViCNet per-sequence or fusion model (``provicnet``, ``provicnet_fusion``);
* a fine-tuning run directory of ``vfm-align finetune`` (``config.json`` + ``checkpoints/``), or its
  exported ``backbone/`` inside it: the task model (backbone + head) is rebuilt from the recipe and
  restored from the best checkpoint (the last one when no validation ran). Recipe "finetune_cache"
  (the preprocessing cache's recipe: RAS+ reorientation, non-zero z-score), windows of ``data.shape``;
* an exported task model (arch ``task_model``, ``<run>/model`` written by ``vfm-align finetune`` or
  :func:`export_task_model`): the same weights, self-contained; its sidecar holds the task, the window
  and the recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from vfm_align.errors import CheckpointError, ConfigError

VOLUME_ARCHS = ("profound_conv_upernet", "profound_conv_cls")
PROVICNET_ARCHS = ("provicnet", "provicnet_fusion")


@dataclasses.dataclass
class InferenceModel:
    path: str
    arch: str  # the registry name (for a fine-tuned model: its backbone's)
    task: str  # classification | segmentation | detection | super_resolution | distortion_correction
    module: object  # the nnx module (fine-tuned: the TaskModel)
    recipe: str  # "profound_reference", "finetune_cache" or "provicnet_reference"
    roi: tuple | None  # window (D, H, W) of a volume model
    activation: str  # "softmax", "sigmoid" or "none", applied to the model's outputs
    identity: str  # sha256 of what defines the weights (sidecar / config text and checkpoint step)
    finetuned: bool = False
    # compiled-function caches filled by vfm_align.infer.volume (one compile per model, reused across cases)
    _predict: object = dataclasses.field(default=None, repr=False, compare=False)
    _jit: object = dataclasses.field(default=None, repr=False, compare=False)


def _sha(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _run_dir(path: str) -> str | None:
    """The fine-tuning run directory ``path`` is, or holds the exported backbone of; None otherwise."""
    for cand in (path, os.path.dirname(path)):
        if os.path.isfile(os.path.join(cand, "config.json")) and os.path.isdir(os.path.join(cand, "checkpoints")):
            return cand
    return None


def load_for_inference(path: str | os.PathLike) -> InferenceModel:
    from vfm_align.model_io import SIDECAR, load, read_sidecar
    from vfm_align.models.task_model import TASK_MODEL_ARCH

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model directory not found")
    exported = os.path.isfile(os.path.join(path, SIDECAR)) and read_sidecar(path).get("arch") == TASK_MODEL_ARCH
    run = None if exported else _run_dir(path)
    if run is not None:
        return _load_run(run)
    meta = read_sidecar(path)
    arch = meta.get("arch")
    with open(os.path.join(path, SIDECAR)) as fh:
        text = fh.read()
    if arch == TASK_MODEL_ARCH:
        return _load_exported(path, meta, text)
    if "finetuned" in meta:
        raise CheckpointError(f"{path}: a fine-tuned backbone without its task head; pass the fine-tuning run "
                              "directory (it holds config.json and checkpoints/) or its exported model/")
    if arch == "profound_conv_upernet":
        out = int(meta["config"].get("out_channels", 1))
        task, act = ("detection", "sigmoid") if out == 1 else ("segmentation", "softmax")
        from vfm_align.data.preprocess_profound import PROFOUND_CROP

        return InferenceModel(path, arch, task, load(path), "profound_reference", PROFOUND_CROP, act, _sha(text))
    if arch == "profound_conv_cls":
        from vfm_align.data.preprocess_profound import PROFOUND_CROP

        return InferenceModel(path, arch, "classification", load(path), "profound_reference", PROFOUND_CROP,
                              "softmax", _sha(text))
    if arch in PROVICNET_ARCHS:
        return InferenceModel(path, arch, "detection", load(path), "provicnet_reference", None, "softmax", _sha(text))
    raise ConfigError(f"{path}: a '{arch}' model has no task head to infer with; give a segmenter, a classifier, "
                      f"ProViCNet or a fine-tuning run directory (known heads: {VOLUME_ARCHS + PROVICNET_ARCHS})")


def restore_run(run: str):
    """(run config, task model, "best" | "last", step, config.json text) of a fine-tuning run directory: the
    model rebuilt from the recipe and restored from the best checkpoint (the last one when no validation ran)."""
    import jax
    import ml_collections as mlc
    from flax import nnx

    from vfm_align.data.tasks import get_task
    from vfm_align.train import mesh as M
    from vfm_align.train.checkpoint import RunCheckpoints
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.state import abstract_state

    with open(os.path.join(run, "config.json")) as fh:
        text = fh.read()
    try:
        cfg = mlc.ConfigDict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{run}/config.json: corrupt run config ({exc})") from exc
    roi = tuple(int(s) for s in cfg.data.shape)
    mesh = M.make_mesh(1, 1, devices=jax.devices()[:1])

    def make_tx(params):
        return make_optimizer(cfg.optim, params, int(cfg.train.steps),
                              freeze_backbone=bool(cfg.model.freeze_backbone))[0]

    _, gdef_eval, abstract, sh, _ = abstract_state(lambda: build_task_model(cfg, (*roi, 3)), make_tx, mesh,
                                                   min_size=int(cfg.mesh.fsdp_min_size))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)

    ckpts = RunCheckpoints(os.path.join(run, "checkpoints"), best_metric=get_task(cfg.task.name).primary)
    try:
        which = "best" if ckpts.best.best_step() is not None else "last"
        state, meta = ckpts.restore(target, which=which)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{run}: cannot restore the fine-tuned model ({type(exc).__name__}: {exc})") from exc
    finally:
        ckpts.close()
    return cfg, nnx.merge(gdef_eval, state["params"], state["rest"]), which, meta.get("step"), text


def _activation(task: str) -> str:
    from vfm_align.data.tasks import get_task

    return {"label": "softmax", "dense": "softmax", "restore": "none"}[get_task(task).head]


def _load_run(run: str) -> InferenceModel:
    cfg, module, which, step, text = restore_run(run)
    roi = tuple(int(s) for s in cfg.data.shape)
    task = cfg.task.name
    return InferenceModel(run, cfg.model.arch, task, module, "finetune_cache", roi, _activation(task),
                          _sha(text, which, str(step)), finetuned=True)


def export_task_model(run: str, out_dir: str | None = None, *, overwrite: bool = True) -> str:
    """Write the fine-tuned task model of ``run`` (backbone + head, the weights ``vfm-align infer`` uses: best
    checkpoint, else last) as a self-contained model directory (default ``<run>/model``): ``vfm_align.load``
    rebuilds it from its sidecar (arch ``task_model``: backbone arch and config, head settings), which also
    records the task, the input window and the preprocessing recipe inference must apply."""
    from vfm_align.infer.volume import finetune_recipe
    from vfm_align.model_io import save_model
    from vfm_align.models.task_model import TASK_MODEL_ARCH, task_model_config

    run = os.path.abspath(run)
    cfg, module, which, step, _ = restore_run(run)
    shape = (*(int(s) for s in cfg.data.shape), 3)
    config = task_model_config(module, cfg.model.arch, dict(cfg.model.config), cfg.task.name, shape,
                               int(cfg.task.num_outputs), int(cfg.model.head_hidden))
    extra = {"task": cfg.task.name, "preprocessing": finetune_recipe(),
             "finetuned": {"run": run, "checkpoint": which, "step": step, "steps": int(cfg.train.steps)}}
    return save_model(module, TASK_MODEL_ARCH, config, out_dir or os.path.join(run, "model"), extra=extra,
                      overwrite=overwrite)


def _load_exported(path: str, meta: dict, text: str) -> InferenceModel:
    from vfm_align.infer.volume import finetune_recipe
    from vfm_align.model_io import load

    recipe = (meta.get("preprocessing") or {}).get("name")
    if recipe != finetune_recipe()["name"]:
        raise CheckpointError(f"{path}: exported task model with preprocessing recipe '{recipe}'; this version "
                              f"applies '{finetune_recipe()['name']}'")
    module = load(path)  # checks the sidecar's config (a TaskModelConfig) against the stored arrays
    from vfm_align.models.registry import config_from_dict
    from vfm_align.models.task_model import TASK_MODEL_ARCH

    cfg = config_from_dict(TASK_MODEL_ARCH, meta["config"])
    return InferenceModel(path, cfg.backbone_arch, cfg.task, module, "finetune_cache",
                          tuple(int(s) for s in cfg.input_shape[:3]), _activation(cfg.task), _sha(text),
                          finetuned=True)
