"""The transfer study: every (backbone, task) fine-tuned from pretrained and from random weights.

For each pair it records the final metric, the relative gain over the random-init baseline trained
with the same budget, the steps to 90 % of the final improvement (convergence), and the in-loop
alignment curves (MMD^2, CKA, drift) per feature site; then it correlates alignment with gain and
with convergence across pairs. Each (backbone, task) pair is fine-tuned from both initialisations and
``cfg.finetune.seeds`` seeds (seed, seed + 1, ...) as stacked runs: groups of ``cfg.finetune.stack``
runs (0, the default: all of the pair's) train as one compiled step. Each (backbone, task, init, seed)
result is written atomically to ``runs/`` as its group completes, so an interrupted study resumes
where it stopped. ``cfg.workers`` groups (and pretrainings) run at a time, in threads; the results do
not depend on it, nor on the grouping beyond float32 rounding.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from rich.console import Console

from vfm_align import model_io
from vfm_align.atomic import write_json
from vfm_align.errors import ConfigError, Stopped
from vfm_align.data.tasks import get_task
from vfm_align.study import taskdata
from vfm_align.models.registry import config_from_dict
from vfm_align.study.finetune import Run, run_finetunes, steps_to_fraction
from vfm_align.align.permutation import mmd_test
from vfm_align.study.pretrain import pretrain, study_mesh
from vfm_align.study.stats import correlate
from vfm_align.train.recipes import BACKBONES

INITS = ("pretrained", "random")


def prepare_cohort(cfg, out_dir: str) -> dict:
    """The cohort named by ``cfg.cohort.manifest``, or the phantom generated into ``out_dir/cohort``."""
    manifest = cfg.cohort.manifest
    if not manifest:
        from vfm_align.data.phantom import make_phantom

        manifest = make_phantom(os.path.join(out_dir, "cohort"), int(cfg.cohort.cases), shape=tuple(cfg.cohort.shape),
                                seed=int(cfg.seed), workers=1, progress=False)
    return taskdata.load_cohort(manifest, crop=tuple(cfg.cohort.crop) if cfg.cohort.get("crop") else None)


def _backbone_dirs(cfg, cohort, out_dir, console, progress) -> dict:
    """Model directory per backbone: given weights, or pretrained here (concurrently, ``cfg.workers`` at a time)."""
    dirs, todo = {}, []
    for b in cfg.backbones:
        if b.get("weights"):
            dirs[b.name] = b.weights  # a converted or user-pretrained model directory
            continue
        dirs[b.name] = os.path.join(out_dir, "pretrained", b.name)
        if not os.path.isdir(dirs[b.name]):
            todo.append((b,))
    train = cohort["split"] == "train"
    data = {"image": cohort["image"][train], "cancer": (cohort["lesion"][train] > 0).astype(np.int32)}

    def run_one(b, stop):
        console.log(f"pretraining {b.name} ({b.pretrain.backbone}, {b.pretrain.objective})")
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


def run_study(cfg, out_dir: str, *, progress: bool = True) -> dict:
    """Run (or resume) the study described by ``cfg`` into ``out_dir``; returns the results dict."""
    console = Console(stderr=True, quiet=not progress)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        fh.write(cfg.to_json_best_effort(indent=1))
    for t in cfg.tasks:
        get_task(t)  # an unknown task fails before any work
    names = [b.name for b in cfg.backbones]
    if len(set(names)) != len(names):
        raise ConfigError(f"backbone names must be unique, got {names}")
    seeds = finetune_seeds(cfg)
    cohort = prepare_cohort(cfg, out_dir)
    dirs = _backbone_dirs(cfg, cohort, out_dir, console, progress)
    mesh = study_mesh(cfg.mesh)
    probe_idx = np.arange(min(int(cfg.finetune.probe_cases), len(cohort["image"])))
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

    def run_group(label, b, t, todo, stop):
        meta = model_io.read_sidecar(dirs[b.name])
        config = config_from_dict(meta["arch"], meta["config"])
        pretrained = model_io.load(dirs[b.name]) if any(i == "pretrained" for i, _, _ in todo) else None
        runs = [Run(pretrained if init == "pretrained" else None, seed) for init, seed, _ in todo]
        results = run_finetunes(b.backbone, config, runs, t, task_data[t], probe, cfg.finetune, mesh,
                                desc=f"{label} {b.name}/{t} x{len(runs)}", progress=progress, stop=stop)
        for (init, seed, path), res in zip(todo, results):
            tests = {}
            for s, (x, y) in res.pop("pairs").items():  # same inputs before/after: swap within pairs
                r = mmd_test(x, y, int(cfg.num_permutations), paired=True,
                             num_features=int(cfg.finetune.rff_features), seed=int(cfg.seed))
                tests[s] = {"statistic": float(r.statistic), "p_value": float(r.p_value),
                            "num_permutations": int(r.num_permutations), "sigma": float(r.sigmas[0])}
            write_json(path, {"backbone": b.name, "model": b.backbone, "family": BACKBONES[b.backbone].family,
                              "task": t, "init": init, "seed": seed,
                              "tests": tests, **res})
            note = "" if res["diverged_step"] is None else f" (diverged at step {res['diverged_step']})"
            console.log(f"{label} {b.name} / {t} / {init} / seed {seed}: {res['metric_name']} "
                        f"{res['final_metric']:.4f}{note}")

    run_concurrently(run_group, jobs, int(cfg.get("workers", 1)))
    results = summarise(cfg, out_dir)
    from vfm_align.study.report import write_report

    write_report(results, out_dir)
    return results


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


def _pair_row(cfg, b, t, pre, rnd) -> dict:
    c = pre["curve"]
    row = {"backbone": b.name, "task": t, "metric": pre["metric_name"],
           "final_pretrained": pre["final_metric"], "final_random": rnd["final_metric"],
           "gain": relative_gain(pre["final_metric"], rnd["final_metric"], float(cfg.gain_floor)),
           "convergence_steps": steps_to_fraction(c["step"], c["metric"]),
           "convergence_steps_random": steps_to_fraction(rnd["curve"]["step"], rnd["curve"]["metric"])}
    for s in cfg.finetune.sites:
        row[f"mmd2_{s}"] = c[f"align/{s}/mmd2"][-1]
        row[f"cka_{s}"] = c[f"align/{s}/cka"][-1]
        row[f"p_value_{s}"] = pre["tests"][s]["p_value"]
    return row


def summarise(cfg, out_dir: str) -> dict:
    """Per-pair table (the mean over seeds where there are several) and cross-pair correlations from the saved runs."""
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
    pairs = []
    for b in cfg.backbones:
        for t in cfg.tasks:
            rows = [_pair_row(cfg, b, t, runs[run_key(b.name, t, "pretrained", _seed_key(cfg, s))],
                              runs[run_key(b.name, t, "random", _seed_key(cfg, s))]) for s in seeds]
            row = rows[0]
            if len(rows) > 1:
                row = {k: (float(np.mean([r[k] for r in rows])) if isinstance(v, (int, float)) else v)
                       for k, v in row.items()}
            pairs.append(row)
    corr = {}
    stat_kw = dict(num_bootstrap=int(cfg.num_bootstrap), num_permutations=int(cfg.num_correlation_permutations),
                   seed=int(cfg.seed))
    for measure in (f"mmd2_{site}", f"cka_{site}"):
        x = [p[measure] for p in pairs]
        for target in ("gain", "convergence_steps"):
            y = [p[target] for p in pairs]
            for method in ("spearman", "pearson"):
                try:
                    corr[f"{measure}~{target}/{method}"] = correlate(x, y, method=method, **stat_kw).to_dict()
                except Exception as exc:  # constant columns (e.g. every run converged at once) have no correlation
                    corr[f"{measure}~{target}/{method}"] = {"method": method, "r": float("nan"), "error": str(exc)}
    results = {"primary_site": site, "pairs": pairs, "correlations": corr, "runs": runs,
               "finding": finding(pairs, corr, site)}
    write_json(os.path.join(out_dir, "results.json"), results)
    import csv

    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(pairs[0]))
        w.writeheader()
        w.writerows(pairs)
    return results


def relative_gain(pretrained: float, random: float, floor: float) -> float:
    """(pretrained - random) / max(|random|, floor): the floor keeps a baseline that learned nothing
    within the budget (metric ~ 0) from turning the gain into an arbitrarily large number."""
    return (pretrained - random) / max(abs(random), floor)


def finding(pairs, corr, site) -> str:
    """The study's answer in one sentence, with its numbers."""
    g = corr[f"mmd2_{site}~gain/spearman"]
    c = corr[f"mmd2_{site}~convergence_steps/spearman"]

    def fmt(d):
        if not np.isfinite(d.get("r", np.nan)):
            return "undefined (a constant column)"
        return f"{d['r']:+.2f} (95% CI {d['ci_low']:+.2f} to {d['ci_high']:+.2f}, p = {d['p_value']:.3f})"

    r = g.get("r", np.nan)
    # Only a 95 % interval that excludes 0 makes a direction a finding; otherwise say it is not shown.
    clear = np.isfinite(r) and (g["ci_low"] > 0 or g["ci_high"] < 0)
    if not np.isfinite(r):
        direction = "the relation of MMD\u00b2 to gain is undefined"
    elif r < 0 and clear:
        direction = "lower MMD\u00b2 (better alignment) went with larger gains"
    elif r < 0:
        direction = ("lower MMD\u00b2 went with larger gains only as a tendency that the data do not establish "
                     "(the interval includes 0)")
    elif clear:
        direction = "lower MMD\u00b2 went with smaller gains, the opposite of the paper's claim"
    else:
        direction = "lower MMD\u00b2 did not go with larger gains"
    return (f"Across {len(pairs)} (backbone, task) pairs, {direction}: Spearman of {site} MMD\u00b2 with relative "
            f"gain {fmt(g)}, and with steps to 90% of the final metric {fmt(c)}.")
