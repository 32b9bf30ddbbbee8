"""Figures (PNG, matplotlib) and a self-contained report.html for a finished study."""

from __future__ import annotations

import base64
import html
import os

import matplotlib

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


def _scatter(pairs, xkey, ykey, xlabel, ylabel, title, path):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    backbones = sorted({p["backbone"] for p in pairs})
    for i, b in enumerate(backbones):
        sel = [p for p in pairs if p["backbone"] == b]
        ax.scatter([p[xkey] for p in sel], [p[ykey] for p in sel], marker=MARKERS[i % len(MARKERS)], s=50, label=b)
    _label_points(ax, pairs, xkey, ykey)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(results, task, path, sites):
    runs = [r for r in results["runs"].values() if r["task"] == task]
    fig, axes = plt.subplots(1, 1 + len(sites), figsize=(4.2 * (1 + len(sites)), 3.6))
    for r in runs:
        ls = "-" if r["init"] == "pretrained" else "--"
        axes[0].plot(r["curve"]["step"], r["curve"]["metric"], ls, label=f"{r['backbone']} ({r['init']})")
        if r["init"] == "pretrained":
            for ax, s in zip(axes[1:], sites):
                ax.plot(r["curve"]["step"], r["curve"][f"align/{s}/mmd2"], label=r["backbone"])
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
    figs = write_figures(results, out_dir)
    site = results["primary_site"]
    cols = ["backbone", "task", "metric", "final_pretrained", "final_random", "gain", "convergence_steps",
            f"mmd2_{site}", f"cka_{site}", f"p_value_{site}"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    rows = "".join("<tr>" + "".join(f"<td>{fmt(p[c])}</td>" for c in cols) + "</tr>" for p in results["pairs"])
    corr_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{fmt(v.get('r', float('nan')))}</td><td>{fmt(v.get('ci_low', float('nan')))}"
        f" to {fmt(v.get('ci_high', float('nan')))}</td><td>{fmt(v.get('p_value', float('nan')))}</td></tr>"
        for k, v in results["correlations"].items())
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>vfm-align transfer study</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}img{{max-width:100%}}.finding{{font-size:1.15em;background:#f3f6fa;padding:.8em}}</style>
</head><body><h1>Does the pretraining objective fit the task?</h1>
<p class="finding"><b>Finding.</b> {html.escape(results['finding'])}</p>
<p>Alignment = MMD\u00b2 (RFF, unbiased, Gaussian kernel with the median bandwidth of the pretrained features) between the
backbone's features on a fixed probe set before and after fine-tuning; gain = (pretrained \u2212 random init) / max(|random init|, floor) of
the final validation metric at the same budget; convergence = first evaluated step reaching 90% of the run's final improvement.
p-values: paired (within-pair swap) permutation test of the MMD.</p>
<h2>Main figure</h2>{_img(figs[0])}{_img(figs[1])}
<h2>Pairs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>
<h2>Correlations (bootstrap 95% CI, permutation p)</h2><table><tr><th>measure ~ target / method</th><th>r</th><th>CI</th><th>p</th></tr>{corr_rows}</table>
<h2>Learning and alignment curves</h2>{''.join(_img(f) for f in figs[2:])}
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as fh:
        fh.write(body)
    return path
