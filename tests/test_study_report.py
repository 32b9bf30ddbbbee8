"""The report shows the design above the findings, mean ± SD per task, error bars and the within-task figure;
one-seed results keep the original layout."""

import os

import numpy as np

from vfm_align.study.report import is_replicate_results, mean_sd, write_report
from vfm_align.study.stats import analyse, describe_finding

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ("classification", "segmentation", "detection", "super_resolution", "distortion_correction")


def _curve(rng, steps=(0, 5, 10)):
    return {"step": list(steps), "metric": sorted(rng.random(len(steps)).tolist()), "loss": [float("nan"), 1.0, 0.5],
            "align/pooled/mmd2": [0.0, 0.1, 0.2], "align/patch/mmd2": [0.0, 0.2, 0.3]}


def _records(rng):
    recs = []
    for b in ("reconstruction", "contrastive"):
        for t in TASKS:
            for s in range(3):
                for init in ("pretrained", "random"):
                    recs.append({"backbone": b, "task": t, "seed": s, "init": init, "metric_name": "auroc",
                                 "final_metric": float(0.5 + 0.4 * rng.random()), "mmd2_pooled": float(rng.random()),
                                 "convergence_steps": int(rng.integers(1, 10)) * 5, "diverged": False})
    recs[7] = {**recs[7], "diverged": True, "diverged_step": 35, "final_metric": float("nan")}
    return recs


def test_replicate_report(tmp_path):
    rng = np.random.default_rng(0)
    recs = _records(rng)
    stats = analyse(recs, {t: (1.0, True) for t in TASKS}, measures=("mmd2_pooled",), num_bootstrap=100,
                    num_permutations=200)
    design = {"pretrain_cohort": {"manifest": "/x/pre/manifest.csv", "num_cases": {"train": 40},
                                  "case_ids": {"train": [f"pre-phantom{i:04d}" for i in range(40)]}},
              "finetune_cohort": {"manifest": "/x/fine/manifest.csv", "num_cases": {"train": 70, "val": 15, "test": 15},
                                  "case_ids": {"train": ["phantom0000"], "val": ["phantom0070"], "test": []}},
              "probe_case_ids": ["phantom0070"], "probe_splits": ["val"], "seeds": [0, 1, 2],
              "steps": {"pretrain": 400, "finetune": 150}, "models": {"contrastive": {"params": 123456}},
              "sigma": {"contrastive/classification": {"pooled": 1.25, "patch": 2.5}},
              "checks": {"cohorts_disjoint": True, "probes_outside_train": True}}
    runs = {f"{r['backbone']}__{r['task']}__{r['init']}__s{r['seed']}": {**r, "curve": _curve(rng)} for r in recs}
    results = {"design": design, "primary_site": "pooled", **stats, "runs": runs,
               "finding": describe_finding(stats, "mmd2_pooled")}
    assert is_replicate_results(results)
    out = str(tmp_path)
    path = write_report(results, out)
    page = open(path).read()
    assert page.index("<h2>Design</h2>") < page.index("<h2>Finding</h2>")
    assert "pre-phantom0000" in page and "123,456 parameters" in page and "1.25" in page
    first = results["pairs"][0]
    assert mean_sd(first["gap_closed"]) in page and "\u00b1" in mean_sd(first["gap_closed"])
    assert "diverged at step 35" in page  # the excluded run, with its reason
    assert html_escaped(results["finding"]) in page
    for name in ("alignment_vs_gain.png", "alignment_vs_convergence.png", "within_task.png",
                 *(f"curves_{t}.png" for t in TASKS)):
        with open(os.path.join(out, "figures", name), "rb") as fh:
            data = fh.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000


def html_escaped(s):
    import html

    return html.escape(s)


def test_mean_sd_formats():
    assert mean_sd({"mean": 0.5, "sd": 0.125, "n": 3}) == "0.5 \u00b1 0.12"
    assert mean_sd({"mean": 0.5, "sd": None, "n": 1}) == "0.5 (n=1)"
    assert mean_sd({"mean": None, "sd": None, "n": 0}) == "\u2014"


def test_one_seed_results_keep_the_original_layout(tmp_path):
    rng = np.random.default_rng(1)
    pairs, runs = [], {}
    for b in ("reconstruction", "contrastive"):
        for t in TASKS:
            pairs.append({"backbone": b, "task": t, "metric": "auroc", "final_pretrained": 0.7, "final_random": 0.6,
                          "gain": float(rng.random()), "convergence_steps": 10, "mmd2_pooled": float(rng.random()),
                          "cka_pooled": 0.9, "p_value_pooled": 0.01})
            for init in ("pretrained", "random"):
                runs[f"{b}__{t}__{init}"] = {"backbone": b, "task": t, "init": init, "metric_name": "auroc",
                                             "curve": _curve(rng)}
    corr = {"mmd2_pooled~gain/spearman": {"method": "spearman", "r": 0.1, "ci_low": -0.5, "ci_high": 0.6,
                                          "p_value": 0.7},
            "mmd2_pooled~convergence_steps/spearman": {"method": "spearman", "r": float("nan"), "ci_low": float("nan"),
                                                       "ci_high": float("nan"), "p_value": None,
                                                       "undefined": "constant column"}}
    results = {"primary_site": "pooled", "pairs": pairs, "correlations": corr, "runs": runs, "finding": "No finding."}
    assert not is_replicate_results(results)
    page = open(write_report(results, str(tmp_path))).read()
    assert "<h2>Pairs</h2>" in page and "No finding." in page
    assert os.path.isfile(tmp_path / "figures" / "alignment_vs_gain.png")
