"""Transferability scores against float64 numpy implementations of the papers' equations, their
invariances, and their errors on bad input."""

import numpy as np
import pytest

from vfm_align import align
from vfm_align.errors import ConfigError, DataError


def _blobs(n=400, d=24, k=3, sep=2.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    means = rng.normal(size=(k, d)) * sep
    x = means[labels] + rng.normal(size=(n, d)) + 0.5  # an offset: the scores that do not centre must cope
    return x.astype(np.float32), labels


# -- independent references (float64, straight from the equations) ----------------------------------

def _ref_logme_evidence(x, y, alpha, beta):
    """L(alpha, beta)/n of You et al. (2021) eq. 2, with A and m formed explicitly."""
    n, d = x.shape
    a = alpha * np.eye(d) + beta * x.T @ x
    m = beta * np.linalg.solve(a, x.T @ y)
    _, logdet = np.linalg.slogdet(a)
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * logdet - beta / 2 * np.sum((y - x @ m) ** 2)
          - alpha / 2 * np.sum(m ** 2) - n / 2 * np.log(2 * np.pi))
    return ev / n, m


def _ref_hscore(x, labels):
    """Bao et al. (2019): tr(pinv(cov f) cov(E[f|y])), covariances with 1/n."""
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    g = np.zeros_like(xc)
    for c in np.unique(labels):
        g[labels == c] = xc[labels == c].mean(0)
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10) @ (g.T @ g / len(x))))


def _ref_transrate(x, labels, eps):
    """Huang et al. (2022) eqs. 3-5 on centred features scaled to unit mean squared row norm."""
    z = x - x.mean(0)
    z = z / np.sqrt(np.mean(np.sum(z * z, 1)))
    d = z.shape[1]

    def rate(zz):
        return 0.5 * np.linalg.slogdet(np.eye(d) + d / (len(zz) * eps ** 2) * zz.T @ zz)[1]

    return rate(z) - sum(np.mean(labels == c) * rate(z[labels == c]) for c in np.unique(labels))


def _ref_rankme(x):
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-np.sum(p * np.log(p))))


# -- LogME -------------------------------------------------------------------------------------------

def test_logme_is_the_fixed_point_of_the_evidence():
    x, labels = _blobs()
    x64 = x.astype(np.float64)
    fit = align.logme_fit(x, labels)
    assert fit.converged and fit.evidence.shape == (3,)
    for c in range(3):
        y = (labels == c).astype(np.float64)
        a, b = fit.alpha[c], fit.beta[c]
        ev, m = _ref_logme_evidence(x64, y, a, b)
        assert fit.evidence[c] == pytest.approx(ev, abs=2e-4)
        # At the fixed point alpha and beta reproduce themselves under the paper's updates.
        s = np.linalg.eigvalsh(x64.T @ x64)
        gamma = np.sum(b * s / (a + b * s))
        assert gamma / np.sum(m ** 2) == pytest.approx(a, rel=2e-3)
        assert (len(x) - gamma) / np.sum((y - x64 @ m) ** 2) == pytest.approx(b, rel=2e-3)
        # ... and they maximise it: moving either precision lowers the evidence.
        for da, db in ((1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2)):
            assert _ref_logme_evidence(x64, y, a * da, b * db)[0] < ev
    assert align.logme(x, labels) == pytest.approx(float(np.mean(fit.evidence)))


def test_logme_on_a_graded_spectrum_and_below_the_width():
    """Feature scales spanning three decades under a large common offset (as pretrained features have):
    the small directions still count; n < d: a target the features cannot explain ends at w = 0."""
    rng = np.random.default_rng(10)
    n, d = 3000, 128
    labels = rng.integers(0, 4, n)
    scales = np.logspace(0, -3, d)
    x = ((rng.normal(size=(n, d)) + 0.3 * rng.normal(size=(4, d))[labels]) * scales + 10).astype(np.float32)
    fit = align.logme_fit(x, labels)
    x64 = x.astype(np.float64)
    s = np.linalg.eigvalsh(x64.T @ x64)
    for c in range(4):
        y = (labels == c).astype(np.float64)
        a, b = fit.alpha[c], fit.beta[c]
        ev, m = _ref_logme_evidence(x64, y, a, b)
        assert fit.evidence[c] == pytest.approx(ev, abs=1e-4)
        gamma = np.sum(b * s / (a + b * s))
        assert gamma / np.sum(m ** 2) == pytest.approx(a, rel=1e-2)
    wide = np.random.default_rng(1).normal(size=(20, 64)).astype(np.float32)
    fit = align.logme_fit(wide, np.arange(20) % 2)
    assert fit.converged and np.isfinite(fit.evidence).all()
    # The evidence at w = 0 with beta = n / ||y||^2 is the limit an unbounded alpha approaches.
    big = int(np.argmax(fit.alpha))
    assert fit.alpha[big] > 1e12
    y = (np.arange(20) % 2 == big).astype(np.float64)
    b = 20 / np.sum(y ** 2)
    limit = (10 * np.log(b) - b / 2 * np.sum(y ** 2) - 10 * np.log(2 * np.pi)) / 20
    assert fit.evidence[big] == pytest.approx(limit, abs=1e-5)


def test_logme_rises_with_aligned_features_and_falls_with_shuffled_labels():
    rng = np.random.default_rng(1)
    weak, labels = _blobs(sep=0.3, seed=1)
    strong, _ = _blobs(sep=3.0, seed=1)  # same labels (same seed), better separated classes
    assert align.logme(strong, labels) > align.logme(weak, labels)
    assert align.logme(strong, rng.permutation(labels)) < align.logme(strong, labels) - 0.2


def test_logme_regression_and_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    w = rng.normal(size=(16, 2))
    y = x @ w + 0.1 * rng.normal(size=(300, 2))
    fit = align.logme_fit(x, y, kind="regression")
    for c in range(2):
        assert fit.evidence[c] == pytest.approx(_ref_logme_evidence(x.astype(np.float64), y[:, c], fit.alpha[c],
                                                                    fit.beta[c])[0], abs=2e-4)
    assert align.logme(x, y[:, 0], kind="regression") == pytest.approx(fit.evidence[0], abs=1e-6)
    perm = rng.permutation(16)
    assert align.logme(x[:, perm], y, kind="regression") == pytest.approx(fit.value, abs=1e-4)
    assert align.logme(3.0 * x, y, kind="regression") == pytest.approx(fit.value, abs=1e-4)  # scale-free
    xb, labels = _blobs()
    renamed = np.array(["c", "a", "b"])[labels]
    assert align.logme(xb, renamed) == pytest.approx(align.logme(xb, labels), abs=1e-6)


# -- H-score ------------------------------------------------------------------------------------------

def test_hscore_closed_form_with_known_class_means():
    """Within each class the noise has exactly mean 0 and covariance I, so cov(f) = I + B with B the
    between-class covariance of the known means, and H = tr((I + B)^-1 B)."""
    rng = np.random.default_rng(3)
    d, per = 6, 50
    means = rng.normal(size=(3, d)) * 1.5
    rows, labels = [], []
    for c in range(3):
        e = rng.normal(size=(per, d))
        e -= e.mean(0)
        e = e @ np.linalg.inv(np.linalg.cholesky(e.T @ e / per)).T  # exactly white within the class
        rows.append(means[c] + e)
        labels += [c] * per
    x, labels = np.concatenate(rows), np.array(labels)
    mbar = means.mean(0)
    b = sum(np.outer(m - mbar, m - mbar) for m in means) / 3
    expected = np.trace(np.linalg.solve(np.eye(d) + b, b))
    assert align.hscore(x.astype(np.float32), labels, shrinkage=0) == pytest.approx(expected, rel=1e-4)
    assert _ref_hscore(x, labels) == pytest.approx(expected, rel=1e-9)  # the reference agrees


def test_hscore_shrinkage_and_invariances():
    x, labels = _blobs()
    assert align.hscore(x, labels, shrinkage=0) == pytest.approx(_ref_hscore(x.astype(np.float64), labels),
                                                                   rel=1e-4)
    # Ledoit-Wolf (2004) lambda and the shrunk covariance, written out.
    xc = x.astype(np.float64) - x.mean(0)
    n, d = xc.shape
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta = min(np.sum([np.sum((np.outer(r, r) - s) ** 2) for r in xc]) / (n * n * d), delta)
    lam = beta / delta
    shrunk = (1 - lam) * s + lam * mu * np.eye(d)
    g = np.zeros_like(xc)
    for c in range(3):
        g[labels == c] = xc[labels == c].mean(0)
    expected = np.trace(np.linalg.solve(shrunk, g.T @ g / n))
    assert align.hscore(x, labels) == pytest.approx(expected, rel=1e-4)
    assert align.hscore(x, labels, shrinkage=lam) == pytest.approx(expected, rel=1e-4)
    perm = np.random.default_rng(4).permutation(x.shape[1])
    assert align.hscore(x[:, perm], labels) == pytest.approx(align.hscore(x, labels), rel=1e-5)
    assert align.hscore(x, 7 - labels * 2) == pytest.approx(align.hscore(x, labels), rel=1e-6)


def test_hscore_stays_finite_when_n_is_below_d():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 64)).astype(np.float32)
    labels = np.arange(20) % 2
    shrunk = align.hscore(x, labels)
    assert np.isfinite(shrunk) and shrunk > 0
    plain = align.hscore(x, labels, shrinkage=0)
    assert plain == pytest.approx(_ref_hscore(x.astype(np.float64), labels), rel=1e-3)
    assert plain == pytest.approx(1.0, rel=1e-3)  # n < d: the pseudo-inverse separates the classes exactly


# -- TransRate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_transrate_matches_the_coding_rates(eps):
    x, labels = _blobs()
    ref = _ref_transrate(x.astype(np.float64), labels, eps)
    got = align.transrate(x, labels, eps=eps)
    assert got == pytest.approx(ref, rel=1e-4)
    rng = np.random.default_rng(6)
    assert align.transrate(x, rng.permutation(labels), eps=eps) < ref
    assert align.transrate(x[:, rng.permutation(x.shape[1])], labels, eps=eps) == pytest.approx(ref, rel=1e-4)
    assert align.transrate(x, labels + 10, eps=eps) == pytest.approx(got, rel=1e-6)


def test_transrate_with_classes_smaller_than_the_width():
    """n_c < d: the class Grams are rank deficient; their float32 noise must not count as coding rate."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 96)).astype(np.float32)
    labels = np.arange(60) % 3
    assert align.transrate(x, labels) == pytest.approx(_ref_transrate(x.astype(np.float64), labels, 0.1),
                                                       rel=1e-3)


# -- RankMe --------------------------------------------------------------------------------------------

def test_rankme_isotropic_rank_one_and_reference():
    rng = np.random.default_rng(8)
    iso = rng.normal(size=(20000, 8)).astype(np.float32)
    assert align.rankme(iso) == pytest.approx(8.0, rel=1e-3)
    one = np.outer(rng.normal(size=500) + 1, rng.normal(size=32)).astype(np.float32)
    assert align.rankme(one) == pytest.approx(1.0, abs=1e-3)
    x, _ = _blobs()
    assert align.rankme(x) == pytest.approx(_ref_rankme(x.astype(np.float64)), rel=2e-3)
    assert align.rankme(x[:, ::-1]) == pytest.approx(align.rankme(x), rel=1e-5)
    wide = rng.normal(size=(10, 40)).astype(np.float32)  # n < d: at most n singular values
    assert align.rankme(wide) == pytest.approx(_ref_rankme(wide.astype(np.float64)), rel=2e-3)


# -- dense targets and the per-task entry point ------------------------------------------------------

def test_pool_to_grid_fractions_and_means():
    seg = np.zeros((4, 4, 6), np.int32)
    seg[:2, :2, :3] = 1
    seg[2:, :, 3:] = 2
    frac = align.pool_to_grid(seg, (2, 2, 2), num_classes=3)
    assert frac.shape == (8, 3)
    np.testing.assert_allclose(frac.sum(1), 1.0)
    np.testing.assert_allclose(frac[0], [0, 1, 0])           # cell (0, 0, 0): all class 1
    np.testing.assert_allclose(frac[5], [0, 0, 1])           # cell (1, 0, 1)
    vol = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    means = align.pool_to_grid(vol, (1, 2, 2))
    np.testing.assert_allclose(means[:, 0], [vol[:, :2, :2].mean(), vol[:, :2, 2:].mean(), vol[:, 2:, :2].mean(),
                                             vol[:, 2:, 2:].mean()])
    odd = align.pool_to_grid(np.ones((3, 5, 5, 2), np.float32), (2, 2, 3))  # sizes that do not divide
    np.testing.assert_allclose(odd, 1.0)
    with pytest.raises(DataError, match="outside"):
        align.pool_to_grid(seg, (2, 2, 2), num_classes=2)
    with pytest.raises(DataError, match="does not fit"):
        align.pool_to_grid(seg, (8, 2, 2), num_classes=3)


def test_scores_for_task_kinds():
    x, labels = _blobs()
    s = align.scores_for_task(x, labels, "classification")
    assert s["logme"] == pytest.approx(align.logme(x, labels))
    assert s["hscore"] == pytest.approx(align.hscore(x, labels))
    assert s["transrate"] == pytest.approx(align.transrate(x, labels))
    assert s["rankme"] == pytest.approx(align.rankme(x))
    frac = np.eye(3)[labels] * 0.8 + 0.2 / 3
    d = align.scores_for_task(x, frac, "segmentation")
    assert d["logme"] == pytest.approx(align.logme(x, frac, kind="regression"))
    fg = np.where(labels == 0, 1 + frac[:, 1:].argmax(1), labels)   # every cell holds some foreground
    assert d["hscore"] == pytest.approx(align.hscore(x, fg))
    np.testing.assert_array_equal(align.hard_labels(np.array([[1, 0, 0], [0.9, 0.02, 0.08], [0, 0.6, 0.4]]),
                                                    "segmentation"), [0, 2, 1])
    background = np.tile([1.0, 0.0], (len(x), 1))                  # no lesion anywhere: one class
    e = align.scores_for_task(x, background, "segmentation")
    assert e["hscore"] is None and "single class" in e["notes"]["hscore"] and e["rankme"] is not None
    inten = x[:, :2] @ np.ones((2, 1))
    r = align.scores_for_task(x, inten, "dense_regression")
    shuffled = np.random.default_rng(9).permutation(inten)
    assert r["logme"] > align.scores_for_task(x, shuffled, "dense_regression")["logme"]
    assert set(np.unique(align.hard_labels(inten, "dense_regression"))) == {0, 1, 2, 3}
    with pytest.raises(ConfigError):
        align.scores_for_task(x, labels, "detection")


def test_early_alignment_reads_the_record_at_the_fraction():
    log = [{"step": s, "align/pooled/mmd2": s / 100, "align/patch/mmd2": s / 50} for s in (5, 10, 15, 20)]
    assert align.early_alignment(log, 100) == {"step": 10, "fraction": 0.1, "value": 0.1}
    assert align.early_alignment(log, 140, site="patch")["step"] == 15  # 10% of 140 = 14: the next record
    with pytest.raises(ConfigError, match="align.every"):
        align.early_alignment(log[::3], 100)                              # records at 5 and 20 only
    with pytest.raises(DataError, match="no in-loop alignment"):
        align.early_alignment(log, 1000)
    curve = {"step": [0, 5, 10], "align/pooled/mmd2": [0.0, 0.3, 0.4]}   # the study's curve of lists
    assert align.early_alignment(curve, 50)["value"] == 0.3


def test_picks_better_counts_pairs_within_a_group():
    rows = [{"task": "a", "s": 1.0, "gain": 0.1}, {"task": "a", "s": 2.0, "gain": 0.3},   # agrees
            {"task": "a", "s": 3.0, "gain": 0.2},                                          # vs 1st agrees, 2nd not
            {"task": "b", "s": 5.0, "gain": 0.1}, {"task": "b", "s": 5.0, "gain": 0.2},   # score tie: half
            {"task": "b", "s": None, "gain": 0.5}]                                         # missing: skipped
    assert align.picks_better(rows, "s") == {"agree": 2.5, "pairs": 4, "rate": 0.625}
    assert align.picks_better(rows[:1], "s")["rate"] is None


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["logme", "hscore", "transrate"])
def test_bad_input_is_a_data_error(score):
    fn = getattr(align, score)
    x, labels = _blobs(n=40, d=4)
    nan = x.copy()
    nan[7, 2] = np.nan
    with pytest.raises(DataError, match="row 7"):
        fn(nan, labels)
    with pytest.raises(DataError, match="at least 2 rows"):
        fn(x[:1], labels[:1])
    with pytest.raises(DataError, match="single class"):
        fn(x, np.zeros(40, int))
    with pytest.raises(DataError, match="39 labels for 40"):
        fn(x, labels[:39])
    with pytest.raises(DataError, match="features"):
        fn(x[0], labels)
    with pytest.raises(DataError, match="non-finite label"):
        fn(x, np.where(np.arange(40) == 3, np.nan, labels.astype(float)))


def test_bad_input_rankme_and_regression():
    with pytest.raises(DataError, match="row 1"):
        align.rankme(np.array([[1.0, 2.0], [np.inf, 0.0]], np.float32))
    with pytest.raises(DataError, match="at least 2 rows"):
        align.rankme(np.ones((1, 3), np.float32))
    with pytest.raises(DataError, match="all features are zero"):
        align.rankme(np.zeros((5, 3), np.float32))
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(DataError, match="non-finite target"):
        align.logme(x, np.where(np.arange(10) == 2, np.nan, 1.0), kind="regression")
    with pytest.raises(DataError, match="9 target rows"):
        align.logme(x, np.ones(9), kind="regression")
    with pytest.raises(DataError, match="integers"):
        align.logme(x, np.linspace(0, 1, 10))
    with pytest.raises(ConfigError):
        align.logme(x, np.arange(10) % 2, kind="ranking")
    with pytest.raises(ConfigError):
        align.hscore(x, np.arange(10) % 2, shrinkage=2.0)
