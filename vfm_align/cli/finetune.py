"""``vfm-align finetune``: fine-tune a backbone + task head from an ml_collections recipe."""

from __future__ import annotations

import json
import os

from vfm_align.cli import accept_config_overrides
from vfm_align.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a ProFound / ProViCNet backbone on one of the five tasks",
        description=(
            "Train a backbone + task head with the recipe in --config (a configs/*.py file with get_config(); "
            "'file.py:ARG' passes ARG to it: configs/finetune.py:BACKBONE,TASK[,tiny], found from any directory). "
            "Override any field with --config.SECTION.KEY=VALUE. The run "
            "directory (run.workdir) receives config.json, metrics.jsonl, checkpoints/{last,best}, the fine-tuned "
            "backbone (backbone/) and the whole task model (model/: backbone + head from the best checkpoint, "
            "self-contained, for vfm-align infer and vfm_align.load); re-running the same command resumes from "
            "the last checkpoint."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="recipe, e.g. configs/finetune.py:provicnet,segmentation or configs/finetune.py:profound_conv,"
                        "detection,tiny (backbones: profound_conv, profound_mae, provicnet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    p.epilog = (
        "Overrides: --config.SECTION.KEY=VALUE (repeatable), e.g. --config.optim.lr=1e-4 --config.train.steps=200"
    )
    accept_config_overrides(p)


def cohort_data(cfg):
    """Train batches and the validation set of ``cfg.data.root`` (a manifest) for ``cfg.task``."""
    import jax

    from vfm_align.data.cache import PreprocessCache
    from vfm_align.data.cohort import read_manifest
    from vfm_align.data.loader import Loader
    from vfm_align.data.tasks import get_task
    from vfm_align.train.data import CohortBatches, CohortValidation

    if not cfg.data.root:
        raise ConfigError("data.root is empty: pass --config.data.root=PATH/manifest.csv "
                          "(a synthetic cohort can be made with the phantom generator)")
    cohort = read_manifest(cfg.data.root)
    cache = PreprocessCache(cfg.data.cache or os.path.join(os.path.dirname(os.path.abspath(cfg.data.root)), ".cache"))
    cohort = cache.build(cohort)
    task = get_task(cfg.task.name)
    per_proc = int(cfg.train.batch_size) // jax.process_count()
    shape = tuple(cfg.data.shape)
    train = Loader(cohort.split("train"), cache, task, batch_size=per_proc, seed=int(cfg.run.seed), train=True,
                   shape=shape)
    val = Loader(cohort.split("val"), cache, task, batch_size=per_proc, train=False, shape=shape)
    return task, {"train": CohortBatches(train), "val": CohortValidation(val, task)}


def run(args) -> int:
    from flax import nnx

    from vfm_align.model_io import save_model
    from vfm_align.models.registry import config_from_dict
    from vfm_align.train.loop import fit

    if os.environ.get("VFM_ALIGN_DISTRIBUTED"):
        import jax

        jax.distributed.initialize()  # multi-host: coordinator and process ids from the runtime
    from vfm_align.config_file import load_config

    cfg = load_config(args.config, args.overrides)
    task, data = cohort_data(cfg)
    with cfg.unlocked():
        cfg.task.num_outputs = task.num_outputs
    workdir = os.path.abspath(cfg.run.workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(cfg.to_json_best_effort(indent=1))
    out = fit(cfg, data, workdir=workdir, progress=not args.no_progress)
    model = nnx.merge(out["graphdef"], out["state"]["params"], out["state"]["rest"])
    if cfg.model.pretrained:
        from vfm_align.model_io import read_sidecar

        side = read_sidecar(cfg.model.pretrained)
        arch, bcfg = side["arch"], config_from_dict(side["arch"], side["config"])
    else:
        arch, bcfg = cfg.model.arch, config_from_dict(cfg.model.arch, dict(cfg.model.config))
    save_model(model.backbone, arch, bcfg, os.path.join(workdir, "backbone"), overwrite=True,
               extra={"finetuned": {"task": cfg.task.name, "steps": int(cfg.train.steps)}})
    import jax

    exported = None
    if jax.process_count() == 1:  # the export restores the run's checkpoint on one device
        from vfm_align.infer.loading import export_task_model

        exported = export_task_model(workdir)
    last = out["val"][-1] if out["val"] else {}
    print(json.dumps({"workdir": workdir, "model": exported, "best_step": out["best"]["step"], "final_val": last},
                     indent=1))
    return 0
