"""End to end: the quick study writes a complete report with its design, reports MMD^2 = 0 before any update,
resumes without redoing runs (and refuses or recomputes when the config changed), and is deterministic."""

import copy
import json
import os
import shutil

import numpy as np
import pytest

from vfm_align.config_file import default_config_path, load_config
from vfm_align.data.cohort import read_manifest
from vfm_align.data.tasks import get_task
from vfm_align.errors import ConfigError
from vfm_align.study.finetune import steps_to_fraction
from vfm_align.study.runner import run_study
from vfm_align.study.taskdata import TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cfg = load_config(default_config_path("study_quick"))
    out = str(tmp_path_factory.mktemp("study") / "a")
    results = run_study(cfg, out, progress=False)
    return cfg, out, results


def test_report_contents(quick):
    cfg, out, results = quick
    pairs = {(p["backbone"], p["task"]) for p in results["pairs"]}
    assert pairs == {(b, t) for b in ("reconstruction", "contrastive") for t in TASKS}
    for p in results["pairs"]:  # gap closed per seed unit, from the runs' test metrics
        ceiling = get_task(p["task"]).ceiling
        pre, rnd = p["final_pretrained"]["values"], p["final_random"]["values"]
        want = [(a - r) / (ceiling - r) if ceiling != r else 0.0 for a, r in zip(pre, rnd)]
        np.testing.assert_allclose(p["gap_closed"]["values"], want, rtol=1e-12, atol=1e-12)
        assert p["gap_closed"]["mean"] == pytest.approx(np.mean(want))
        assert np.isfinite(p["mmd2_pooled"]["mean"])
    for run in results["runs"].values():  # each final MMD^2 carries its permutation test under the pair's sigma
        t = run["tests"]["pooled"]
        assert 0.0 < t["p_value"] <= 1.0 and t["sigma"] == pytest.approx(run["sigma"]["pooled"])
    for key in ("mmd2_pooled~gap_closed/spearman", "mmd2_pooled~gap_closed/pearson",
                "mmd2_pooled~convergence_steps/spearman"):
        assert key in results["correlations"]
    g = results["correlations"]["mmd2_pooled~gap_closed/spearman"]
    if g["r"] is not None:
        assert -1.0 <= g["r"] <= 1.0 and g["ci_low"] <= g["ci_high"]
        assert f"{g['r']:+.2f}" in results["finding"]
    figs = os.path.join(out, "figures")
    names = {"alignment_vs_gain.png", "alignment_vs_convergence.png", "within_task.png",
             *(f"curves_{t}.png" for t in TASKS)}
    assert names <= set(os.listdir(figs))
    for n in names:
        with open(os.path.join(figs, n), "rb") as fh:
            data = fh.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    html = open(os.path.join(out, "report.html")).read()
    assert "<h2>Design</h2>" in html and "data:image/png;base64," in html
    lines = open(os.path.join(out, "results.csv")).read().strip().splitlines()
    assert len(lines) == 1 + 10
    # The pretrained backbones are loadable model directories.
    import vfm_align

    assert vfm_align.load(os.path.join(out, "pretrained", "reconstruction")) is not None


def test_design_disjoint_cohorts_held_out_probes_replicate_seeds(quick):
    cfg, out, results = quick
    d = results["design"]
    pre = {i for v in d["pretrain_cohort"]["case_ids"].values() for i in v}
    fine = d["finetune_cohort"]["case_ids"]
    assert pre and fine["train"] and fine["val"] and fine["test"]
    assert not pre & {i for v in fine.values() for i in v}
    # the manifests themselves, not only the design section, say so
    manifest = read_manifest(os.path.join(out, "cohort", "manifest.csv"))
    assert {c.case_id for c in manifest.cases} == {i for v in fine.values() for i in v}
    assert not pre & {c.case_id for c in manifest.cases}
    train = {c.case_id for c in manifest.split("train")}
    assert d["num_probe_cases"] == cfg.finetune.probe_cases and not set(d["probe_case_ids"]) & train
    assert len(d["seeds"]) >= 2
    for p in results["pairs"]:
        assert p["n_seeds"] >= 2 and len(set(p["seeds"])) == p["n_seeds"]
    assert set(d["sigma"]) == {f"{b}/{t}" for b in ("reconstruction", "contrastive") for t in TASKS}
    assert d["models"]["reconstruction"]["params"] > 0


def test_mmd2_is_zero_at_step_0_for_every_run_and_uses_the_pairs_sigma(quick):
    cfg, out, results = quick
    assert len(results["runs"]) == 2 * 5 * 2 * 2
    for key, run in results["runs"].items():
        c = run["curve"]
        assert c["step"][0] == 0
        for s in cfg.finetune.sites:
            assert c[f"align/{s}/mmd2"][0] == 0.0, key
        # one kernel per (backbone, task): every run of the pair, both inits and all seeds
        assert run["sigma"] == results["design"]["sigma"][f"{run['backbone']}/{run['task']}"], key


def test_transferability_scores_per_run_and_against_gain(quick):
    cfg, out, results = quick
    from vfm_align.align.transferability import SCORES

    for run in results["runs"].values():  # scored on the pretrained model, before fine-tuning
        assert ("transfer" in run) == (run["init"] == "pretrained")
    tr = results["transferability"]
    assert set(tr) == set(SCORES)
    rankme = tr["rankme"]  # defined for any features: one value per pair, in the statistics
    assert len(rankme["values"]) == 10 and all(v is not None and v >= 0.99 for v in rankme["values"].values())
    assert rankme["correlations"]["rankme~gap_closed/spearman"]["n"] == 10
    assert rankme["picks_better"]["pairs"] <= 5
    assert "transferability_vs_gain.png" in os.listdir(os.path.join(out, "figures"))


def test_layer_profile_per_run_and_per_pair(quick):
    cfg, out, results = quick
    for key, run in results["runs"].items():  # the quick study's backbones have one block each
        prof = run["layer_profile"]
        assert prof["layers"] == ["block0"], key
        assert all(np.isfinite(prof["mmd2"])) and all(-1e-6 <= c <= 1 + 1e-6 for c in prof["cka"]), key
    lp = results["layer_profile"]
    assert set(lp) == {f"{b}/{t}" for b in ("reconstruction", "contrastive") for t in TASKS}
    for pair, by_init in lp.items():
        b, t = pair.split("/")
        for init in ("pretrained", "random"):
            runs = [r["layer_profile"] for r in results["runs"].values()
                    if r["backbone"] == b and r["task"] == t and r["init"] == init]
            want = np.array([r["mmd2"] for r in runs])
            np.testing.assert_allclose(by_init[init]["mmd2_mean"], want.mean(0), rtol=1e-12)
            np.testing.assert_allclose(by_init[init]["mmd2_sd"], want.std(0, ddof=1), rtol=1e-12)
            assert by_init[init]["seeds"] == len(runs) == 2
    assert "layer_profile.png" in os.listdir(os.path.join(out, "figures"))


def test_resume_with_a_changed_config_refuses_or_recomputes(quick, tmp_path):
    cfg, out, results = quick
    part = str(tmp_path / "c")
    shutil.copytree(out, part)
    changed = load_config(default_config_path("study_quick"), ["finetune.steps=2", 'tasks=["classification"]'])
    with pytest.raises(ConfigError, match=r"finetune\.steps: 4 -> 2"):
        run_study(changed, part, progress=False)
    assert json.load(open(os.path.join(part, "results.json")))["runs"].keys() == results["runs"].keys()
    pre_stamp = os.stat(os.path.join(part, "pretrained", "reconstruction")).st_mtime_ns
    again = run_study(changed, part, progress=False, overwrite=True)
    runs = sorted(os.listdir(os.path.join(part, "runs")))
    assert runs and all("__classification__" in r for r in runs)  # the stale runs of other tasks are gone
    for r in again["runs"].values():
        assert r["curve"]["step"][-1] == 2  # recomputed with the new budget, not reused
    # the pretraining did not depend on the changed keys and was kept
    assert os.stat(os.path.join(part, "pretrained", "reconstruction")).st_mtime_ns == pre_stamp


def test_resume_and_determinism(quick, tmp_path):
    cfg, out, results = quick
    # Simulate an interruption: drop a few finished runs (every run of one task) and the summary.
    part = str(tmp_path / "b")
    shutil.copytree(out, part)
    runs = sorted(os.listdir(os.path.join(part, "runs")))
    redo = [r for r in runs if "__segmentation__" in r]
    kept = [r for r in runs if r not in redo]
    assert len(redo) == 2 * 2 * 2  # backbones x inits x seeds
    for r in redo:
        os.remove(os.path.join(part, "runs", r))
    os.remove(os.path.join(part, "results.json"))
    stamps = {r: os.stat(os.path.join(part, "runs", r)).st_mtime_ns for r in kept}
    # The first study ran its fine-tunes two at a time; the redo runs them one by one, so the comparison
    # below also checks that concurrent runs give the numbers of sequential ones.
    assert cfg.workers == 2
    cfg = copy.deepcopy(cfg)
    cfg.workers = 1
    again = run_study(cfg, part, progress=False)
    for r in kept:  # completed runs were skipped, not recomputed
        assert os.stat(os.path.join(part, "runs", r)).st_mtime_ns == stamps[r]
    # The recomputed runs reproduce the first study (same seed, same numbers). Metrics, steps and
    # p-values must match exactly; float32 feature scores are compared to 1e-5 relative because
    # XLA:CPU may split reductions differently between compilations.
    for r in redo:
        a = json.load(open(os.path.join(out, "runs", r)))
        b = json.load(open(os.path.join(part, "runs", r)))
        assert a["curve"]["step"] == b["curve"]["step"] and a["curve"]["metric"] == b["curve"]["metric"]
        assert a["final_metric"] == b["final_metric"] and a["sigma"] == b["sigma"]
        for k in a["curve"]:
            np.testing.assert_allclose(a["curve"][k], b["curve"][k], rtol=1e-5, atol=1e-6, err_msg=f"{r}: {k}")
        for site in a["tests"]:
            assert a["tests"][site]["p_value"] == b["tests"][site]["p_value"]
    assert [p["task"] for p in again["pairs"]] == [p["task"] for p in results["pairs"]]
    for pa, pb in zip(again["pairs"], results["pairs"]):
        for k, v in pa.items():
            if isinstance(v, dict):  # mean / sd / values over seeds
                for a, b in zip(v["values"], pb[k]["values"]):
                    assert a == pytest.approx(b, rel=1e-5, abs=1e-6), k
            else:
                assert v == pb[k], k


def test_steps_to_fraction():
    # metric 0.5 -> 0.9: 90 % of the improvement is 0.86, first reached at step 30.
    assert steps_to_fraction([0, 10, 20, 30, 40], [0.5, 0.7, 0.8, 0.87, 0.9]) == 30
    # A run that never improves counts as converged at its last step.
    assert steps_to_fraction([0, 10, 20], [0.5, 0.4, 0.45]) == 20


def test_run_concurrently_runs_every_job_and_stops_all_on_the_first_error():
    import threading
    import time

    from vfm_align.errors import Stopped
    from vfm_align.study.runner import run_concurrently

    done, lock = [], threading.Lock()

    def ok(i, stop):
        time.sleep(0.01 * (i % 3))
        with lock:
            done.append(i)

    run_concurrently(ok, [(i,) for i in range(7)], workers=2)
    assert sorted(done) == list(range(7))

    started, stopped = [], []

    def failing(i, stop):
        started.append(i)
        if i == 1:
            time.sleep(0.05)
            raise ValueError("run 1 failed")
        for _ in range(500):  # a long run that checks the stop flag every step, as run_finetune does
            if stop.is_set():
                stopped.append(i)
                raise Stopped(str(i))
            time.sleep(0.01)

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="run 1 failed"):
        run_concurrently(failing, [(i,) for i in range(6)], workers=2)
    assert time.perf_counter() - t0 < 4.0  # not the 5 s a long run takes to finish by itself
    assert stopped == [0] and sorted(started) == [0, 1]  # the running one stopped, the queued ones never ran
