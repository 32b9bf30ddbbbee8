"""End to end: the quick study writes a complete report, resumes without redoing runs, and is deterministic."""

import copy
import json
import os
import shutil

import numpy as np
import pytest

from vfm_align.config_file import default_config_path, load_config
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
    for p in results["pairs"]:
        want = (p["final_pretrained"] - p["final_random"]) / max(abs(p["final_random"]), cfg.gain_floor)
        assert p["gain"] == pytest.approx(want)
        assert np.isfinite(p["mmd2_pooled"]) and 0.0 < p["p_value_pooled"] <= 1.0
    for key in ("mmd2_pooled~gain/spearman", "mmd2_pooled~gain/pearson", "mmd2_pooled~convergence_steps/spearman"):
        assert key in results["correlations"]
    g = results["correlations"]["mmd2_pooled~gain/spearman"]
    assert -1.0 <= g["r"] <= 1.0 and g["ci_low"] <= g["ci_high"]
    figs = os.path.join(out, "figures")
    names = {"alignment_vs_gain.png", "alignment_vs_convergence.png", *(f"curves_{t}.png" for t in TASKS)}
    assert names <= set(os.listdir(figs))
    for n in names:
        with open(os.path.join(figs, n), "rb") as fh:
            data = fh.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    html = open(os.path.join(out, "report.html")).read()
    assert results["finding"].split(":")[0] in html.replace("&#x27;", "'")
    assert "data:image/png;base64," in html
    assert f"{g['r']:+.2f}" in results["finding"]
    lines = open(os.path.join(out, "results.csv")).read().strip().splitlines()
    assert len(lines) == 1 + 10
    # The pretrained backbones are loadable model directories.
    import vfm_align

    assert vfm_align.load(os.path.join(out, "pretrained", "reconstruction")) is not None


def test_resume_and_determinism(quick, tmp_path):
    cfg, out, results = quick
    # Simulate an interruption: drop a few finished runs (both inits of one pair per backbone) and the summary.
    part = str(tmp_path / "b")
    shutil.copytree(out, part)
    runs = sorted(os.listdir(os.path.join(part, "runs")))
    redo = [r for r in runs if "__segmentation__" in r]
    kept = [r for r in runs if r not in redo]
    assert len(redo) == 4
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
        for k in a["curve"]:
            np.testing.assert_allclose(a["curve"][k], b["curve"][k], rtol=1e-5, atol=1e-6, err_msg=f"{r}: {k}")
        for site in a["tests"]:
            assert a["tests"][site]["p_value"] == b["tests"][site]["p_value"]
    assert [p["task"] for p in again["pairs"]] == [p["task"] for p in results["pairs"]]
    for pa, pb in zip(again["pairs"], results["pairs"]):
        for k, v in pa.items():
            if isinstance(v, float):
                assert v == pytest.approx(pb[k], rel=1e-5, abs=1e-6), k
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
