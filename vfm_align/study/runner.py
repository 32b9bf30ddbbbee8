"""The transfer study: every (backbone, task) fine-tuned from pretrained and from random weights.

The design (stated in results.json's ``design`` section): each objective pretrains on its own cohort
(by default the phantom drawn with another seed; ``cohort.pretrain_manifest`` for real data), never
overlapping the fine-tuning cohort; the fine-tuning cohort keeps train / val / test, val drives the
evaluation curves and convergence and the final metric is measured once on test. Alignment (MMD^2,
CKA) compares the backbone's features on held-out probe cases (val, then test) before and after
fine-tuning, with the kernel bandwidth fixed once per (backbone, task) from the pretrained model's
probe features. Each (backbone, task) pair is fine-tuned from both initialisations and
``cfg.finetune.seeds`` seeds (seed, seed + 1, ...) as stacked runs: groups of ``cfg.finetune.stack``
runs (0, the default: all of the pair's) train as one compiled step. Each (backbone, task, init, seed)
result is written atomically to ``runs/`` as its group completes, so an interrupted study resumes
where it stopped; ``study_record.json`` records the config and cohorts, so a resume with anything
changed refuses (naming the keys) or, with ``overwrite``, recomputes what depends on them.
``cfg.workers`` groups (and pretrainings) run at a time, in threads; the results do not depend on it.
The statistics are those of :func:`vfm_align.study.stats.analyse`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from rich.console import Console

from vfm_align import model_io
from vfm_align.align.permutation import mmd_test
from vfm_align.atomic import atomic_file, write_json
from vfm_align.data.tasks import get_task
from vfm_align.errors import ConfigError, Stopped
from vfm_align.models.registry import config_from_dict
from vfm_align.study import taskdata
from vfm_align.study.cohorts import (
    check_disjoint,
    choose_probe_cases,
    count_params,
    describe_cohort,
    design_section,
    make_pretraining_phantom,
)
from vfm_align.study.design import check_resume
from vfm_align.study.finetune import Run, run_finetunes, steps_to_fraction
from vfm_align.study.pretrain import pretrain, study_mesh
from vfm_align.study.stats import analyse, describe_finding
from vfm_align.train.recipes import BACKBONES

INITS = ("pretrained", "random")


def cohort_sources(cfg) -> dict:
    """{"finetune", "pretrain"}: each cohort's manifest path, or the recipe of the phantom generated for it."""
    c = cfg.cohort
    shape = [int(v) for v in c.shape]
    fine = c.manifest or {"generator": "phantom", "cases": int(c.cases), "shape": shape, "seed": int(cfg.seed)}
    pre = c.get("pretrain_manifest") or {"generator": "phantom", "cases": int(c.get("pretrain_cases", 0) or c.cases),
                                         "shape": shape, "seed": int(cfg.seed) + 1}
    if all(b.get("weights") for b in cfg.backbones) and not c.get("pretrain_manifest"):
        pre = None  # nothing pretrains here: the given weights' own pretraining data is not known to this study
    return {"finetune": fine, "pretrain": pre}


def prepare_cohorts(cfg, out_dir: str, sources: dict) -> tuple[str, str]:
    """(fine-tuning manifest, pretraining manifest): given, or the phantoms generated into ``out_dir``."""
    from vfm_align.data.phantom import make_phantom

    fine, pre = sources["finetune"], sources["pretrain"]
    if isinstance(fine, dict):
        fine = make_phantom(os.path.join(out_dir, "cohort"), fine["cases"], shape=tuple(fine["shape"]),
                            seed=fine["seed"], workers=1, progress=False)
    if isinstance(pre, dict):  # (None: no pretraining cohort)
        pre = make_pretraining_phantom(os.path.join(out_dir, "pretrain_cohort"), pre["cases"],
                                       shape=tuple(pre["shape"]), seed=pre["seed"], finetune_seed=int(cfg.seed))
    return fine, pre


def load(cfg, manifest: str) -> dict:
    c = cfg.cohort
    return taskdata.load_cohort(manifest, crop=tuple(c.crop) if c.get("crop") else None,
                                grid=tuple(c.grid) if c.get("grid") else None,
                                spacing=tuple(c.spacing) if c.get("spacing") else None)


def input_shape(b, config, grid) -> tuple:
    """The (D, H, W) a study backbone fine-tunes on: its ``input_shape`` when set, else the size its model was
    built for (the MAE-ViT's positional table), else the cohort's grid."""
    if b.get("input_shape"):
        return tuple(int(v) for v in b.input_shape)
    fixed = getattr(config, "img_size", None)
    if b.backbone == "profound_mae" and fixed:
        return tuple(int(v) for v in fixed)
    return tuple(grid)


def _backbone_dirs(cfg, pre_manifest, out_dir, console, progress) -> dict:
    """Model directory per backbone: given weights, or pretrained here on the whole pretraining cohort."""
    dirs, todo = {}, []
    for b in cfg.backbones:
        if b.get("weights"):
            dirs[b.name] = b.weights  # a converted or user-pretrained model directory
            continue
        dirs[b.name] = os.path.join(out_dir, "pretrained", b.name)
        if not os.path.isdir(dirs[b.name]):
            todo.append((b,))
    if not todo:
        return dirs
    pre = load(cfg, pre_manifest)  # label-guided objectives see only these cases' masks
    data = {"image": pre["image"], "cancer": (pre["lesion"] > 0).astype(np.int32)}

    def run_one(b, stop):
        console.log(f"pretraining {b.name} ({b.pretrain.backbone}, {b.pretrain.objective}) on "
                    f"{len(data['image'])} pretraining cases")
        pretrain(b.pretrain, data, dirs[b.name], progress=progress, stop=stop)

    run_concurrently(run_one, todo, int(cfg.get("workers", 1)))
    return dirs


def run_key(backbone: str, task: str, init: str, seed: int | None = None) -> str:
    """The run's file name: ``backbone__task__init``, with ``__seed<k>`` for seeds after the study's first."""
    return f"{backbone}__{task}__{init}" + ("" if seed is None else f"__seed{seed}")


def finetune_seeds(cfg) -> list[int]:
    """The fine-tuning seeds of every (backbone, task, init): ``cfg.seed`` and the next ``finetune.seeds - 1``."""
    n = int(cfg.finetune.get("seeds", 1))
    if n < 1:
        raise ConfigError(f"finetune.seeds must be at least 1, got {n}")
    return [int(cfg.seed) + k for k in range(n)]


def _seed_key(cfg, seed: int) -> int | None:
    return None if seed == int(cfg.seed) else seed


def _apply_plan(plan, out_dir: str, sources: dict, console) -> None:
    """Delete the outputs a changed config or cohort made stale (``overwrite``), then record the new config."""
    def rm(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    if plan.fresh or plan.unchanged:
        return
    unknown = any("without a record" in c for c in plan.changes)
    for name, folder in (("finetune", "cohort"), ("pretrain", "pretrain_cohort")):
        # a generated cohort of another recipe (make_phantom refuses to overwrite it)
        if isinstance(sources[name], dict) and (unknown or any(c.startswith(f"cohort {name}") for c in plan.changes)):
            rm(os.path.join(out_dir, folder))
    for b in plan.pretrain:
        rm(os.path.join(out_dir, "pretrained", b))
    for b in plan.finetune:
        for f in glob.glob(os.path.join(out_dir, "runs", f"{glob.escape(b)}__*.json")):
            os.remove(f)
    if plan.summary:
        rm(os.path.join(out_dir, "results.json"))
    console.log("recomputing what depends on: " + "; ".join(plan.changes))
    plan.commit()


def run_study(cfg, out_dir: str, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume) the study described by ``cfg`` into ``out_dir``; returns the results dict.

    A folder holding results of another config or cohort: ConfigError naming the changes, or with
    ``overwrite`` the stale outputs are recomputed (see :mod:`vfm_align.study.design`).
    """
    console = Console(stderr=True, quiet=not progress)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for t in cfg.tasks:
        get_task(t)  # an unknown task fails before any work
    names = [b.name for b in cfg.backbones]
    if len(set(names)) != len(names):
        raise ConfigError(f"backbone names must be unique, got {names}")
    seeds = finetune_seeds(cfg)
    missing = [f"backbones.{i}.weights ({b.name}, {b.backbone})" for i, b in enumerate(cfg.backbones)
               if not b.get("weights")]
    if cfg.get("require_weights") and missing:
        raise ConfigError("this study fine-tunes given weights and pretrains nothing; set " + ", ".join(missing)
                          + " to model directories (vfm-align convert CHECKPOINT --out DIR)")
    sources = cohort_sources(cfg)
    plan = check_resume(out_dir, cfg, {k: v for k, v in sources.items() if v is not None}, overwrite=overwrite)
    _apply_plan(plan, out_dir, sources, console)
    with atomic_file(os.path.join(out_dir, "config.json")) as tmp, open(tmp, "w") as fh:
        fh.write(cfg.to_json_best_effort(indent=1))
    fine_manifest, pre_manifest = prepare_cohorts(cfg, out_dir, sources)
    disjoint = (check_disjoint(pre_manifest, fine_manifest, content=isinstance(sources["finetune"], dict))
                if pre_manifest else {"checked": False, "note": "no pretraining cohort: every backbone was given as "
                                      "weights, whose pretraining data this study cannot see"})
    cohort = load(cfg, fine_manifest)
    dirs = _backbone_dirs(cfg, pre_manifest, out_dir, console, progress)
    mesh = study_mesh(cfg.mesh)
    probe_idx = choose_probe_cases(cohort["case_id"], cohort["split"], num=int(cfg.finetune.probe_cases))
    probe = cohort["image"][probe_idx]
    task_data = {t: taskdata.make_task_data(cohort, t, seed=int(cfg.seed)) for t in cfg.tasks}
    pairs = [(b, t) for b in cfg.backbones for t in cfg.tasks]
    jobs = []
    for k, (b, t) in enumerate(pairs, 1):
        label = f"[{k}/{len(pairs)}]"
        todo = []
        for seed in seeds:
            for init in INITS:
                path = os.path.join(out_dir, "runs", run_key(b.name, t, init, _seed_key(cfg, seed)) + ".json")
                if not os.path.exists(path):
                    todo.append((init, seed, path))
        if todo:
            size = int(cfg.finetune.get("stack", 0)) or len(todo)  # runs per compiled step (0: the whole pair)
            jobs += [(label, b, t, todo[i:i + size]) for i in range(0, len(todo), size)]
        else:
            console.log(f"{label} {b.name} / {t}: done earlier, skipped")
    pair_sigma = {}  # (backbone, task) -> {site: sigma}: one kernel for all of a pair's runs, even across groups

    def run_group(label, b, t, todo, stop):
        meta = model_io.read_sidecar(dirs[b.name])
        config = config_from_dict(meta["arch"], meta["config"])
        pretrained = model_io.load(dirs[b.name])
        sigma = pair_sigma.get((b.name, t)) or _saved_sigma(out_dir, b.name, t)
        if sigma is None and todo[0][0] != "pretrained":
            raise ConfigError(f"{b.name}/{t}: the pair's kernel comes from a pretrained run; "
                              "finetune.stack must keep one in the first group")
        transfer = None  # scored before fine-tuning donates the pretrained weights
        if int(cfg.get("transfer_cases", 0)) and any(i == "pretrained" for i, _, _ in todo):
            transfer = transfer_scores(pretrained, meta["arch"], cohort, t, int(cfg.seed), int(cfg.transfer_cases))
        runs = [Run(pretrained if init == "pretrained" else None, seed) for init, seed, _ in todo]
        data, x_probe = task_data[t], probe
        shape = input_shape(b, config, cohort["image"].shape[1:4])
        if shape != tuple(cohort["image"].shape[1:4]):  # this backbone's input size: centre crop / pad
            data = taskdata.fit_task_data(data, shape)
            x_probe = taskdata.fit_task_data({"probe": {"image": probe}}, shape)["probe"]["image"]
        results = run_finetunes(b.backbone, config, runs, t, data, x_probe, cfg.finetune, mesh, sigma=sigma,
                                desc=f"{label} {b.name}/{t} x{len(runs)}", progress=progress, stop=stop)
        pair_sigma[(b.name, t)] = results[0]["sigma"]
        for (init, seed, path), res in zip(todo, results):
            tests = {}
            for s, (x, y) in res.pop("pairs").items():  # same inputs before/after: swap within pairs
                r = mmd_test(x, y, int(cfg.num_permutations), paired=True, sigma=[res["sigma"][s]],
                             num_features=int(cfg.finetune.rff_features), seed=int(cfg.seed))
                null = np.asarray(r.null, np.float64)
                tests[s] = {"statistic": float(r.statistic), "p_value": float(r.p_value),
                            "num_permutations": int(r.num_permutations), "sigma": float(r.sigmas[0]),
                            "null_q95": float(np.quantile(null, 0.95)), "null_sd": float(null.std())}
            write_json(path, {"backbone": b.name, "model": b.backbone, "family": BACKBONES[b.backbone].family,
                              "task": t, "init": init, "seed": seed, "tests": tests, **res,
                              **({"transfer": transfer} if init == "pretrained" else {})})
            note = "" if res["diverged_step"] is None else f" (diverged at step {res['diverged_step']})"
            console.log(f"{label} {b.name} / {t} / {init} / seed {seed}: test {res['metric_name']} "
                        f"{res['final_metric']:.4f}{note}")

    run_concurrently(run_group, jobs, int(cfg.get("workers", 1)))
    design = design_section(
        pretrain_cohort=_pretrain_description(cfg, pre_manifest), finetune_cohort=describe_cohort(fine_manifest),
        probe_case_ids=[str(cohort["case_id"][i]) for i in probe_idx], seeds=seeds,
        steps={**{f"pretrain[{b.name}]": (0 if b.get("weights") else int(b.pretrain.steps)) for b in cfg.backbones},
               "finetune": int(cfg.finetune.steps), "eval_every": int(cfg.finetune.eval_every)},
        models={b.name: _model_info(dirs[b.name]) for b in cfg.backbones}, sigma={},
        extra={"disjoint_check": disjoint, "final_metric_split": "test", "curve_split": "val"})
    results = summarise(cfg, out_dir, design)
    from vfm_align.study.report import write_report

    write_report(results, out_dir)
    return results


def transfer_scores(model, arch: str, cohort: dict, task_name: str, seed: int, cases: int) -> dict:
    """The transferability scores (LogME, H-score, TransRate, RankMe) of the pretrained model's frozen features
    on the first ``cases`` training cases of the fine-tuning cohort for one task: what could be known before
    fine-tuning (the cap bounds its cost: dense tasks give one row per patch token)."""
    from vfm_align.align.banks import model_feature_fn, task_feature_rows
    from vfm_align.align.transferability import scores_for_task

    task = get_task(task_name, seed=seed)
    fn = model_feature_fn(model, arch, ("pooled", "patch"))
    train = [s for s, sp in zip(cohort["samples"], cohort["split"]) if sp == "train"][:cases]
    rows = [task_feature_rows(model, arch, s, task, fn) for s in train]
    return scores_for_task(np.concatenate([x for x, _ in rows]), np.concatenate([y for _, y in rows]), task.kind)


def _saved_sigma(out_dir, backbone, task):
    """The σ of a pair's finished runs (a resumed pair keeps its kernel)."""
    for f in sorted(glob.glob(os.path.join(out_dir, "runs", f"{glob.escape(backbone)}__{task}__*.json"))):
        with open(f) as fh:
            sigma = json.load(fh).get("sigma")
        if sigma:
            return sigma
    return None


def _pretrain_description(cfg, manifest) -> dict:
    if manifest is None:
        return {"manifest": None, "num_cases": {}, "case_ids": {},
                "note": "none: every backbone was given as weights (their own pretraining data; overlap with the "
                        "fine-tuning cohort cannot be checked here)"}
    d = describe_cohort(manifest)
    if all(b.get("weights") for b in cfg.backbones):
        d["note"] = "not used: every backbone was given as weights"
    return d


def _model_info(model_dir: str) -> dict:
    meta = model_io.read_sidecar(model_dir)
    return {"arch": meta["arch"], "params": count_params(model_io.load(model_dir))}


def run_concurrently(fn, jobs, workers: int) -> None:
    """``fn(*job, stop)`` for every job, ``workers`` at a time in threads, in order of submission.

    Why threads: a fine-tune's steps are small XLA programs that leave much of a multi-core CPU
    idle, and runs are independent, so two at a time finish ~1.4x sooner with identical results
    (each run has its own state and random streams; XLA releases the GIL). The first error, or a
    Ctrl-C, sets ``stop`` (runs check it every step) and is re-raised; finished runs stay saved.
    """
    stop = threading.Event()
    if workers <= 1:
        for job in jobs:
            fn(*job, stop)
        return
    def guarded(*job):
        if stop.is_set():  # queued behind a failure: do not start
            raise Stopped(str(job[0]))
        try:
            return fn(*job, stop)
        except BaseException:
            stop.set()  # before this worker takes the next job
            raise

    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="study-run")
    try:
        futures = [ex.submit(guarded, *job) for job in jobs]
        for f in as_completed(futures):
            f.result()
    except BaseException:
        stop.set()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def run_record(run: dict, sites) -> dict:
    """What :func:`analyse` needs of one saved run: test metric, val convergence, final alignment per site."""
    c = run["curve"]
    rec = {k: run[k] for k in ("backbone", "task", "seed", "init", "final_metric", "metric_name")}
    rec["convergence_steps"] = steps_to_fraction(c["step"], c["metric"])
    rec["diverged"] = run.get("diverged_step") is not None
    rec["diverged_step"] = run.get("diverged_step")
    for s in sites:
        rec[f"mmd2_{s}"] = c[f"align/{s}/mmd2"][-1]
        rec[f"cka_{s}"] = c[f"align/{s}/cka"][-1]
    return rec


def summarise(cfg, out_dir: str, design: dict) -> dict:
    """results.json (design, per-pair mean ± SD over seeds, correlations, within-task comparison) and results.csv."""
    runs = {}
    seeds = finetune_seeds(cfg)
    for b in cfg.backbones:
        for t in cfg.tasks:
            for init in INITS:
                for seed in seeds:
                    key = run_key(b.name, t, init, _seed_key(cfg, seed))
                    with open(os.path.join(out_dir, "runs", key + ".json")) as fh:
                        runs[key] = json.load(fh)
    site = cfg.primary_site
    sites = list(cfg.finetune.sites)
    design["sigma"] = {f"{b.name}/{t}": runs[run_key(b.name, t, "pretrained")]["sigma"]
                       for b in cfg.backbones for t in cfg.tasks}
    measures = (*(f"mmd2_{s}" for s in sites), f"cka_{site}")
    info = {t: (get_task(t).ceiling, get_task(t).higher_is_better) for t in cfg.tasks}
    stats = analyse([run_record(r, sites) for r in runs.values()], info, measures=measures,
                    gain_floor=float(cfg.gain_floor), num_bootstrap=int(cfg.num_bootstrap),
                    num_permutations=int(cfg.num_correlation_permutations), seed=int(cfg.seed))
    measure = f"mmd2_{site}"
    results = {"design": design, "primary_site": site, "primary_measure": measure, "primary_target": "gap_closed",
               **stats, "runs": runs, "finding": describe_finding(stats, measure),
               "transferability": transferability(cfg, runs, stats["pairs"], info),
               "layer_profile": layer_profiles(runs)}
    write_json(os.path.join(out_dir, "results.json"), results)
    rows = []
    for p in stats["pairs"]:
        row = {k: v for k, v in p.items() if not isinstance(v, (dict, list))}
        for k, v in p.items():
            if isinstance(v, dict):
                row[f"{k}_mean"], row[f"{k}_sd"] = v.get("mean"), v.get("sd")
        rows.append(row)
    with atomic_file(os.path.join(out_dir, "results.csv")) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return results


def layer_profiles(runs: dict) -> dict:
    """Per (backbone, task) and init: each block's MMD^2 and CKA before vs after fine-tuning, mean and SD over the
    seeds (diverged runs left out), in network order; {} when the runs carry no layer profile."""
    groups = {}
    for r in runs.values():
        prof = r.get("layer_profile")
        if prof and r.get("diverged_step") is None:
            groups.setdefault(f"{r['backbone']}/{r['task']}", {}).setdefault(r["init"], []).append(prof)
    out = {}
    for pair, by_init in groups.items():
        out[pair] = {}
        for init, profs in by_init.items():
            entry = {"layers": profs[0]["layers"], "seeds": len(profs)}
            for k in ("mmd2", "cka"):
                v = np.array([p[k] for p in profs], np.float64)
                entry[f"{k}_mean"] = v.mean(0).tolist()
                entry[f"{k}_sd"] = (v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1])).tolist()
            out[pair][init] = entry
    return out


def transferability(cfg, runs: dict, pairs: list, info: dict) -> dict:
    """Per score: its value per pair, its correlations with gap closed (the statistics of :func:`analyse`, a
    higher score predicting a larger gain) and how often it picks the backbone that gained more within a task."""
    from vfm_align.align.transferability import SCORES, picks_better

    out = {}
    if not any(r.get("transfer") for r in runs.values()):
        return out
    gains = {(p["backbone"], p["task"]): p["gap_closed"]["mean"] for p in pairs}
    for score in SCORES:
        value = {(r["backbone"], r["task"]): r["transfer"].get(score) for r in runs.values()
                 if r["init"] == "pretrained" and r.get("transfer")}
        records = [{**run_record(r, ()), score: value.get((r["backbone"], r["task"]))} for r in runs.values()]
        for rec in records:
            if rec[score] is None:
                rec[score] = float("nan")  # excluded (with its reason) from this score's statistics only
        stats = analyse(records, info, measures=(score,), targets=("gap_closed",), gain_floor=float(cfg.gain_floor),
                        num_bootstrap=int(cfg.num_bootstrap), num_permutations=int(cfg.num_correlation_permutations),
                        seed=int(cfg.seed), aligned_when_lower=lambda m: False)
        rows = [{"task": t, "backbone": b, score: v, "gain": gains.get((b, t))} for (b, t), v in value.items()]
        out[score] = {"values": {f"{b}/{t}": v for (b, t), v in value.items()},
                      "correlations": stats["correlations"], "within_task": stats["within_task"],
                      "picks_better": picks_better(rows, score, outcome="gain"),
                      "runs_excluded": stats["counts"]["runs_excluded"]}
    return out
