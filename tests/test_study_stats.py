"""Study statistics against scipy's independent implementations and worked examples."""

import numpy as np
import pytest

from vfm_align.errors import DataError
from vfm_align.study.stats import correlate, pearson, spearman


def test_pearson_matches_numpy_and_spearman_worked_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + rng.normal(0, 1.5, 12)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # By hand: ranks of x = [1, 2.5, 2.5, 4], of y = [1, 2, 3, 4] -> Pearson of the ranks.
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4.0])
    dx, dy = rx - rx.mean(), ry - ry.mean()
    expected = (dx * dy).sum() / np.sqrt((dx**2).sum() * (dy**2).sum())
    assert spearman([0.1, 0.5, 0.5, 2.0], [3.0, 4.0, 5.0, 9.0]) == pytest.approx(expected, abs=1e-12)


def test_worked_example():
    # Perfectly monotone but non-linear: Spearman 1, Pearson < 1.
    x = np.arange(1, 11, dtype=float)
    y = x**3
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.95
    res = correlate(x, y, num_bootstrap=500, num_permutations=2000)
    assert res.r == pytest.approx(1.0)
    # Only the identity ordering reaches |r| = 1 (and its reverse): p is about 1/(P+1) to 3/(P+1).
    assert res.p_value < 0.01
    assert res.ci_low <= res.r <= res.ci_high + 1e-12


def test_null_p_values_not_small():
    rng = np.random.default_rng(1)
    ps = [correlate(rng.normal(size=10), rng.normal(size=10), num_bootstrap=50, num_permutations=400, seed=s).p_value
          for s in range(40)]
    # Under independence p-values are ~uniform: about 5 % fall below 0.05.
    assert np.mean(np.array(ps) < 0.05) <= 0.15
    assert 0.3 < np.mean(ps) < 0.7


def test_bad_input():
    with pytest.raises(DataError):
        correlate([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(DataError):
        correlate([1, 2, 3], [1, 2, 3], method="kendall")


# ---------------------------------------------------------------------------------------------
# Undefined correlations, exclusions, gains, the grouped tests and the hierarchical bootstrap

import itertools  # noqa: E402
import math  # noqa: E402

from scipy.stats import binomtest  # noqa: E402

from vfm_align.study.gains import RANDOM_AT_CEILING, gap_closed, relative_gain  # noqa: E402
from vfm_align.study.stats import (  # noqa: E402
    _poisson_binomial,
    analyse,
    describe_finding,
    hierarchical_bootstrap,
    resample_pairs,
    stratified_permutation_test,
    within_task_comparison,
)


def test_constant_column_is_undefined_without_a_p_value():
    # Regression: a constant column used to give r = NaN with p = 1/(P+1) = 0.005.
    res = correlate([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], num_bootstrap=50, num_permutations=199)
    assert np.isnan(res.r) and res.p_value is None and np.isnan(res.ci_low)
    assert "constant column" in res.undefined
    few = correlate([1.0, 2.0], [2.0, 1.0])
    assert np.isnan(few.r) and few.p_value is None and "fewer than 3" in few.undefined


def test_gap_closed_worked_examples():
    assert gap_closed(0.8, 0.6, 1.0) == (pytest.approx(0.5), None)  # (0.8-0.6)/(1-0.6)
    assert gap_closed(0.5, 0.6, 1.0)[0] == pytest.approx(-0.25)
    # Lower is better (an error with ceiling 0): 4 -> 1 closes 3/4 of the gap.
    assert gap_closed(1.0, 4.0, 0.0, higher_is_better=False) == (pytest.approx(0.75), None)
    assert gap_closed(1.0, 1.0, 1.0) == (0.0, RANDOM_AT_CEILING)
    assert math.isnan(gap_closed(30.0, 25.0, None)[0])
    with pytest.raises(DataError, match="beyond its ceiling"):
        gap_closed(1.2, 0.5, 1.0)
    assert relative_gain(0.3, 0.02, 0.05) == pytest.approx(0.28 / 0.05)
    assert relative_gain(2.0, 4.0, 0.05, higher_is_better=False) == pytest.approx(0.5)


def _rec(b, t, s, init, metric, mmd2=0.1, conv=10, **kw):
    return {"backbone": b, "task": t, "seed": s, "init": init, "final_metric": metric, "mmd2": mmd2,
            "convergence_steps": conv, "diverged": False, **kw}


def test_analyse_worked_example_by_hand():
    # Two backbones x three tasks x two seeds, AUROC-like metrics with ceiling 1.
    recs, expect_x, expect_y = [], [], []
    table = {("A", "t1"): [(0.9, 0.5, 0.10), (0.7, 0.5, 0.20)], ("A", "t2"): [(0.8, 0.6, 0.30), (0.8, 0.6, 0.50)],
             ("A", "t3"): [(0.6, 0.6, 0.60), (0.7, 0.6, 0.40)], ("B", "t1"): [(0.75, 0.5, 0.05), (0.75, 0.5, 0.15)],
             ("B", "t2"): [(0.7, 0.6, 0.70), (0.6, 0.6, 0.90)], ("B", "t3"): [(0.9, 0.8, 0.20), (0.8, 0.8, 0.20)]}
    for (b, t), seeds in table.items():
        gaps = []
        for s, (pre, rnd, mmd) in enumerate(seeds):
            recs += [_rec(b, t, s, "pretrained", pre, mmd, conv=10 + s), _rec(b, t, s, "random", rnd, None)]
            gaps.append((pre - rnd) / (1 - rnd))
        expect_x.append(np.mean([m for _, _, m in seeds]))
        expect_y.append(np.mean(gaps))
    # By hand: A/t1 gaps 0.8, 0.4 -> 0.6; A/t2 0.5, 0.5; A/t3 0, 0.25 -> 0.125; B/t1 0.5; B/t2 0.25, 0 -> 0.125;
    # B/t3 0.5, 0 -> 0.25.
    assert expect_y == pytest.approx([0.6, 0.5, 0.125, 0.5, 0.125, 0.25])
    info = {t: (1.0, True) for t in ("t1", "t2", "t3")}
    res = analyse(recs, info, num_bootstrap=200, num_permutations=500)
    pairs = {(p["backbone"], p["task"]): p for p in res["pairs"]}
    assert pairs[("A", "t1")]["gap_closed"]["mean"] == pytest.approx(0.6)
    assert pairs[("A", "t1")]["gap_closed"]["sd"] == pytest.approx(np.std([0.8, 0.4], ddof=1))
    assert pairs[("A", "t1")]["mmd2"]["mean"] == pytest.approx(0.15)
    c = res["correlations"]["mmd2~gap_closed/pearson"]
    assert c["r"] == pytest.approx(np.corrcoef(expect_x, expect_y)[0, 1], abs=1e-12)
    assert c["ci_low"] <= c["r"] <= c["ci_high"] and c["n"] == 6
    # 3! x 3! = 36 within-backbone orderings: enumerated, exact.
    assert c["within_backbone"]["exact"] and c["within_backbone"]["num_permutations"] == 36
    conv = res["correlations"]["mmd2~convergence_steps/spearman"]  # every pair converged at 10.5 steps
    assert conv["r"] is None and conv["p_value"] is None and "constant column" in conv["undefined"]
    # Within task, lower MMD^2 with larger gain: t1 B (0.10 < 0.15) but A gains more -> disagree;
    # t2 A (0.4 < 0.8) and A gains more -> agree; t3 B (0.2 < 0.5), B gains more (0.25 > 0.125) -> agree.
    w = res["within_task"]["mmd2~gap_closed"]
    assert (w["agree"], w["compared"]) == (2, 3)
    assert w["p_value"] == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    text = describe_finding(res, "mmd2", "gap_closed", "pearson")
    assert f"Pearson r {c['r']:+.2f}" in text and "in 2 of 3 task(s) (exact p = 1.000)" in text
    assert "undefined (constant column" in describe_finding(res, "mmd2", "convergence_steps")


def test_diverged_runs_are_excluded_with_reasons_and_counted():
    info = {t: (1.0, True) for t in ("t1", "t2", "t3")}
    recs = []
    rng = np.random.default_rng(0)
    for b in ("A", "B"):
        for t in ("t1", "t2", "t3"):
            for s in range(3):
                recs += [_rec(b, t, s, "pretrained", 0.7 + 0.1 * rng.random(), rng.random()),
                         _rec(b, t, s, "random", 0.6)]
    recs[0] = {**recs[0], "diverged": True, "diverged_step": 40, "final_metric": float("nan")}  # A/t1 seed 0
    recs[3] = {**recs[3], "final_metric": float("nan")}  # A/t1 seed 1, random
    recs = [r for r in recs if not (r["backbone"] == "B" and r["task"] == "t2")] + \
        [_rec("B", "t2", s, "random", 0.6, diverged=True) for s in range(3)] + \
        [_rec("B", "t2", s, "pretrained", 0.7) for s in range(3)]
    res = analyse(recs, info, num_bootstrap=100, num_permutations=200)
    reasons = {(e["backbone"], e["task"], e["seed"], e["init"]): e["reason"] for e in res["excluded"]}
    assert reasons[("A", "t1", 0, "pretrained")] == "diverged at step 40"
    assert reasons[("A", "t1", 1, "random")] == "final_metric is nan"
    assert res["counts"]["runs_excluded"] == 5 and res["counts"]["seed_units_excluded"] == 5
    pairs = {(p["backbone"], p["task"]): p for p in res["pairs"]}
    assert pairs[("A", "t1")]["seeds"] == [2] and pairs[("B", "t2")]["n_seeds"] == 0
    assert res["counts"]["pairs_without_seeds"] == ["B/t2"]
    c = res["correlations"]["mmd2~gap_closed/spearman"]
    assert c["n"] == 5 and c["pairs_left_out"] == ["B/t2"] and c["r"] is not None


def _within_stat_brute(x, y, strata):
    """Within-stratum Pearson by its definition, for an independent check."""
    xc, yc = x.copy(), y.copy()
    for s in set(strata):
        m = np.array(strata) == s
        xc[m] -= x[m].mean()
        yc[m] -= y[m].mean()
    return (xc * yc).sum() / np.sqrt((xc**2).sum() * (yc**2).sum())


def test_stratified_permutation_exact_and_monte_carlo_agree_with_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=7), rng.normal(size=7)
    y[:4] += 1.5 * x[:4]
    strata = ["A"] * 4 + ["B"] * 3
    obs = _within_stat_brute(x, y, strata)
    # Every permutation of all 7 indices; keep those that map each stratum onto itself (4! x 3! = 144).
    hits = total = 0
    for perm in itertools.permutations(range(7)):
        if all(strata[i] == strata[j] for i, j in zip(perm, range(7))):
            total += 1
            hits += abs(_within_stat_brute(x[list(perm)], y, strata)) >= abs(obs) - 1e-12
    assert total == 144
    exact = stratified_permutation_test(x, y, strata, method="pearson")
    assert exact.exact and exact.r_within == pytest.approx(obs, abs=1e-12)
    assert exact.p_value == pytest.approx(hits / total, abs=1e-12)
    mc = stratified_permutation_test(x, y, strata, method="pearson", exact_limit=0, num_permutations=20000, seed=1)
    assert not mc.exact and abs(mc.p_value - hits / total) < 4 * np.sqrt(0.25 / 20000) + 1e-4
    one_each = stratified_permutation_test([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], ["A", "B", "C"])
    assert one_each.p_value is None and one_each.undefined


def test_within_task_comparison_ties_and_exact_p():
    pairs = [{"backbone": b, "task": t, "m": m, "g": g} for b, t, m, g in [
        ("A", "t1", 0.1, 0.9), ("B", "t1", 0.2, 0.1),   # agree
        ("A", "t2", 0.1, 0.9), ("B", "t2", 0.2, 0.1),   # agree
        ("A", "t3", 0.3, 0.5), ("B", "t3", 0.3, 0.4),   # tie in m
        ("A", "t4", 0.1, 0.2), ("B", "t4", 0.2, 0.9),   # disagree
        ("A", "t5", 0.1, 0.9), ("B", "t5", 0.2, 0.1)]]  # agree
    res = within_task_comparison(pairs, "m", "g")
    assert (res["agree"], res["compared"], res["ties_or_undefined"]) == (3, 4, 1)
    assert [r["agree"] for r in res["tasks"]] == [True, True, None, False, True]
    assert res["tasks"][2]["why"] == "tie in m"
    assert res["p_value"] == pytest.approx(binomtest(3, 4, 0.5).pvalue)
    assert res["p_value_greater"] == pytest.approx(binomtest(3, 4, 0.5, alternative="greater").pvalue)
    # Unequal success probabilities: brute force over all outcomes.
    probs = [0.5, 1 / 3, 0.25]
    brute = np.zeros(4)
    for outcome in itertools.product([0, 1], repeat=3):
        brute[sum(outcome)] += np.prod([q if o else 1 - q for q, o in zip(probs, outcome)])
    assert _poisson_binomial(probs) == pytest.approx(brute, abs=1e-15)


@pytest.mark.parametrize("strata", [None, [0] * 8 + [1] * 7])
def test_hierarchical_bootstrap_interval_covers_the_known_correlation(strata):
    # 15 pairs with true values of correlation 0.6, three seeds each with noise 0.5: the pair means then
    # correlate at 0.6 / (1 + 0.25 / 3). A nominal 90 % interval should cover that about 90 % of the time.
    rng = np.random.default_rng(0)
    truth = 0.6 / (1 + 0.25 / 3)
    hits, reps = 0, 200
    for r in range(reps):
        z = rng.multivariate_normal([0, 0], [[1, 0.6], [0.6, 1]], 15)
        xs = [z[i, 0] + 0.5 * rng.normal(size=3) for i in range(15)]
        ys = [z[i, 1] + 0.5 * rng.normal(size=3) for i in range(15)]
        b = hierarchical_bootstrap(xs, ys, method="pearson", num_bootstrap=400, seed=r, strata=strata)
        lo, hi = np.quantile(b[np.isfinite(b)], [0.05, 0.95])
        hits += lo <= truth <= hi
    assert 0.83 <= hits / reps <= 0.97


def test_hierarchical_bootstrap_adds_the_seed_level_to_the_pairs_bootstrap():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 2))
    base[:, 1] = base[:, 0] + 0.3 * base[:, 1]
    xs = [v + rng.normal(0, 1.0, 3) for v in base[:, 0]]
    ys = [v + rng.normal(0, 1.0, 3) for v in base[:, 1]]
    mx, my = np.array([a.mean() for a in xs]), np.array([a.mean() for a in ys])

    def width(b):
        lo, hi = np.quantile(b[np.isfinite(b)], [0.025, 0.975])
        return hi - lo

    pairs_only = correlate(mx, my, method="pearson", num_bootstrap=4000, num_permutations=0)
    # Same pair means: the seed level widens the interval beyond the pairs-only bootstrap.
    assert width(hierarchical_bootstrap(xs, ys, method="pearson", num_bootstrap=4000)) > \
        1.1 * (pairs_only.ci_high - pairs_only.ci_low)
    # Without spread within pairs the two are one bootstrap (up to Monte-Carlo error).
    quiet = hierarchical_bootstrap([np.full(3, v) for v in mx], [np.full(3, v) for v in my], method="pearson",
                                   num_bootstrap=4000)
    assert width(quiet) == pytest.approx(pairs_only.ci_high - pairs_only.ci_low, rel=0.1)


@pytest.mark.parametrize("measure, target, r, lo, hi, says", [
    ("mmd2", "gap_closed", -0.8, -0.95, -0.3, "better alignment (mmd2) went with better gap_closed:"),
    ("mmd2", "gap_closed", -0.2, -0.9, 0.5, "only as a tendency"),
    ("mmd2", "gap_closed", 0.7, 0.2, 0.9, "the opposite of the paper's claim"),
    ("cka", "gap_closed", 0.7, 0.2, 0.9, "better alignment (cka) went with better gap_closed:"),
    ("mmd2", "convergence_steps", 0.7, 0.2, 0.9, "better alignment (mmd2) went with better convergence_steps:"),
    ("mmd2", "gap_closed", 0.1, -0.6, 0.7, "did not go with better"),
])
def test_describe_finding_orients_measure_and_target(measure, target, r, lo, hi, says):
    corr = {"r": r, "ci_low": lo, "ci_high": hi, "confidence": 0.95, "n": 10,
            "within_backbone": {"r_within": r, "p_value": 0.04}}
    stats = {"correlations": {f"{measure}~{target}/spearman": corr},
             "within_task": {f"{measure}~{target}": {"agree": 4, "compared": 5, "ties_or_undefined": 0,
                                                     "p_value": 0.375}},
             "counts": {"runs_excluded": 2}}
    text = describe_finding(stats, measure, target)
    assert says in text and f"{r:+.2f}, 95% CI {lo:+.2f} to {hi:+.2f}" in text
    assert "in 4 of 5 task(s) (exact p = 0.375)" in text and "2 run(s) were excluded" in text


def test_stratified_resampling_keeps_each_backbone_count():
    strata = np.array(["A", "A", "A", "B", "B"])
    pick = resample_pairs(5, 300, np.random.default_rng(0), strata)
    assert (strata[pick] == strata).all()  # position i always draws from its own stratum
    assert set(np.unique(pick[:, :3])) == {0, 1, 2} and set(np.unique(pick[:, 3:])) == {3, 4}
