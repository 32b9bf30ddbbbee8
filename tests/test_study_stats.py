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
    expected = ((rx - rx.mean()) * (ry - ry.mean())).sum() / np.sqrt(((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum())
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
        correlate([1, 2], [1, 2])
    with pytest.raises(DataError):
        correlate([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(DataError):
        correlate([1, 2, 3], [1, 2, 3], method="kendall")


@pytest.mark.parametrize("r, lo, hi, says", [
    (-0.8, -0.95, -0.3, "lower MMD\u00b2 (better alignment) went with larger gains"),
    (-0.2, -0.9, 0.5, "only as a tendency that the data do not establish"),
    (0.7, 0.2, 0.9, "the opposite of the paper's claim"),
    (0.1, -0.6, 0.7, "did not go with larger gains"),
])
def test_finding_states_a_direction_only_when_the_interval_excludes_zero(r, lo, hi, says):
    from vfm_align.study.runner import finding

    def entry(r, lo, hi):
        return {"r": r, "ci_low": lo, "ci_high": hi, "p_value": 0.04}

    corr = {"mmd2_pooled~gain/spearman": entry(r, lo, hi), "mmd2_pooled~convergence_steps/spearman": entry(0.3, -0.2, 0.8)}
    text = finding([None] * 10, corr, "pooled")
    assert says in text and f"{r:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}" in text
