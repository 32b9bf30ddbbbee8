"""Figures (PNG, matplotlib) and a self-contained report.html for a finished study.

Two layouts. Results whose pair values are per-seed summaries ({"mean", "sd", ...}, from
:func:`vfm_align.study.stats.analyse`) get the replicate layout: the design above the findings,
figures with error bars (mean \u00b1 SD across seeds), the within-task comparison, the per-task table
with mean \u00b1 SD, the exclusions. Results with one number per pair (one seed) keep the original layout.
"""

from __future__ import annotations

import base64
import html
import os

import matplotlib
import numpy as np

from vfm_align.atomic import atomic_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "osD^v<>"


SHORT = {"classification": "classif.", "segmentation": "segm.", "detection": "detect.",
         "super_resolution": "super-res.", "distortion_correction": "distortion"}


def _label_points(ax, pairs, xkey, ykey):
    """Task names beside the points, stepped down where two labels would overlap."""
    xs = [p[xkey] for p in pairs]
    ys = [p[ykey] for p in pairs]
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    placed = []
    for p in sorted(pairs, key=lambda q: (-q[ykey], q[xkey])):
        u, v = (p[xkey] - min(xs)) / span_x, (p[ykey] - min(ys)) / span_y
        dy = 3
        while any(abs(u - a) < 0.22 and abs(v + dy / 250 - b) < 0.045 for a, b in placed):
            dy -= 9
        placed.append((u, v + dy / 250))
        ax.annotate(SHORT.get(p["task"], p["task"]), (p[xkey], p[ykey]), fontsize=7, xytext=(4, dy),
                    textcoords="offset points")


def _finish(fig, ax, xlabel, ylabel, title, path):
    """Labels, legend and grid of a scatter figure, then save and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scatter(pairs, xkey, ykey, xlabel, ylabel, title, path):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    backbones = sorted({p["backbone"] for p in pairs})
    for i, b in enumerate(backbones):
        sel = [p for p in pairs if p["backbone"] == b]
        ax.scatter([p[xkey] for p in sel], [p[ykey] for p in sel], marker=MARKERS[i % len(MARKERS)], s=50, label=b)
    _label_points(ax, pairs, xkey, ykey)
    _finish(fig, ax, xlabel, ylabel, title, path)


def _curves(results, task, path, sites):
    runs = [r for r in results["runs"].values() if r["task"] == task]
    fig, axes = plt.subplots(1, 1 + len(sites), figsize=(4.2 * (1 + len(sites)), 3.6))
    colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r["backbone"] for r in runs))}
    seen = set()
    for r in runs:  # several seeds: one colour per backbone, one legend entry per (backbone, init)
        ls = "-" if r["init"] == "pretrained" else "--"
        first = (r["backbone"], r["init"]) not in seen
        seen.add((r["backbone"], r["init"]))
        axes[0].plot(r["curve"]["step"], r["curve"]["metric"], ls, color=colors[r["backbone"]],
                     label=f"{r['backbone']} ({r['init']})" if first else None)
        if r["init"] == "pretrained":
            for ax, s in zip(axes[1:], sites):
                ax.plot(r["curve"]["step"], r["curve"][f"align/{s}/mmd2"], color=colors[r["backbone"]],
                        label=r["backbone"] if first else None)
    axes[0].set_title(f"{task}: {runs[0]['metric_name']}", fontsize=10)
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    for ax, s in zip(axes[1:], sites):
        ax.set_title(f"MMD\u00b2 to the pretrained features ({s})", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(results, out_dir: str) -> list[str]:
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    site = results["primary_site"]
    pairs = results["pairs"]
    paths = [os.path.join(fig_dir, "alignment_vs_gain.png"), os.path.join(fig_dir, "alignment_vs_convergence.png")]
    _scatter(pairs, f"mmd2_{site}", "gain", f"MMD\u00b2 before vs after fine-tuning ({site})",
             "relative gain over random init", "Alignment vs gain (left = better aligned)", paths[0])
    _scatter(pairs, f"mmd2_{site}", "convergence_steps", f"MMD\u00b2 ({site})", "steps to 90% of final metric",
             "Alignment vs convergence", paths[1])
    sites = sorted({k.split("/")[1] for r in results["runs"].values() for k in r["curve"] if k.startswith("align/")})
    for task in dict.fromkeys(p["task"] for p in pairs):
        path = os.path.join(fig_dir, f"curves_{task}.png")
        _curves(results, task, path, sites)
        paths.append(path)
    return paths


def _img(path):
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'


def write_report(results, out_dir: str) -> str:
    if is_replicate_results(results):
        return write_replicate_report(results, out_dir)
    figs = write_figures(results, out_dir)
    site = results["primary_site"]
    cols = ["backbone", "task", "metric", "final_pretrained", "final_random", "gain", "convergence_steps",
            f"mmd2_{site}", f"cka_{site}", f"p_value_{site}"]
    fmt = lambda v: "\u2014" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    rows = "".join("<tr>" + "".join(f"<td>{fmt(p[c])}</td>" for c in cols) + "</tr>" for p in results["pairs"])
    corr_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{fmt(v.get('r', float('nan')))}</td><td>{fmt(v.get('ci_low', float('nan')))}"
        f" to {fmt(v.get('ci_high', float('nan')))}</td><td>{fmt(v.get('p_value', float('nan')))}</td></tr>"
        for k, v in results["correlations"].items())
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>vfm-align transfer study</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}img{{max-width:100%}}
.finding{{font-size:1.15em;background:#f3f6fa;padding:.8em}}</style>
</head><body><h1>Does the pretraining objective fit the task?</h1>
<p class="finding"><b>Finding.</b> {html.escape(results['finding'])}</p>
<p>Alignment = MMD\u00b2 (RFF, unbiased, Gaussian kernel with the median bandwidth of the pretrained features) between
the backbone's features on a fixed probe set before and after fine-tuning;
gain = (pretrained \u2212 random init) / max(|random init|, floor) of
the final validation metric at the same budget;
convergence = first evaluated step reaching 90% of the run's final improvement.
p-values: paired (within-pair swap) permutation test of the MMD.</p>
<h2>Main figure</h2>{_img(figs[0])}{_img(figs[1])}
<h2>Pairs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>
<h2>Correlations (bootstrap 95% CI, permutation p)</h2>
<table><tr><th>measure ~ target / method</th><th>r</th><th>CI</th><th>p</th></tr>{corr_rows}</table>
<h2>Learning and alignment curves</h2>{''.join(_img(f) for f in figs[2:])}
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as fh:
        fh.write(body)
    return path



# ----------------------------------------------------------------------------------------------
# The replicate layout: several seeds per pair, summaries {"mean", "sd", "n", "values"}


def is_replicate_results(results) -> bool:
    pairs = results.get("pairs") or []
    return bool(pairs) and isinstance(pairs[0].get("gap_closed"), dict)


def _mean(v):
    return v.get("mean") if isinstance(v, dict) else v


def _sd(v):
    sd = v.get("sd") if isinstance(v, dict) else None
    return 0.0 if sd is None else sd


def mean_sd(v) -> str:
    """"mean ± SD (n)" of a summary, "mean (n=1)" without spread, "—" when undefined."""
    if not isinstance(v, dict):
        return "\u2014" if v is None else f"{v:.4g}"
    if v.get("mean") is None:
        return "\u2014"
    if v.get("sd") is None:
        return f"{v['mean']:.4g} (n={v.get('n', 1)})"
    return f"{v['mean']:.4g} \u00b1 {v['sd']:.2g}"


def scatter_with_errors(pairs, xkey, ykey, xlabel, ylabel, title, path):
    """Pair means with error bars of \u00b1 1 SD across seeds on both axes, one marker per backbone."""
    pts = [{"backbone": p["backbone"], "task": p["task"], "x": _mean(p[xkey]), "y": _mean(p[ykey]),
            "xe": _sd(p[xkey]), "ye": _sd(p[ykey])} for p in pairs
           if _mean(p.get(xkey)) is not None and _mean(p.get(ykey)) is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for i, b in enumerate(dict.fromkeys(q["backbone"] for q in pts)):
        sel = [q for q in pts if q["backbone"] == b]
        ax.errorbar([q["x"] for q in sel], [q["y"] for q in sel], xerr=[q["xe"] for q in sel],
                    yerr=[q["ye"] for q in sel], fmt=MARKERS[i % len(MARKERS)], ms=6, capsize=2, elinewidth=0.8,
                    label=b)
    if pts:
        _label_points(ax, pts, "x", "y")
    _finish(fig, ax, xlabel, ylabel, title, path)


def within_task_figure(pairs, within: dict, measure: str, target: str, path: str):
    """Per task, each backbone's measure (top) and target (bottom), mean \u00b1 SD; agreement under the tasks."""
    tasks = list(dict.fromkeys(p["task"] for p in pairs))
    backbones = list(dict.fromkeys(p["backbone"] for p in pairs))
    verdict = {r["task"]: ("agree" if r["agree"] else "disagree") if r["agree"] is not None else
               r.get("why", "undefined") for r in within.get("tasks", [])}
    fig, axes = plt.subplots(2, 1, figsize=(1.6 * len(tasks) + 2.5, 5.2), sharex=True)
    width = 0.7 / max(1, len(backbones))
    for i, b in enumerate(backbones):
        for ax, key in zip(axes, (measure, target)):
            xs, ys, es = [], [], []
            for j, t in enumerate(tasks):
                p = next((q for q in pairs if q["backbone"] == b and q["task"] == t), None)
                if p is not None and _mean(p.get(key)) is not None:
                    xs.append(j + (i - (len(backbones) - 1) / 2) * width)
                    ys.append(_mean(p[key]))
                    es.append(_sd(p[key]))
            ax.errorbar(xs, ys, yerr=es, fmt=MARKERS[i % len(MARKERS)], ms=6, capsize=2, color=f"C{i}",
                        label=b if ax is axes[0] else None)
    axes[0].set_ylabel(measure)
    axes[1].set_ylabel(target)
    axes[1].set_xticks(range(len(tasks)))
    axes[1].set_xticklabels([f"{SHORT.get(t, t)}\n{verdict.get(t, '')}" for t in tasks], fontsize=8)
    p = within.get("p_value")
    axes[0].set_title(f"Within tasks: the better-aligned backbone also had the better {target} in "
                      f"{within.get('agree', 0)} of {within.get('compared', 0)}"
                      + (f" (exact p = {p:.3f})" if p is not None else ""), fontsize=9)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer_figure(results, path: str, target: str = "gap_closed"):
    """One panel per transferability score: the pretrained model's score (x) against the pair's gain (y, mean
    ± SD over seeds), one marker per backbone; the panel title gives Spearman r and the within-task picks."""
    scores = results["transferability"]
    gain = {f"{p['backbone']}/{p['task']}": p[target] for p in results["pairs"]}
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.6), squeeze=False)
    for ax, (name, sc) in zip(axes[0], scores.items()):
        pts = [{"backbone": k.split("/")[0], "task": k.split("/")[1], "x": v, "y": _mean(gain[k]), "ye": _sd(gain[k])}
               for k, v in sc["values"].items() if v is not None and k in gain and _mean(gain[k]) is not None]
        for i, b in enumerate(dict.fromkeys(q["backbone"] for q in pts)):
            sel = [q for q in pts if q["backbone"] == b]
            ax.errorbar([q["x"] for q in sel], [q["y"] for q in sel], yerr=[q["ye"] for q in sel],
                        fmt=MARKERS[i % len(MARKERS)], ms=6, capsize=2, elinewidth=0.8, label=b)
        if pts:
            _label_points(ax, pts, "x", "y")
        c = sc["correlations"].get(f"{name}~{target}/spearman", {})
        pick = sc.get("picks_better", {})
        ax.set_title(f"{name}: Spearman {_num(c.get('r'))}, picks {pick.get('agree', 0):g}/{pick.get('pairs', 0)}",
                     fontsize=9)
        ax.set_xlabel(f"{name} (pretrained, before fine-tuning)")
        ax.set_ylabel(f"{target} (mean ± SD)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layer_profile_figure(profiles: dict, path: str, init: str = "pretrained"):
    """Where fine-tuning changes each network: one column per backbone, MMD^2 (top) and linear CKA (bottom)
    between each block's probe features before and after fine-tuning from ``init`` weights (x: the blocks in
    network order), one line per task, mean ± SD over seeds."""
    by_backbone = {}
    for pair, inits in profiles.items():
        if init in inits:
            b, t = pair.split("/", 1)
            by_backbone.setdefault(b, {})[t] = inits[init]
    fig, axes = plt.subplots(2, len(by_backbone), figsize=(4.4 * len(by_backbone), 6.2), squeeze=False)
    for col, (b, tasks) in enumerate(by_backbone.items()):
        layers = next(iter(tasks.values()))["layers"]
        x = np.arange(len(layers))
        for i, (t, p) in enumerate(tasks.items()):
            for row, k in enumerate(("mmd2", "cka")):
                axes[row][col].errorbar(x, p[f"{k}_mean"], yerr=p[f"{k}_sd"], fmt=MARKERS[i % len(MARKERS)] + "-",
                                        ms=4, capsize=2, lw=1, elinewidth=0.8, label=t)
        for row, ylabel in enumerate(("MMD\u00b2 before vs after", "linear CKA before vs after")):
            ax = axes[row][col]
            ax.set_xticks(x, [n.replace("stage", "s").replace("_block", ".b") for n in layers], rotation=60,
                          fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"{b} ({init} init)", fontsize=10)
        axes[1][col].set_xlabel("block (input \u2192 output)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def transfer_html(results, target: str = "gap_closed") -> str:
    rows = []
    for name, sc in (results.get("transferability") or {}).items():
        c = sc["correlations"].get(f"{name}~{target}/spearman", {})
        ci = f"{_num(c.get('ci_low'))} to {_num(c.get('ci_high'))}" if c.get("ci_low") is not None else "—"
        pick = sc.get("picks_better", {})
        rows.append(f"<tr><td>{_esc(name)}</td><td>{c.get('n', '')}</td><td>{_num(c.get('r'))}</td><td>{ci}</td>"
                    f"<td>{_num(c.get('p_value'), '.3f')}</td><td>{pick.get('agree', 0):g} of {pick.get('pairs', 0)}"
                    f"</td><td>{_esc(c.get('undefined', ''))}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Transferability scores (before fine-tuning)</h2><table><tr><th>score</th><th>pairs</th>"
            f"<th>Spearman r with {target}</th><th>CI</th><th>p (within-backbone)</th>"
            "<th>picks the backbone that gained more</th><th>note</th></tr>" + "".join(rows) + "</table>")


def _esc(v) -> str:
    return html.escape(str(v))


def _ids(ids, limit=12) -> str:
    ids = list(ids)
    head = ", ".join(map(str, ids[:limit]))
    if len(ids) <= limit:
        return _esc(head)
    return (f"<details><summary>{_esc(head)}, \u2026 ({len(ids)} in all)</summary>"
            f"{_esc(', '.join(map(str, ids)))}</details>")


def design_html(design: dict) -> str:
    """The design section: cohorts with case ids per split, probes, seeds, steps, model sizes, \u03c3 per pair."""
    if not design:
        return ""
    rows = []
    for label, key in (("pretraining cohort", "pretrain_cohort"), ("fine-tuning cohort", "finetune_cohort")):
        c = design.get(key) or {}
        splits = "; ".join(f"{s}: {n}" for s, n in (c.get("num_cases") or {}).items() if n)
        ids = "".join(f"<div>{_esc(s)}: {_ids(v)}</div>" for s, v in (c.get("case_ids") or {}).items() if v)
        rows.append(f"<tr><th>{label}</th><td>{_esc(c.get('manifest', ''))}<br>{_esc(splits)}{ids}</td></tr>")
    probes = design.get("probe_case_ids", [])
    splits = _esc(", ".join(design.get("probe_splits", [])))
    rows.append(f"<tr><th>probe cases</th><td>{len(probes)} held-out ({splits}): {_ids(probes)}</td></tr>")
    rows.append(f"<tr><th>seeds</th><td>{_esc(design.get('seeds', []))}</td></tr>")
    rows.append("<tr><th>steps</th><td>" + _esc(", ".join(f"{k} {v}" for k, v in design.get("steps", {}).items()))
                + "</td></tr>")
    models = "; ".join(f"{k}: {v.get('params', 0):,} parameters" + (f" ({v['arch']})" if v.get("arch") else "")
                       for k, v in design.get("models", {}).items())
    rows.append(f"<tr><th>models</th><td>{_esc(models)}</td></tr>")
    checks = ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'NO'}" for k, v in design.get("checks", {}).items())
    if checks:
        rows.append(f"<tr><th>checked</th><td>{_esc(checks)}</td></tr>")
    sig = design.get("sigma", {})
    if sig:
        sites = sorted({s for v in sig.values() if isinstance(v, dict) for s in v})
        body = "".join(f"<tr><td>{_esc(k)}</td>" + "".join(
            f"<td>{v.get(s, float('nan')):.4g}</td>" if isinstance(v, dict) else f"<td>{v:.4g}</td>" for s in sites)
            + "</tr>" for k, v in sig.items())
        rows.append("<tr><th>kernel \u03c3 per pair</th><td><table><tr><th>pair</th>"
                    + "".join(f"<th>{_esc(s)}</th>" for s in sites) + f"</tr>{body}</table></td></tr>")
    return "<h2>Design</h2><table>" + "".join(rows) + "</table>"


PAIR_COLUMNS = ("final_pretrained", "final_random", "gap_closed", "relative_gain", "convergence_steps",
                "convergence_steps_random")


def pairs_table_html(pairs, measures) -> str:
    """The per-task table: mean \u00b1 SD across seeds of every column."""
    cols = [c for c in (*PAIR_COLUMNS, *measures) if any(c in p for p in pairs)]
    head = "<tr><th>backbone</th><th>task</th><th>metric</th><th>seeds</th>" + "".join(
        f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
    body = "".join(f"<tr><td>{_esc(p['backbone'])}</td><td>{_esc(p['task'])}</td><td>{_esc(p.get('metric') or '')}</td>"
                   f"<td>{p.get('n_seeds', '')}</td>" + "".join(f"<td>{mean_sd(p.get(c))}</td>" for c in cols)
                   + "</tr>" for p in pairs)
    return f"<table>{head}{body}</table>"


def _num(v, spec="+.2f"):
    return "\u2014" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def correlations_html(correlations: dict) -> str:
    head = ("<tr><th>measure ~ target / method</th><th>pairs</th><th>r (pair means)</th><th>CI (hierarchical "
            "bootstrap)</th><th>within-backbone r</th><th>p (within-backbone permutation)</th><th>note</th></tr>")
    rows = []
    for k, c in correlations.items():
        wb = c.get("within_backbone") or {}
        note = c.get("undefined") or wb.get("undefined") or ""
        if c.get("pairs_left_out"):
            note += f" left out: {', '.join(c['pairs_left_out'])}"
        if wb.get("num_permutations"):
            note += f" ({'exact, ' if wb.get('exact') else ''}{wb['num_permutations']} orderings)"
        ci = (f"{_num(c.get('ci_low'))} to {_num(c.get('ci_high'))}" if c.get("ci_low") is not None else "\u2014")
        rows.append(f"<tr><td>{_esc(k)}</td><td>{c.get('n', '')}</td><td>{_num(c.get('r'))}</td><td>{ci}</td>"
                    f"<td>{_num(wb.get('r_within'))}</td><td>{_num(c.get('p_value'), '.3f')}</td>"
                    f"<td>{_esc(note.strip())}</td></tr>")
    null = next((c["within_backbone"]["null"] for c in correlations.values() if c.get("within_backbone")), "")
    return f"<table>{head}{''.join(rows)}</table>" + (f"<p>Permutation null: {_esc(null)}.</p>" if null else "")


def exclusions_html(results) -> str:
    counts = results.get("counts", {})
    excl = results.get("excluded", [])
    flags = results.get("flags", [])
    text = (f"<p>{counts.get('runs', 0)} runs; {counts.get('runs_excluded', 0)} excluded, "
            f"{counts.get('seed_units_excluded', 0)} seed unit(s) without both runs left out.</p>")
    if excl:
        text += "<table><tr><th>backbone</th><th>task</th><th>seed</th><th>init</th><th>reason</th></tr>" + "".join(
            f"<tr><td>{_esc(e['backbone'])}</td><td>{_esc(e['task'])}</td><td>{e['seed']}</td>"
            f"<td>{_esc(e['init'])}</td><td>{_esc(e['reason'])}</td></tr>" for e in excl) + "</table>"
    if flags:
        text += "<p>Degenerate gains: " + _esc("; ".join(f"{f['backbone']}/{f['task']} seed {f['seed']}: {f['flag']}"
                                                         for f in flags)) + "</p>"
    return text


def write_replicate_figures(results, out_dir: str, measure: str, target: str = "gap_closed") -> list[str]:
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    pairs = results["pairs"]
    paths = [os.path.join(fig_dir, n) for n in ("alignment_vs_gain.png", "alignment_vs_convergence.png",
                                               "within_task.png")]
    scatter_with_errors(pairs, measure, target, f"{measure} (mean \u00b1 SD over seeds)",
                        f"{target} (mean \u00b1 SD)", "Alignment vs gain (left = better aligned)", paths[0])
    scatter_with_errors(pairs, measure, "convergence_steps", f"{measure}", "steps to 90% of final metric",
                        "Alignment vs convergence", paths[1])
    within_task_figure(pairs, results.get("within_task", {}).get(f"{measure}~{target}", {}), measure, target, paths[2])
    if results.get("transferability"):
        paths.append(os.path.join(fig_dir, "transferability_vs_gain.png"))
        transfer_figure(results, paths[-1], target)
    if results.get("layer_profile"):
        paths.append(os.path.join(fig_dir, "layer_profile.png"))
        layer_profile_figure(results["layer_profile"], paths[-1])
    runs = results.get("runs") or {}
    sites = sorted({k.split("/")[1] for r in runs.values() for k in r.get("curve", {}) if k.startswith("align/")})
    if runs:
        for task in dict.fromkeys(p["task"] for p in pairs):
            if any(r["task"] == task for r in runs.values()):
                path = os.path.join(fig_dir, f"curves_{task}.png")
                _curves(results, task, path, sites)
                paths.append(path)
    return paths


def primary_measure(results) -> str:
    """results["primary_measure"], else mmd2_<primary_site> or mmd2, whichever the pairs carry."""
    if results.get("primary_measure"):
        return results["primary_measure"]
    site = results.get("primary_site")
    pairs = results["pairs"]
    return f"mmd2_{site}" if site and f"mmd2_{site}" in pairs[0] else "mmd2"


def write_replicate_report(results, out_dir: str) -> str:
    measure = primary_measure(results)
    target = results.get("primary_target", "gap_closed")
    figs = write_replicate_figures(results, out_dir, measure, target)
    measures = [k for k in results["pairs"][0] if isinstance(results["pairs"][0][k], dict)
                and k not in PAIR_COLUMNS]
    finding = results.get("finding", "")
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>vfm-align transfer study</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}img{{max-width:100%}}
.finding{{font-size:1.15em;background:#f3f6fa;padding:.8em}}</style>
</head><body><h1>Does the pretraining objective fit the task?</h1>
{design_html(results.get("design", {}))}
<h2>Finding</h2><p class="finding">{_esc(finding)}</p>
<p>Alignment = MMD\u00b2 (RFF, unbiased, Gaussian kernel with \u03c3 fixed per pair from the pretrained model's probe
features) between the backbone's features on the held-out probe cases before and after fine-tuning. Gain = fraction of
the gap to the metric's ceiling that pretraining closes, (pretrained \u2212 random init) / (ceiling \u2212 random init),
per seed (pretrained and random-init runs of one seed share head initialisation and batch order); the relative gain
(pretrained \u2212 random) / max(|random|, floor) is a secondary column. Final metrics on the test split; convergence
(first evaluated step reaching 90% of the run's final improvement) on the validation split. Each pair: mean \u00b1 SD
across seeds. Correlations on pair means; intervals from a hierarchical bootstrap (pairs, then seeds within pairs);
p-values from permuting alignment among the tasks of one backbone. The layer profile repeats the before/after
comparison at every block of each backbone (exact MMD² with σ from that block's starting features, and linear
CKA), from pretrained weights: where in the network fine-tuning moved the features.</p>
<h2>Main figures</h2>{''.join(_img(f) for f in figs if "curves_" not in f)}
<h2>Correlations</h2>{correlations_html(results.get("correlations", {}))}
<h2>Per task (mean \u00b1 SD across seeds)</h2>{pairs_table_html(results["pairs"], measures)}
<h2>Excluded runs</h2>{exclusions_html(results)}
{transfer_html(results, target)}
<h2>Learning and alignment curves</h2>{''.join(_img(f) for f in figs if "curves_" in f)}
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write(body)
    return path
