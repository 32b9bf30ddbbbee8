"""``vfm-align finetune``: fine-tune a backbone + task head from an ml_collections recipe."""

from __future__ import annotations

import ast
import importlib.util
import json
import os

from vfm_align.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a ProFound / ProViCNet backbone on one of the five tasks",
        description=(
            "Train a backbone + task head with the recipe in --config (a configs/*.py file with get_config(); "
            "'file.py:tiny' passes 'tiny' to it). Override any field with --config.SECTION.KEY=VALUE. The run "
            "directory (run.workdir) receives config.json, metrics.jsonl, checkpoints/{last,best} and the "
            "fine-tuned backbone; re-running the same command resumes from the last checkpoint."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="recipe file, e.g. configs/provicnet_segmentation.py")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, overrides=None)
    p.epilog = "Overrides: --config.SECTION.KEY=VALUE (repeatable), e.g. --config.optim.lr=1e-4 --config.train.steps=200"
    _collect_overrides(p)


def _collect_overrides(p) -> None:
    """Let this subcommand accept free-form ``--config.KEY=VALUE`` flags (ml_collections style).

    argparse cannot declare a family of flags, so the subparser's unknown arguments that belong
    to the family are moved into ``args.overrides``; anything else is still an error.
    """
    original = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = original(args, namespace)
        if ns.overrides is None:
            ns.overrides = []
        rest, i = [], 0
        while i < len(extra):
            a = extra[i]
            if a.startswith("--config."):
                ns.overrides.append(a)
                if "=" not in a and i + 1 < len(extra):
                    ns.overrides.append(extra[i + 1])
                    i += 1
            else:
                rest.append(a)
            i += 1
        return ns, rest

    p.parse_known_args = parse_known_args


def load_config(spec: str, overrides: list[str]):
    """get_config(arg) of a recipe file, with ``--config.a.b=v`` overrides applied and the result locked."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: recipe file not found")
    mod_spec = importlib.util.spec_from_file_location("_vfm_align_recipe", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: no get_config() function")
    cfg = mod.get_config(arg) if arg else mod.get_config()
    i = 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--config."):
            raise ConfigError(f"unexpected argument '{item}' (overrides look like --config.optim.lr=1e-4)")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ConfigError(f"{item}: missing value")
            value, i = overrides[i + 1], i + 1
        set_override(cfg, key, value)
        i += 1
    cfg.lock()
    return cfg


def set_override(cfg, key: str, text: str) -> None:
    """Set ``cfg.<key>`` from text, typed like the current value (bools, numbers, tuples, strings)."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        if part not in node:
            raise ConfigError(f"--config.{key}: no section '{part}'")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"--config.{key}: unknown key (known: {sorted(node.keys())})")
    old = node[leaf]
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--config.{key}: expected true/false, got '{text}'")
        value = text.lower() in ("true", "1")
    elif isinstance(old, str):
        value = text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"--config.{key}: cannot parse '{text}'") from exc
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--config.{key}: {exc}") from exc


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
    last = out["val"][-1] if out["val"] else {}
    print(json.dumps({"workdir": workdir, "best_step": out["best"]["step"], "final_val": last}, indent=1))
    return 0
