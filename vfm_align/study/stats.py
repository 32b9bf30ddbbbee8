"""Statistics of the transfer study: per-pair summaries over seeds, correlations across pairs, and
the within-task comparison.

Design note (what a reviewer can check):

* Units. A *run* is one (backbone, task, init, seed). A *seed unit* is the pretrained and the
  random-init run of one (backbone, task, seed): they share the head initialisation and the batch
  order, so the gain is taken within a unit. A *pair* is one (backbone, task); its values are means
  over its seed units, reported with their spread (sample SD, ddof=1).
* Exclusions. A run that diverged, or lacks a finite value the analysis needs, is excluded with its
  reason; a seed unit without both of its runs is excluded too, naming the missing partner. Nothing is
  dropped silently and nothing is turned into a constant column: every exclusion is listed and counted.
* Correlations are computed on pair means (one point per pair). Their interval is a percentile
  hierarchical bootstrap: resample pairs with replacement, then seed units with replacement within
  each drawn pair, recompute the pair means and the correlation. By default pairs are resampled
  within their backbone (each resample keeps five tasks per backbone): the backbones are fixed by the
  design, the tasks are the sample. Resamples whose correlation is undefined (a constant column) are
  dropped and counted.
* p-value. Pairs sharing a backbone are not exchangeable (a backbone's features carry into all its
  tasks), so the test permutes the measure only among the pairs of one backbone (strata). The
  statistic is the within-backbone correlation: values centred (Pearson) or ranked and centred
  (Spearman) inside each backbone, then correlated. Null hypothesis: within each backbone, which
  task gets which alignment value is unrelated to that task's gain. Between-backbone differences
  are not tested (with two or three backbones there is nothing to test them with). When the
  strata allow at most ``exact_limit`` orderings (5! x 5! = 14,400 for two backbones and five
  tasks) every ordering is enumerated and the p-value is exact; otherwise a seeded Monte-Carlo is
  used, whose p-value (1 + hits) / (1 + draws) never reaches 0.
* Within-task comparison (a test that needs no exchangeability across tasks): in each task, does
  the backbone with the lowest alignment measure also have the best target? Ties in either are
  stated and left out. Under the null each backbone is equally likely to be best, so the count of
  agreeing tasks is (Poisson-)binomial with success probability 1 / (backbones in the task); the
  exact two-sided p (the sum of outcomes no more likely than the observed, as scipy's binomtest)
  and the one-sided p are given. With five tasks and two backbones the smallest two-sided p is
  2 / 32 = 0.0625: this comparison alone cannot reach 0.05.
* Undefined is undefined: fewer than 3 pairs or a constant column gives r = NaN, no interval and
  p-value None, with the reason in ``undefined``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import rankdata

from vfm_align.errors import DataError
from vfm_align.study.gains import gap_closed, relative_gain


def _pearson_rows(x, y) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y (NaN where a row is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc**2).sum(-1) * (yc**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (xc * yc).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def _spearman_rows(x, y) -> np.ndarray:
    return _pearson_rows(rankdata(x, axis=-1), rankdata(y, axis=-1))


def pearson(x, y) -> float:
    return float(_pearson_rows(np.asarray(x, np.float64), np.asarray(y, np.float64)))


def spearman(x, y) -> float:
    return float(_spearman_rows(np.asarray(x, np.float64), np.asarray(y, np.float64)))


_METHODS = {"pearson": _pearson_rows, "spearman": _spearman_rows}
NAN = float("nan")


def _undefined_reason(x, y) -> str | None:
    if len(x) < 3:
        return f"fewer than 3 pairs ({len(x)})"
    for name, v in (("x", x), ("y", y)):
        if np.all(v == v[0]):
            return f"constant column ({name} = {v[0]:.6g} for all {len(v)} pairs)"
    return None


@dataclass
class Correlation:
    """A correlation, its interval and its p-value; ``undefined`` says why r is NaN (then no interval, no p)."""

    method: str
    r: float
    ci_low: float
    ci_high: float
    p_value: float | None
    n: int
    confidence: float
    num_bootstrap: int
    num_permutations: int
    undefined: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _check_method(method):
    if method not in _METHODS:
        raise DataError(f"unknown correlation method '{method}'; use one of {sorted(_METHODS)}")


def correlate(x, y, *, method: str = "spearman", confidence: float = 0.95, num_bootstrap: int = 5000,
              num_permutations: int = 10000, seed: int = 0) -> Correlation:
    """Correlation of paired values with a percentile bootstrap CI and a two-sided permutation p-value.

    Every pair is exchangeable here (one value per unit, no grouping); for the study's pairs use
    :func:`analyse`, which respects seeds and backbones. NaN/inf values are an error (exclude them,
    with their reason, before calling); fewer than 3 pairs or a constant column give an undefined
    result (r NaN, p None).
    """
    _check_method(method)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise DataError(f"correlate needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("correlate: NaN/inf among the values (exclude those runs, with their reason, first)")
    n = len(x)
    why = _undefined_reason(x, y)
    if why:
        return Correlation(method, NAN, NAN, NAN, None, n, confidence, num_bootstrap, num_permutations, why)
    fn = _METHODS[method]
    r = float(fn(x, y))
    rng = np.random.default_rng(seed)
    # Resamples and orderings are drawn one by one (the seeded stream of the original loop), then
    # correlated all at once along the rows.
    idx = np.stack([rng.integers(0, n, n) for _ in range(num_bootstrap)]) if num_bootstrap else np.zeros((0, n), int)
    boots = fn(x[idx], y[idx])
    boots = boots[np.isfinite(boots)]  # resamples with a constant column have no correlation
    alpha = (1.0 - confidence) / 2.0
    lo, hi = (np.quantile(boots, [alpha, 1.0 - alpha]) if len(boots) else (NAN, NAN))
    order = (np.stack([rng.permutation(n) for _ in range(num_permutations)]) if num_permutations
             else np.zeros((0, n), int))
    perms = fn(np.broadcast_to(x, order.shape), y[order])
    p = (1.0 + np.sum(np.abs(perms) >= abs(r) - 1e-12)) / (1.0 + num_permutations)
    return Correlation(method, float(r), float(lo), float(hi), float(p), n, confidence, num_bootstrap, num_permutations)


# ----------------------------------------------------------------------------------------------
# Hierarchical bootstrap and the stratified permutation test


def resample_pairs(num_pairs: int, num_bootstrap: int, rng, strata=None) -> np.ndarray:
    """(num_bootstrap, num_pairs) pair indices drawn with replacement; with ``strata``, each stratum's
    pairs are drawn from that stratum only, so every resample keeps the design's count per stratum."""
    if strata is None:
        return rng.integers(0, num_pairs, (num_bootstrap, num_pairs))
    strata = np.asarray(strata)
    if len(strata) != num_pairs:
        raise DataError(f"{len(strata)} strata labels for {num_pairs} pairs")
    pick = np.empty((num_bootstrap, num_pairs), int)
    for s in np.unique(strata):
        members = np.nonzero(strata == s)[0]
        pick[:, members] = members[rng.integers(0, len(members), (num_bootstrap, len(members)))]
    return pick


def hierarchical_bootstrap(x_units, y_units, *, method: str = "spearman", num_bootstrap: int = 2000,
                           seed: int = 0, strata=None) -> np.ndarray:
    """Correlations of pair means over resamples: pairs with replacement (within ``strata`` if given),
    then units within each drawn pair.

    ``x_units[i]``, ``y_units[i]``: the matched per-seed values of pair i (equal lengths >= 1). Returns
    one correlation per resample, NaN where a resample's column is constant.
    """
    _check_method(method)
    counts = np.array([len(u) for u in x_units])
    if len(counts) == 0 or counts.min() < 1 or any(len(a) != len(b) for a, b in zip(x_units, y_units)):
        raise DataError(f"hierarchical_bootstrap needs >= 1 matched unit per pair, got {counts.tolist()}")
    p, smax = len(counts), int(counts.max())
    xs = np.zeros((p, smax))
    ys = np.zeros((p, smax))
    for i, (a, b) in enumerate(zip(x_units, y_units)):
        xs[i, :counts[i]], ys[i, :counts[i]] = a, b
    rng = np.random.default_rng(seed)
    pick = resample_pairs(p, num_bootstrap, rng, strata)
    n = counts[pick][..., None]  # (B, P, 1) units in each drawn pair
    unit = np.minimum((rng.random((num_bootstrap, p, smax)) * n).astype(int), n - 1)  # units within the pair
    keep = np.arange(smax) < n
    mx = np.where(keep, xs[pick[..., None], unit], 0.0).sum(-1) / n[..., 0]
    my = np.where(keep, ys[pick[..., None], unit], 0.0).sum(-1) / n[..., 0]
    return _METHODS[method](mx, my)


def _within(v, strata, method):
    """Values centred (pearson) or ranked then centred (spearman) within each stratum."""
    out = np.empty(len(v))
    for s in np.unique(strata):
        m = strata == s
        w = rankdata(v[m]) if method == "spearman" else v[m]
        out[m] = w - w.mean()
    return out


@dataclass
class StratifiedTest:
    """Permutation test of the within-stratum correlation; the null is stated in ``null``."""

    r_within: float
    p_value: float | None
    num_permutations: int
    exact: bool
    null: str
    undefined: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


NULL_WITHIN_BACKBONE = ("within each backbone, the alignment values are exchangeable among its tasks "
                        "(no within-backbone association with the target); between-backbone differences are kept")


def stratified_permutation_test(x, y, strata, *, method: str = "spearman", num_permutations: int = 10000,
                                seed: int = 0, exact_limit: int = 20000,
                                null: str = NULL_WITHIN_BACKBONE) -> StratifiedTest:
    """Two-sided test of the within-stratum correlation, permuting x only within strata.

    Exact enumeration when the strata allow at most ``exact_limit`` orderings (p = hits / orderings,
    the observed one included); else ``num_permutations`` seeded draws (p = (1 + hits) / (1 + draws)).
    """
    _check_method(method)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    strata = np.asarray(strata)
    a, b = _within(x, strata, method), _within(y, strata, method)
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    if denom <= 1e-300:
        return StratifiedTest(NAN, None, 0, False, null,
                              "no variation within any stratum (one pair per backbone, or constant within)")
    r = float((a * b).sum() / denom)
    groups = [np.nonzero(strata == s)[0] for s in np.unique(strata)]
    total = math.prod(math.factorial(len(g)) for g in groups)
    tol = 1e-12
    if total <= exact_limit:
        # Every within-stratum ordering: one index array per combination of per-stratum permutations.
        per = [np.array(list(itertools.permutations(g))) for g in groups]
        order = np.empty((total, len(x)), int)
        for row, combo in enumerate(itertools.product(*[range(len(q)) for q in per])):
            for g, q, k in zip(groups, per, combo):
                order[row, g] = q[k]
        stats = (a[order] * b).sum(-1) / denom
        p = float(np.sum(np.abs(stats) >= abs(r) - tol)) / total
        return StratifiedTest(r, p, total, True, null)
    rng = np.random.default_rng(seed)
    order = np.empty((num_permutations, len(x)), int)
    for g in groups:
        order[:, g] = g[np.argsort(rng.random((num_permutations, len(g))), axis=1)]
    stats = (a[order] * b).sum(-1) / denom
    p = (1.0 + float(np.sum(np.abs(stats) >= abs(r) - tol))) / (1.0 + num_permutations)
    return StratifiedTest(r, p, num_permutations, False, null)


# ----------------------------------------------------------------------------------------------
# The within-task comparison


def _poisson_binomial(probs) -> np.ndarray:
    """P(K = k), k = 0..n, for a sum of independent Bernoulli(probs[i])."""
    dist = np.array([1.0])
    for q in probs:
        dist = np.concatenate([dist * (1 - q), [0.0]]) + np.concatenate([[0.0], dist * q])
    return dist


def within_task_comparison(pairs: list[dict], measure: str, target: str, *, target_higher_is_better: bool = True,
                           measure_lower_is_better: bool = True) -> dict:
    """In how many tasks does the best-aligned backbone also have the best ``target``? (exact p-values)

    ``pairs``: dicts with "backbone", "task", and ``measure`` / ``target`` as numbers or {"mean": ...}.
    """
    def val(p, k):
        v = p.get(k)
        v = v.get("mean") if isinstance(v, dict) else v
        return NAN if v is None else float(v)

    tasks = list(dict.fromkeys(p["task"] for p in pairs))
    rows, probs, agree = [], [], 0
    for t in tasks:
        sel = [p for p in pairs if p["task"] == t and np.isfinite(val(p, measure)) and np.isfinite(val(p, target))]
        row = {"task": t, "backbones": [p["backbone"] for p in sel]}
        if len(sel) < 2:
            rows.append({**row, "agree": None, "why": f"{len(sel)} backbone(s) with defined values"})
            continue
        m = np.array([val(p, measure) for p in sel]) * (1 if measure_lower_is_better else -1)
        g = np.array([val(p, target) for p in sel]) * (-1 if target_higher_is_better else 1)  # lower = better
        why = []
        if np.sum(m == m.min()) > 1:
            why.append(f"tie in {measure}")
        if np.sum(g == g.min()) > 1:
            why.append(f"tie in {target}")
        best_aligned, best_target = sel[int(m.argmin())]["backbone"], sel[int(g.argmin())]["backbone"]
        row.update(best_aligned=best_aligned, best_target=best_target)
        if why:
            rows.append({**row, "agree": None, "why": ", ".join(why)})
            continue
        rows.append({**row, "agree": best_aligned == best_target})
        agree += best_aligned == best_target
        probs.append(1.0 / len(sel))
    n = len(probs)
    out = {"measure": measure, "target": target, "agree": int(agree), "compared": n,
           "ties_or_undefined": len(tasks) - n, "tasks": rows,
           "null": "in each task every backbone is equally likely to have the best target, whatever its alignment"}
    if n == 0:
        return {**out, "p_value": None, "p_value_greater": None, "undefined": "no task with two comparable backbones"}
    dist = _poisson_binomial(probs)
    out["p_value"] = float(min(1.0, dist[dist <= dist[agree] * (1 + 1e-7)].sum()))
    out["p_value_greater"] = float(min(1.0, dist[agree:].sum()))
    out["expected_under_null"] = float(sum(probs))
    return out


# ----------------------------------------------------------------------------------------------
# From per-run records to the study's statistics

# Values each kind of run must have, finite, to enter the analysis.
REQUIRED = {"pretrained": ("final_metric", "convergence_steps"), "random": ("final_metric", "convergence_steps")}


def _reason(rec: dict, needed) -> str | None:
    if rec.get("diverged"):
        step = rec.get("diverged_step")
        return "diverged" + (f" at step {step}" if step is not None else "")
    for k in needed:
        v = rec.get(k)
        if v is None:
            return f"no {k}"
        if not np.isfinite(float(v)):
            return f"{k} is {v}"
    return None


@dataclass
class SeedTable:
    """Per (backbone, task): the matched per-seed values; and every excluded run or unit with why."""

    units: dict = field(default_factory=dict)  # (backbone, task) -> {"seed": [...], column: [...]}
    excluded: list = field(default_factory=list)  # {"backbone", "task", "seed", "init", "reason"}
    runs_excluded: int = 0
    units_excluded: int = 0
    flags: list = field(default_factory=list)  # degenerate gains ("random at ceiling", ...)
    metric_name: dict = field(default_factory=dict)


def seed_table(records, metric_info, *, measures=("mmd2",), gain_floor: float = 0.05) -> SeedTable:
    """Match pretrained and random-init runs by seed and compute each unit's gains.

    ``metric_info``: task -> (ceiling, higher_is_better) of its primary metric.
    """
    table = SeedTable()
    runs = {}
    for rec in records:
        init = rec.get("init")
        if init not in REQUIRED:
            raise DataError(f"run record {rec.get('backbone')}/{rec.get('task')}/seed {rec.get('seed')}: "
                            f"init must be 'pretrained' or 'random', got {init!r}")
        key = (rec["backbone"], rec["task"], int(rec["seed"]), init)
        if key in runs:
            raise DataError(f"two run records for {key}")
        runs[key] = rec
    for t in {k[1] for k in runs}:
        if t not in metric_info:
            raise DataError(f"no ceiling / direction given for task '{t}'")
    bad = {}
    for key, rec in runs.items():
        why = _reason(rec, REQUIRED[key[3]] + (measures if key[3] == "pretrained" else ()))
        if why:
            bad[key] = why
            table.runs_excluded += 1
            table.excluded.append({"backbone": key[0], "task": key[1], "seed": key[2], "init": key[3],
                                   "reason": why})
    first = {}
    for k in runs:  # pairs in the order the records list them (config order), seeds ascending
        first.setdefault(k[:2], len(first))
    units = sorted({k[:3] for k in runs}, key=lambda u: (first[u[:2]], u[2]))
    for b, t, s in units:
        pre, rnd = runs.get((b, t, s, "pretrained")), runs.get((b, t, s, "random"))
        cols = table.units.setdefault((b, t), {"seed": [], **{c: [] for c in (
            *measures, "gap_closed", "relative_gain", "final_pretrained", "final_random", "convergence_steps",
            "convergence_steps_random")}})
        if pre is None or rnd is None or (b, t, s, "pretrained") in bad or (b, t, s, "random") in bad:
            table.units_excluded += 1
            if pre is not None and rnd is not None:
                continue  # both present: the bad run is already listed; its partner goes with it
            missing = "random" if rnd is None else "pretrained"
            table.excluded.append({"backbone": b, "task": t, "seed": s, "init": missing,
                                   "reason": f"no {missing} run for this seed"})
            continue
        ceiling, higher = metric_info[t]
        g, flag = gap_closed(pre["final_metric"], rnd["final_metric"], ceiling, higher)
        if flag:
            table.flags.append({"backbone": b, "task": t, "seed": s, "flag": flag})
        if pre.get("metric_name"):
            table.metric_name[(b, t)] = pre["metric_name"]
        cols["seed"].append(s)
        cols["gap_closed"].append(g)
        cols["relative_gain"].append(relative_gain(pre["final_metric"], rnd["final_metric"], gain_floor, higher))
        cols["final_pretrained"].append(float(pre["final_metric"]))
        cols["final_random"].append(float(rnd["final_metric"]))
        cols["convergence_steps"].append(float(pre["convergence_steps"]))
        cols["convergence_steps_random"].append(float(rnd["convergence_steps"]))
        for m in measures:
            cols[m].append(float(pre[m]))
    return table


def _summary(values) -> dict:
    v = np.asarray(values, np.float64)
    if len(v) == 0 or not np.isfinite(v).all():
        return {"mean": None, "sd": None, "n": int(np.isfinite(v).sum()), "values": [_num(a) for a in v]}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v),
            "values": v.tolist()}


def _num(v):
    """A JSON-safe number: None for NaN/inf."""
    return float(v) if v is not None and np.isfinite(v) else None


def analyse(records, metric_info, *, measures=("mmd2",), targets=("gap_closed", "convergence_steps"),
            methods=("spearman", "pearson"), gain_floor: float = 0.05, confidence: float = 0.95,
            num_bootstrap: int = 2000, num_permutations: int = 10000, exact_limit: int = 20000,
            seed: int = 0, aligned_when_lower=lambda m: not m.startswith("cka"),
            stratify_bootstrap: bool = True) -> dict:
    """The study's statistics from per-run records (see the module note); a JSON-able dict.

    ``records``: dicts with backbone, task, seed, init ("pretrained" / "random"), final_metric,
    convergence_steps, each of ``measures`` (pretrained runs), diverged (bool), optional
    diverged_step and metric_name. ``metric_info``: task -> (ceiling, higher_is_better).
    ``stratify_bootstrap``: resample the pairs of each backbone among themselves (the backbones are
    fixed by the design; the tasks are what varies). ``aligned_when_lower(measure)``: whether a lower
    value of the measure means better aligned (MMD\u00b2: yes, CKA: no); it orients the within-task
    comparison.
    Returns {"pairs", "correlations", "within_task", "excluded", "counts", "flags", "settings"}.
    """
    records = list(records)
    table = seed_table(records, metric_info, measures=measures, gain_floor=gain_floor)
    pairs = []
    for (b, t), cols in table.units.items():
        row = {"backbone": b, "task": t, "metric": table.metric_name.get((b, t)), "seeds": list(cols["seed"]),
               "n_seeds": len(cols["seed"])}
        for c, v in cols.items():
            if c != "seed":
                row[c] = _summary(v)
        pairs.append(row)
    usable = [p for p in pairs if p["n_seeds"] > 0]
    correlations = {}
    alpha = (1.0 - confidence) / 2.0
    for k, measure in enumerate(measures):
        for target in targets:
            sel = [p for p in usable if p[measure]["mean"] is not None and p[target]["mean"] is not None]
            left_out = [f"{p['backbone']}/{p['task']}" for p in pairs if p not in sel]
            x = np.array([p[measure]["mean"] for p in sel])
            y = np.array([p[target]["mean"] for p in sel])
            for method in methods:
                entry = {"method": method, "n": len(sel), "pairs_left_out": left_out, "confidence": confidence,
                         "r": None, "ci_low": None, "ci_high": None, "p_value": None}
                why = _undefined_reason(x, y)
                if why:
                    correlations[f"{measure}~{target}/{method}"] = {**entry, "undefined": why}
                    continue
                entry["r"] = float(_METHODS[method](x, y))
                boots = hierarchical_bootstrap([table.units[(p["backbone"], p["task"])][measure] for p in sel],
                                               [table.units[(p["backbone"], p["task"])][target] for p in sel],
                                               method=method, num_bootstrap=num_bootstrap, seed=seed + 7919 * k,
                                               strata=[p["backbone"] for p in sel] if stratify_bootstrap else None)
                ok = boots[np.isfinite(boots)]
                if len(ok):
                    entry["ci_low"], entry["ci_high"] = (float(q) for q in np.quantile(ok, [alpha, 1 - alpha]))
                entry.update(num_bootstrap=num_bootstrap, num_bootstrap_undefined=int(len(boots) - len(ok)),
                             interval="percentile, hierarchical bootstrap (pairs" + (" within backbone" if
                                                                                     stratify_bootstrap else "")
                             + ", then seeds within pairs)")
                test = stratified_permutation_test(x, y, [p["backbone"] for p in sel], method=method,
                                                   num_permutations=num_permutations, seed=seed,
                                                   exact_limit=exact_limit)
                entry["within_backbone"] = test.to_dict()
                entry["p_value"] = test.p_value
                correlations[f"{measure}~{target}/{method}"] = entry
    within = {f"{m}~{t}": within_task_comparison(usable, m, t, target_higher_is_better=not t.startswith("convergence"),
                                                 measure_lower_is_better=aligned_when_lower(m))
              for m in measures for t in targets}
    n_runs = len(records)
    return {
        "pairs": pairs,
        "correlations": correlations,
        "within_task": within,
        "excluded": table.excluded,
        "flags": table.flags,
        "counts": {"runs": n_runs, "runs_excluded": table.runs_excluded, "seed_units_excluded": table.units_excluded,
                   "seed_units": sum(p["n_seeds"] for p in pairs), "pairs": len(pairs),
                   "pairs_without_seeds": [f"{p['backbone']}/{p['task']}" for p in pairs if p["n_seeds"] == 0]},
        "settings": {"gain": "gap_closed = (pre - rand) / (ceiling - rand); relative_gain secondary",
                     "gain_floor": gain_floor, "num_bootstrap": num_bootstrap, "num_permutations": num_permutations,
                     "exact_limit": exact_limit, "seed": seed, "confidence": confidence},
    }


def _fmt_corr(c: dict) -> str:
    if c.get("r") is None:
        return f"undefined ({c.get('undefined')})"
    ci = (f", {c['confidence']:.0%} CI {c['ci_low']:+.2f} to {c['ci_high']:+.2f}" if c.get("ci_low") is not None
          else ", no interval")
    wb = c.get("within_backbone") or {}
    p = (f"; within-backbone r {wb['r_within']:+.2f}, permutation p = {wb['p_value']:.3f}"
         if wb.get("p_value") is not None else "; within-backbone test undefined")
    return f"{c['r']:+.2f}{ci}{p}"


def describe_finding(stats: dict, measure: str, target: str = "gap_closed", method: str = "spearman",
                     *, aligned_when_lower: bool | None = None, target_higher_is_better: bool | None = None) -> str:
    """The study's answer in two sentences, with its numbers; a direction only when the interval excludes 0.

    By default a lower measure is better aligned unless it is a CKA, and a higher target is better
    unless it is a step count."""
    if aligned_when_lower is None:
        aligned_when_lower = not measure.startswith("cka")
    if target_higher_is_better is None:
        target_higher_is_better = not target.startswith("convergence")
    c = stats["correlations"][f"{measure}~{target}/{method}"]
    w = stats["within_task"][f"{measure}~{target}"]
    n = c["n"]
    if c.get("r") is None:
        direction = f"the relation of {measure} to {target} is undefined"
    else:
        clear = c.get("ci_low") is not None and (c["ci_low"] > 0 or c["ci_high"] < 0)
        # Sign of "better aligned" times "better target": positive means alignment went with benefit.
        better_aligned_gains = c["r"] * (-1 if aligned_when_lower else 1) * (1 if target_higher_is_better else -1) > 0
        if clear and better_aligned_gains:
            direction = f"better alignment ({measure}) went with better {target}"
        elif clear:
            direction = f"better alignment ({measure}) went with worse {target}, the opposite of the paper's claim"
        elif better_aligned_gains:
            direction = (f"better alignment ({measure}) went with better {target} only as a tendency that the data do "
                         "not establish (the interval includes 0)")
        else:
            direction = f"better alignment ({measure}) did not go with better {target}"
    within = (f"Within tasks, the better-aligned backbone also had the better {target} in {w['agree']} of "
              f"{w['compared']} task(s)" + (f" (exact p = {w['p_value']:.3f}" if w.get("p_value") is not None else
                                             " (undefined")
              + (f"; {w['ties_or_undefined']} tie(s) or undefined left out)" if w["ties_or_undefined"] else ")"))
    excl = stats["counts"]["runs_excluded"]
    return (f"Across {n} (backbone, task) pairs, {direction}: {method.capitalize()} r {_fmt_corr(c)}. {within}."
            + (f" {excl} run(s) were excluded (see 'excluded')." if excl else ""))
