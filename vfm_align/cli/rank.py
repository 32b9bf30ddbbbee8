"""``vfm-align rank``: which model should transfer best to a task, from its frozen features, before fine-tuning."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from vfm_align.atomic import write_json


def register(sub) -> None:
    p = sub.add_parser(
        "rank",
        help="rank models for a task by transferability scores of their frozen features (LogME, H-score, ...)",
        description=(
            "Extract the frozen features of each model over a split of a cohort, score them against the task's "
            "targets (LogME, H-score, TransRate; RankMe without labels) and rank the models per score, with "
            "bootstrap intervals over cases. Dense tasks are scored on patch tokens with the targets pooled "
            "onto the patch grid. Writes rank.json and prints the table."
        ),
    )
    p.add_argument("--model", nargs="+", required=True, metavar="DIR", help="model directories to rank")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="cohort manifest (CSV or JSON)")
    p.add_argument("--task", required=True, help="classification, segmentation, detection, super_resolution or "
                                                 "distortion_correction")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="cases to score (default train)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="preprocessing cache (default: .vfm_align_cache beside the manifest)")
    p.add_argument("--max-rows", type=int, default=20000,
                   help="dense tasks: at most this many patch rows in all, the same number from every case")
    p.add_argument("--bootstrap", type=int, default=200, help="case resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR", help="write rank.json here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing rank.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _names(dirs) -> list[str]:
    base = [os.path.basename(os.path.normpath(d)) for d in dirs]
    return base if len(set(base)) == len(base) else [os.path.abspath(d) for d in dirs]


def frozen_rows(model_dir: str, cases, cache, task, *, max_rows: int, seed: int, progress: bool):
    """(features (n, d), targets, case index per row) of one model over ``cases`` (see task_feature_rows)."""
    from tqdm.auto import tqdm

    import vfm_align
    from vfm_align.align.banks import model_feature_fn, task_feature_rows
    from vfm_align.errors import DataError
    from vfm_align.model_io import read_sidecar

    arch = read_sidecar(model_dir)["arch"]
    model = vfm_align.load(model_dir)
    features = model_feature_fn(model, arch, ("pooled", "patch"))
    # The same number of rows from every case (a seeded subset of patch rows, drawn as each case is extracted so
    # memory stays at about max_rows rows), so a resample of cases has as many rows as the original and every
    # bootstrap round reuses one compilation.
    rng = np.random.default_rng(seed)
    quota = max(1, max_rows // len(cases))
    per_case = []
    for c in tqdm(cases, desc=f"features {os.path.basename(os.path.normpath(model_dir))}", unit="case",
                  disable=not progress):
        sample = {**cache.get(c), "labels": dict(c.labels), "case_id": c.case_id,
                  "spacing": tuple(cache.meta(c)["spacing"])}
        f, t = task_feature_rows(model, arch, sample, task, features)
        idx = np.sort(rng.choice(len(f), quota, replace=False)) if len(f) > quota else np.arange(len(f))
        per_case.append((f[idx], np.asarray(t)[idx]))
    take = min(len(f) for f, _ in per_case)
    xs, ts, group = [], [], []
    for i, (f, t) in enumerate(per_case):
        idx = np.sort(rng.choice(len(f), take, replace=False)) if len(f) > take else np.arange(len(f))
        xs.append(f[idx])
        ts.append(t[idx])
        group.append(np.full(len(idx), i))
    x = np.concatenate(xs)
    if not np.isfinite(x).all():
        raise DataError(f"{model_dir}: non-finite features on the cohort")
    return arch, x, np.concatenate(ts), np.concatenate(group)


def bootstrap(x, targets, group, kind: str, resamples, scores=None) -> dict:
    """Each score on each resample of cases (a list of case-index arrays); NaN where it does not apply."""
    from vfm_align.align import SCORES, scores_for_task

    rows = {g: np.flatnonzero(group == g) for g in np.unique(group)}
    out = {s: np.full(len(resamples), np.nan) for s in (scores or SCORES)}
    for b, cases in enumerate(resamples):
        idx = np.concatenate([rows[c] for c in cases])
        r = scores_for_task(x[idx], targets[idx], kind)
        for s, values in out.items():
            if r.get(s) is not None:
                values[b] = r[s]
    return out


def run(args) -> int:
    from vfm_align.align import SCORES, scores_for_task
    from vfm_align.data.cache import PreprocessCache
    from vfm_align.data.cohort import read_manifest
    from vfm_align.data.tasks import get_task
    from vfm_align.errors import ConfigError, DataError

    out_dir = os.path.abspath(args.out)
    res_path = os.path.join(out_dir, "rank.json")
    if os.path.exists(res_path) and not args.overwrite:
        raise ConfigError(f"{res_path} already exists (pass --overwrite to replace it)")
    if args.max_rows < 2 or args.bootstrap < 0:
        raise ConfigError("--max-rows must be at least 2 and --bootstrap at least 0")
    task = get_task(args.task)
    cohort = read_manifest(args.data)
    cases = cohort.split(args.split)
    if len(cases) < 2:
        raise DataError(f"{args.data}: {len(cases)} case(s) in split '{args.split}'; ranking needs at least 2")
    cache = PreprocessCache(args.cache or os.path.join(os.path.dirname(os.path.abspath(args.data)),
                                                       ".vfm_align_cache"))
    names = _names(args.model)
    rng = np.random.default_rng(args.seed)
    # One set of case resamples for every model: the intervals and P(best) compare models on the same cases.
    resamples = [rng.integers(0, len(cases), len(cases)) for _ in range(args.bootstrap)]
    models, boots = [], {}
    for name, model_dir in zip(names, args.model):
        t0 = time.perf_counter()
        arch, x, targets, group = frozen_rows(model_dir, cases, cache, task, max_rows=args.max_rows, seed=args.seed,
                                              progress=not args.quiet)
        t_feat = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = scores_for_task(x, targets, task.kind)
        t_score = time.perf_counter() - t0
        boots[name] = bootstrap(x, targets, group, task.kind, resamples)
        entry = {"name": name, "model": os.path.abspath(model_dir), "arch": arch, "rows": int(x.shape[0]),
                 "d": int(x.shape[1]), "scores": {s: scores[s] for s in SCORES},
                 "intervals": {s: _interval(boots[name][s]) for s in SCORES},
                 "timings": {"features_s": t_feat, "scores_s": t_score, "bootstrap_s": time.perf_counter() - t0}}
        if "notes" in scores:
            entry["notes"] = scores["notes"]
        models.append(entry)
    ranking = {}
    for s in SCORES:
        valued = [m for m in models if m["scores"][s] is not None]
        order = sorted(valued, key=lambda m: -m["scores"][s])
        ranking[s] = [{"name": m["name"], "value": m["scores"][s], "interval": m["intervals"][s],
                       "p_best": _p_best(boots, m["name"], s, [v["name"] for v in valued])} for m in order]
    result = {"task": task.name, "kind": task.kind, "data": os.path.abspath(args.data), "split": args.split,
              "cases": len(cases), "bootstrap": args.bootstrap, "seed": args.seed, "higher_is_better": True,
              "models": models, "ranking": ranking}
    os.makedirs(out_dir, exist_ok=True)
    write_json(res_path, result)
    _print_table(result)
    print(f"wrote {res_path}")
    return 0


def _interval(values) -> list | None:
    """The 95% percentile interval of the finite bootstrap values (None when fewer than 10 applied)."""
    v = np.asarray(values)[np.isfinite(values)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 10 else None


def _p_best(boots, name, score, names) -> float | None:
    """The fraction of the case resamples in which ``name`` has the highest ``score`` of ``names``."""
    if not boots or len(next(iter(boots.values()))[score]) == 0:
        return None
    vals = np.stack([boots[n][score] for n in names])               # (models, resamples)
    ok = np.isfinite(vals).all(0)
    if not ok.any():
        return None
    best = np.argmax(vals[:, ok], axis=0)
    return float(np.mean(best == names.index(name)))


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _print_table(r: dict) -> None:
    print(f"task {r['task']} ({r['kind']}), split {r['split']}: {r['cases']} cases, "
          f"{r['bootstrap']} bootstrap resamples of cases; higher is better for every score")
    w = max(len(m["name"]) for m in r["models"])
    for s, rows in r["ranking"].items():
        print(f"\n{s}")
        for i, row in enumerate(rows, 1):
            iv = row["interval"]
            iv = f"[{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else "[-]"
            print(f"  {i}. {row['name']:<{w}}  {_fmt(row['value']):>10}  95% {iv:<24} P(best) {_fmt(row['p_best'])}")
        missing = [m["name"] for m in r["models"] if m["scores"][s] is None]
        for name in missing:
            note = next(m for m in r["models"] if m["name"] == name).get("notes", {}).get(s, "")
            print(f"  -  {name:<{w}}  not scored: {note}")
