"""Transferability scores of frozen features: how well a model should transfer, before fine-tuning it.

    from vfm_align import align
    align.logme(x, labels)                         # You et al., ICML 2021
    align.logme(x, y, kind="regression")           # real targets (n,) or (n, k)
    align.hscore(x, labels)                        # Bao et al., ICIP 2019 (Ledoit-Wolf shrinkage by default)
    align.transrate(x, labels)                     # Huang et al., ICML 2022
    align.rankme(x)                                # Garrido et al., ICML 2023 (label-free)
    align.scores_for_task(x, targets, "segmentation")  # every score that applies to a task's targets
    align.early_alignment(fit_summary["align"], steps)  # in-loop MMD^2 after 10% of the fine-tuning budget

``x`` is (n, d) features of n inputs (cases, or patch tokens with targets pooled onto the patch grid
by :func:`pool_to_grid`). Everything is computed from the moments of ``x``: one pass over the rows
(jitted, float32 on the device: the mean, the centred Gram X_c^T X_c, class sums and the class Grams
TransRate needs) and then d x d algebra (jitted; float64 for the uncentred X^T X of LogME and RankMe,
float32 for the centred Grams) on one eigendecomposition per matrix. The eigendecomposition of X^T X
is the SVD of X (its eigenvalues are the squared singular values) at O(n d^2) instead of an SVD of
the tall matrix. For RankMe, H-score and TransRate, eigenvalues below d * eps_float32 * ||Gram|| are
float32 rounding noise and count as zero, so rank-deficient features (n < d, collapsed features) give
finite, meaningful scores; LogME needs no floor (see _logme64).

Bad input (not 2-D, fewer than 2 rows, NaN or inf, a label count that does not match the rows, a
single class) raises DataError.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from vfm_align.errors import ConfigError, DataError

EPS32 = float(np.finfo(np.float32).eps)
KINDS = ("classification", "regression")
# Kinds of targets a task gives (vfm_align.data.tasks.Task.kind) -> how the scores read them.
TASK_TARGETS = ("classification", "segmentation", "dense_regression")
SCORES = ("logme", "hscore", "transrate", "rankme")


# -- validation at the boundary -----------------------------------------------------------------------

def _features(x, name: str = "x") -> np.ndarray:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise DataError(f"{name}: expected features (n, d), got shape {shape}")
    if shape[0] < 2:
        raise DataError(f"{name}: need at least 2 rows (inputs), got {shape[0]}")
    if shape[1] < 1:
        raise DataError(f"{name}: features have width 0")
    a = np.asarray(x, dtype=np.float32)
    ok = np.isfinite(a).all(axis=1)
    if not ok.all():
        raise DataError(f"{name}: non-finite feature value (NaN or inf) in row {int(np.argmin(ok))}")
    return a


def _labels(labels, n: int, name: str = "labels") -> tuple[np.ndarray, int]:
    """Class codes 0..K-1 (in sorted order of the label values) and K; any hashable label values."""
    lab = np.asarray(labels)
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.ndim != 1:
        raise DataError(f"{name}: expected one class label per row (n,), got shape {lab.shape}")
    if lab.shape[0] != n:
        raise DataError(f"{name}: {lab.shape[0]} labels for {n} feature rows")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all():
            raise DataError(f"{name}: non-finite label (NaN or inf) at row {int(np.argmin(np.isfinite(lab)))}")
        if not np.all(lab == np.round(lab)):
            raise DataError(f"{name}: class labels must be integers (for real targets use kind='regression')")
    values, codes = np.unique(lab, return_inverse=True)
    if len(values) < 2:
        raise DataError(f"{name}: a single class ({values[0]!r}); the score needs at least two")
    return codes.astype(np.int32).reshape(-1), len(values)


def _targets(y, n: int, name: str = "y") -> np.ndarray:
    t = np.asarray(y, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise DataError(f"{name}: expected real targets (n,) or (n, k), got shape {t.shape}")
    if t.shape[0] != n:
        raise DataError(f"{name}: {t.shape[0]} target rows for {n} feature rows")
    if t.shape[1] == 0:
        raise DataError(f"{name}: no target columns")
    ok = np.isfinite(t).all(axis=1)
    if not ok.all():
        raise DataError(f"{name}: non-finite target (NaN or inf) in row {int(np.argmin(ok))}")
    return t


def _one_hot(codes: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[codes]


# -- one pass over the rows (float32, device) ---------------------------------------------------------

_HI = jax.lax.Precision.HIGHEST


@jax.jit
def _moments(x, y):
    """Mean, centred Gram, X_c^T y, column sums of y, sum ||x_c||^4 (Ledoit-Wolf)."""
    mu = x.mean(0)
    xc = x - mu
    sq = jnp.sum(xc * xc, axis=1)
    return mu, jnp.dot(xc.T, xc, precision=_HI), jnp.dot(xc.T, y, precision=_HI), y.sum(0), jnp.sum(sq * sq)


@jax.jit
def _class_grams(x, onehot):
    """Per-class Gram of the globally centred rows, (K, d, d): sum_{i in c} x_c,i x_c,i^T."""
    xc = x - x.mean(0)
    return jnp.stack([jnp.dot((xc * onehot[:, k:k + 1]).T, xc, precision=_HI) for k in range(onehot.shape[1])])


@dataclasses.dataclass(frozen=True)
class _Stats:
    n: int
    d: int
    mu: np.ndarray       # (d,)
    gc: np.ndarray       # (d, d) centred Gram
    xty_c: np.ndarray    # (d, k) centred X^T y
    ysum: np.ndarray     # (k,)
    sq4: float           # sum_i ||x_c,i||^4


def _stats(x: np.ndarray, y: np.ndarray) -> _Stats:
    out = [np.asarray(v, np.float64) for v in _moments(jnp.asarray(x), jnp.asarray(y, jnp.float32))]
    return _Stats(x.shape[0], x.shape[1], out[0], out[1], out[2], out[3], float(out[4]))


def _f64(fn, *args):
    """Run a jitted d x d step in float64: for X^T X = X_c^T X_c + n mu mu^T, whose mean direction can dwarf
    the rest; float32 would bury the small eigenvalues under the large one's rounding."""
    with jax.enable_x64(True):
        return jax.device_get(fn(*[np.asarray(a, np.float64) if isinstance(a, np.ndarray) else a for a in args]))


def _f32(fn, *args):
    """Run a jitted d x d step on centred Grams in float32: as accurate as the float32 Gram itself, and faster."""
    return jax.device_get(fn(*[np.asarray(a, np.float32) if isinstance(a, np.ndarray) else a for a in args]))


def _floored(lam, ref):
    """Eigenvalues below the float32 noise level of a Gram of norm ``ref`` (its largest eigenvalue, or the
    Frobenius norm, a cheap bound on it) -> 0."""
    return jnp.where(lam > lam.shape[0] * EPS32 * ref, lam, 0.0)


# -- LogME ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LogMEFit:
    """Per target column: evidence per sample, the maximising precisions (alpha: prior on the weights,
    beta: noise), fixed-point iterations, and whether the iteration met its tolerance. A huge alpha means
    the evidence is largest with zero weights: the features explain nothing of that target."""

    evidence: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    iterations: int
    converged: bool

    @property
    def value(self) -> float:
        return float(np.mean(self.evidence))


@jax.jit
def _logme64(gc, mu, xty_c, ysum, yy, n, tol, max_iter):
    d = gc.shape[0]
    g = gc + n * jnp.outer(mu, mu)                        # X^T X
    lam, v = jnp.linalg.eigh(g)
    # No noise floor here: the float32 Gram is accurate entry by entry, so a graded spectrum keeps its small
    # eigenvalues (flooring them moved the fixed point by tens of per cent on such data), and directions that
    # are pure rounding noise barely move gamma, log|A| or m.
    sigma = jnp.maximum(lam, 0.0)
    scale = jnp.maximum(jnp.mean(sigma), 1e-300)          # the optimum is invariant to scaling X; keep O(1)
    sigma = sigma / scale
    xty = xty_c + jnp.outer(mu, ysum)                     # X^T y
    z = (v.T @ xty) / jnp.sqrt(scale)                     # sqrt(sigma_i) u_i^T y
    z2 = z * z
    s = sigma[:, None]

    def terms(alpha, beta):
        t = alpha / beta
        gamma = jnp.sum(s / (s + t), 0)
        m2 = jnp.sum(z2 / (s + t) ** 2, 0)                               # ||m||^2
        res2 = jnp.maximum(yy - jnp.sum(z2 * (s + 2 * t) / (s + t) ** 2, 0), 1e-12 * yy)  # ||y - X m||^2
        return gamma, m2, res2

    def step(state):
        alpha, beta, _, it = state
        gamma, m2, res2 = terms(alpha, beta)
        a2, b2 = gamma / jnp.maximum(m2, 1e-300), (n - gamma) / res2
        # alpha/beta running off to infinity is the boundary maximum w = 0 (the features explain nothing of
        # that target): its evidence has converged even though the ratio has not.
        at_bound = a2 / b2 > 1e12 * jnp.max(sigma)
        change = jnp.max(jnp.where(at_bound, 0.0, jnp.abs(a2 / b2 - alpha / beta) / (alpha / beta)))
        return a2, b2, change, it + 1

    k = z.shape[1]
    init = (jnp.ones(k), jnp.ones(k), jnp.inf, 0)
    alpha, beta, change, it = jax.lax.while_loop(lambda st: (st[2] > tol) & (st[3] < max_iter), step, init)
    _, m2, _ = terms(alpha, beta)
    logdet = jnp.sum(jnp.log(alpha[None] + beta[None] * s), 0)
    # Every term but the residual's; the residual is recomputed from the rows (see logme_fit).
    partial = (d / 2 * jnp.log(alpha) + n / 2 * jnp.log(beta) - 0.5 * logdet - alpha / 2 * m2
               - n / 2 * jnp.log(2 * jnp.pi))
    m = v @ (z * beta / (alpha + beta * s)) / jnp.sqrt(scale)              # posterior mean weights of X
    return partial, m, alpha * scale, beta, it, change <= tol


@jax.jit
def _residual(x, y, m):
    """||y - X m||^2 per column, from the rows: the moment form loses digits when the fit is close."""
    r = y - jnp.dot(x, m, precision=_HI)
    return jnp.sum(r * r, axis=0)


def logme_fit(x, y, *, kind: str = "classification", tol: float = 1e-10, max_iter: int = 1000) -> LogMEFit:
    """LogME with its fitted precisions per target; :func:`logme` is its mean evidence."""
    if kind not in KINDS:
        raise ConfigError(f"logme kind must be one of {KINDS}, got '{kind}'")
    x = _features(x)
    n = x.shape[0]
    if kind == "classification":
        codes, k = _labels(y, n)
        t = _one_hot(codes, k).astype(np.float64)
    else:
        t = _targets(y, n)
    st = _stats(x, t)
    yy = np.sum(t * t, axis=0)
    if np.any(yy <= 0):
        raise DataError(f"y: target column {int(np.argmin(yy > 0))} is all zeros; its evidence is undefined")
    partial, m, alpha, beta, it, conv = _f64(_logme64, st.gc, st.mu, st.xty_c, st.ysum, yy, float(n), float(tol),
                                             int(max_iter))
    res2 = np.asarray(_residual(jnp.asarray(x), jnp.asarray(t, jnp.float32), jnp.asarray(m, jnp.float32)), np.float64)
    ev = (np.asarray(partial) - np.asarray(beta) / 2 * res2) / n
    return LogMEFit(ev, np.asarray(alpha), np.asarray(beta), int(it), bool(conv))


def logme(x, y, *, kind: str = "classification", tol: float = 1e-10, max_iter: int = 1000) -> float:
    """LogME (You, Liu, Wang, Long, ICML 2021): log marginal evidence per sample of a Bayesian linear model.

    For one target column y (n,) on features X (n, d): w ~ N(0, alpha^-1 I), y | X, w ~ N(X w, beta^-1 I),

        L(alpha, beta) = d/2 log alpha + n/2 log beta - 1/2 log|A| - beta/2 ||y - X m||^2
                         - alpha/2 ||m||^2 - n/2 log 2 pi,   A = alpha I + beta X^T X,  m = beta A^-1 X^T y,

    maximised by the fixed point gamma = sum_i beta s_i / (alpha + beta s_i) (s_i the eigenvalues of
    X^T X), alpha <- gamma / ||m||^2, beta <- (n - gamma) / ||y - X m||^2, iterated until alpha/beta
    changes by less than ``tol`` (relative). The score is L / n averaged over target columns: the
    one-hot columns of the class labels (``kind="classification"``) or the columns of real targets
    (``kind="regression"``). Higher is better; the value is invariant to a rescaling of X.
    """
    return logme_fit(x, y, kind=kind, tol=tol, max_iter=max_iter).value


# -- H-score --------------------------------------------------------------------------------------------

@jax.jit
def _hscore_step(gc, csum, counts, sq4, n, lw, shrink):
    d = gc.shape[0]
    cov = gc / n
    means = csum / counts[:, None]                                  # class means of the centred rows
    between = (means * (counts / n)[:, None]).T @ means             # cov(E[f | y])
    mu = jnp.trace(cov) / d
    # Ledoit & Wolf (2004): the shrinkage towards mu I that minimises the expected Frobenius loss.
    delta = (jnp.sum(cov * cov) - d * mu * mu) / d
    beta = jnp.minimum((sq4 / n - jnp.sum(cov * cov)) / (d * n), delta)
    auto = jnp.where(delta > 0, jnp.clip(beta / jnp.where(delta > 0, delta, 1.0), 0.0, 1.0), 0.0)
    lam = jnp.where(lw, auto, shrink)
    e, v = jnp.linalg.eigh(cov)
    es = (1 - lam) * _floored(e, e[-1]) + lam * mu
    inv = jnp.where(es > d * EPS32 * es[-1], 1.0 / jnp.where(es > 0, es, 1.0), 0.0)   # pseudo-inverse
    return jnp.sum(jnp.sum(v * (between @ v), 0) * inv), lam


def hscore(x, labels, *, shrinkage: float | str = "ledoit_wolf") -> float:
    """H-score (Bao, Li, Huang, Zhang, Qi, Yang, Liu, ICIP 2019): tr(cov(f)^-1 cov(E[f | y])).

    cov(f) is the (1/n) covariance of the features and cov(E[f | y]) = sum_c (n_c / n)(mu_c - mu)(mu_c - mu)^T
    that of their class means. ``shrinkage="ledoit_wolf"`` (default) inverts the shrunk covariance
    (1 - lambda) cov(f) + lambda (tr cov(f) / d) I with the Ledoit-Wolf lambda (the regularised H-score of
    Ibrahim, Ponomareva and Mazumder, ICLR 2023), finite when n < d; a number in [0, 1] fixes lambda;
    0 is the original score with a pseudo-inverse. Higher is better; at most K - 1 without shrinkage.
    """
    x = _features(x)
    codes, k = _labels(labels, x.shape[0])
    onehot = _one_hot(codes, k)
    if shrinkage == "ledoit_wolf":
        lw, s = True, 0.0
    else:
        try:
            s = float(shrinkage)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"hscore shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}") from exc
        if not 0.0 <= s <= 1.0:
            raise ConfigError(f"hscore shrinkage must be in [0, 1], got {s}")
        lw = False
    st = _stats(x, onehot)
    value, _ = _f32(_hscore_step, st.gc, st.xty_c.T, onehot.sum(0).astype(np.float64), st.sq4, float(x.shape[0]),
                    lw, s)
    return float(value)


# -- TransRate -------------------------------------------------------------------------------------------

@jax.jit
def _transrate_step(gc, grams, counts, n, eps):
    d = gc.shape[0]
    z2 = jnp.trace(gc) / n                                    # mean squared norm of a centred row

    def rate(gram, m):
        lam = jnp.linalg.eigvalsh(gram)
        lam = _floored(lam, lam[-1])
        return 0.5 * jnp.sum(jnp.log1p(d / (m * eps * eps) * lam / z2))

    # One decomposition per class, unrolled: a vmapped (batched) eigvalsh takes a much slower path on the CPU.
    per_class = jnp.stack([rate(grams[k], counts[k]) for k in range(grams.shape[0])])
    return rate(gc, n) - jnp.sum(counts / n * per_class)


def transrate(x, labels, *, eps: float = 0.1) -> float:
    """TransRate (Huang, Huang, Ren, Li, Tan, ICML 2022): the coding rate of the features minus that
    of the features within each class,

        TrR = R(Z, eps) - sum_c (n_c / n) R(Z_c, eps),   R(Z, eps) = 1/2 logdet(I + d / (n eps^2) Z^T Z),

    Z the features centred (and Z_c the rows of class c, n_c of them). Z is also scaled to a mean
    squared row norm of 1, so ``eps`` is a distortion relative to the features' own spread and models
    of different widths and scales compare. Higher is better.
    """
    x = _features(x)
    codes, k = _labels(labels, x.shape[0])
    if not eps > 0:
        raise ConfigError(f"transrate eps must be positive, got {eps}")
    onehot = _one_hot(codes, k)
    gc = np.asarray(_moments(jnp.asarray(x), jnp.asarray(onehot))[1], np.float64)
    if np.trace(gc) <= 0:
        raise DataError("x: constant features (zero variance); TransRate is undefined")
    grams = np.asarray(_class_grams(jnp.asarray(x), jnp.asarray(onehot)), np.float64)
    return float(_f32(_transrate_step, gc, grams, onehot.sum(0).astype(np.float64), float(x.shape[0]), float(eps)))


# -- RankMe ----------------------------------------------------------------------------------------------

@jax.jit
def _rankme64(gc, mu, n, keep):
    lam = jnp.linalg.eigvalsh(gc + n * jnp.outer(mu, mu))       # squared singular values of X, ascending
    s = jnp.sqrt(_floored(lam, jnp.linalg.norm(gc)))
    s = jnp.where(jnp.arange(s.shape[0]) >= s.shape[0] - keep, s, 0.0)   # the min(n, d) largest
    p = s / jnp.sum(s) + 1e-7
    ent = -jnp.sum(jnp.where(jnp.arange(s.shape[0]) >= s.shape[0] - keep, p * jnp.log(p), 0.0))
    return jnp.exp(ent)


def rankme(x) -> float:
    """RankMe (Garrido, Balestriero, Najman, LeCun, ICML 2023): the effective rank of the features,

        RankMe(X) = exp(-sum_k p_k log p_k),   p_k = s_k / sum_j s_j + 1e-7,

    s_k the min(n, d) singular values of X (not centred). Label-free; between 1 (rank one) and min(n, d).
    """
    x = _features(x)
    st = _stats(x, np.zeros((x.shape[0], 1), np.float32))
    if not np.any(st.mu) and np.trace(st.gc) <= 0:
        raise DataError("x: all features are zero; RankMe is undefined")
    return float(_f64(_rankme64, st.gc, st.mu, float(st.n), min(st.n, st.d)))


# -- dense targets -------------------------------------------------------------------------------------

def _overlap(length: int, cells: int) -> np.ndarray:
    """(cells, length): the fraction of each grid cell covered by each voxel (rows sum to 1)."""
    edges = np.linspace(0.0, length, cells + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    vox = np.arange(length)[None]
    w = np.clip(np.minimum(hi, vox + 1) - np.maximum(lo, vox), 0.0, None)
    return w / w.sum(1, keepdims=True)


def pool_to_grid(target, grid, *, num_classes: int | None = None) -> np.ndarray:
    """Pool a voxel target onto a feature grid, one row per grid cell, row-major like patch tokens.

    target (D, H, W) integer classes with ``num_classes``: the fraction of each class in each cell,
    (prod(grid), K); target (D, H, W) or (D, H, W, C) real values (``num_classes=None``): the mean
    per cell, (prod(grid), C). Cells cover the volume evenly (area weights where sizes do not divide).
    """
    t = np.asarray(target)
    grid = tuple(int(g) for g in grid)
    if t.ndim not in (3, 4) or len(grid) != 3:
        raise DataError(f"pool_to_grid: expected a (D, H, W[, C]) target and a 3-D grid, got {t.shape} and {grid}")
    if any(g < 1 or g > s for g, s in zip(grid, t.shape[:3])):
        raise DataError(f"pool_to_grid: grid {grid} does not fit a target of shape {t.shape[:3]}")
    if num_classes is not None:
        if t.ndim != 3 or t.dtype.kind not in "iub":
            raise DataError(f"pool_to_grid: class targets must be an integer (D, H, W) map, got {t.dtype} {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= num_classes):
            raise DataError(f"pool_to_grid: class values {int(t.min())}..{int(t.max())} outside 0..{num_classes - 1}")
        t = np.eye(num_classes, dtype=np.float64)[t]
    elif t.ndim == 3:
        t = t[..., None]
    t = t.astype(np.float64)
    a, b, c = (_overlap(s, g) for s, g in zip(t.shape[:3], grid))
    return np.einsum("ad,be,cf,defk->abck", a, b, c, t).reshape(-1, t.shape[-1])


def hard_labels(targets: np.ndarray, task_targets: str) -> np.ndarray | None:
    """Class labels for the label-based scores from pooled dense targets.

    segmentation (class fractions, class 0 the background): the foreground class with the largest
    fraction in the cell, or 0 when the cell holds no foreground (a lesion or a zone rarely fills a
    cell: by majority nearly every cell would be background);
    dense_regression (mean target): the quartile of the cell's mean over channels.
    """
    t = np.asarray(targets, np.float64)
    if task_targets == "segmentation":
        fg = t[:, 1:]
        return np.where(fg.max(1) > 0, 1 + fg.argmax(1), 0).astype(np.int32)
    if task_targets == "dense_regression":
        m = t.mean(1)
        return np.searchsorted(np.quantile(m, [0.25, 0.5, 0.75]), m, side="right").astype(np.int32)
    raise ConfigError(f"hard_labels: task targets must be 'segmentation' or 'dense_regression', got '{task_targets}'")


def scores_for_task(features, targets, task_targets: str) -> dict:
    """Every transferability score for features (n, d) and a task's targets, one row each.

    ``task_targets`` is the task's kind (``vfm_align.data.tasks.Task.kind``): "classification" (labels
    (n,)), "segmentation" (class fractions per patch (n, K), from :func:`pool_to_grid`) or
    "dense_regression" (mean target per patch (n, C)). LogME reads the labels as classes and the
    dense targets as real targets; H-score and TransRate read :func:`hard_labels`. A score that does
    not apply to these targets (e.g. every cell one class) is None, with the reason under "notes".
    """
    if task_targets not in TASK_TARGETS:
        raise ConfigError(f"task targets must be one of {TASK_TARGETS}, got '{task_targets}'")
    x = _features(features, "features")
    if task_targets == "classification":
        labels, logme_args = targets, {"kind": "classification"}
    else:
        t = _targets(targets, x.shape[0], "targets")
        labels = hard_labels(t, task_targets)
        keep = np.ptp(t, axis=0) > 0                       # a constant column carries no information
        logme_args = {"kind": "regression"}
        targets = t[:, keep] if keep.any() else t
    out, notes = {}, {}
    calls = {"logme": lambda: logme(x, targets, **logme_args), "hscore": lambda: hscore(x, labels),
             "transrate": lambda: transrate(x, labels), "rankme": lambda: rankme(x)}
    for name in SCORES:
        try:
            v = calls[name]()
            out[name] = v if math.isfinite(v) else None
            if out[name] is None:
                notes[name] = "not finite"
        except DataError as exc:
            out[name] = None
            notes[name] = str(exc)
    if notes:
        out["notes"] = notes
    return out


# -- early alignment -----------------------------------------------------------------------------------

def early_alignment(align_log, total_steps: int, *, fraction: float = 0.1, site: str = "pooled",
                    score: str = "mmd2") -> dict:
    """MMD^2 (or another in-loop alignment score) between the starting features and those after
    ``fraction`` of the fine-tuning budget: the cheapest predictor that pays for a little training.

    ``align_log`` is the fine-tuning loop's record of in-loop alignment (``fit(...)["align"]``, a list of
    ``{"step": s, "align/<site>/<score>": value}``; the loop scores every ``align.every`` steps, so set
    ``align.every`` to at most ``fraction * steps``), or a curve of lists ``{"step": [...], key: [...]}``
    as the study records it. Returns ``{"step", "fraction", "value"}`` of the first record at or after
    ``fraction * total_steps``.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"early alignment fraction must be in (0, 1], got {fraction}")
    key = f"align/{site}/{score}"
    if isinstance(align_log, dict):
        if key not in align_log or "step" not in align_log:
            raise DataError(f"the alignment curve has no 'step' and '{key}' lists")
        align_log = [{"step": st, key: v} for st, v in zip(align_log["step"], align_log[key])]
    target = max(1, math.ceil(fraction * total_steps))
    later = sorted((r for r in align_log if r.get("step", 0) >= target and key in r), key=lambda r: r["step"])
    if not later:
        raise DataError(f"no in-loop alignment record '{key}' at or after step {target} of {total_steps}")
    rec = later[0]
    if rec["step"] > 1.5 * target:
        raise ConfigError(f"the first '{key}' record after step {target} is at step {rec['step']}: set align.every "
                          f"to at most {target} to read the alignment at {fraction:.0%} of the budget")
    return {"step": int(rec["step"]), "fraction": rec["step"] / total_steps, "value": float(rec[key])}


def picks_better(rows, score: str, *, outcome: str = "gain", group: str = "task") -> dict:
    """How often ``score`` orders two models as their realised ``outcome`` does, over every pair of rows
    within a ``group`` (e.g. two backbones on one task): {"agree", "pairs", "rate"}. Pairs where either
    value is missing or the outcomes tie are left out; a score tie counts as half."""
    by = {}
    for r in rows:
        by.setdefault(r[group], []).append(r)
    agree, pairs = 0.0, 0
    for members in by.values():
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                a, b = members[i], members[j]
                vals = (a.get(score), b.get(score), a.get(outcome), b.get(outcome))
                if any(v is None or not math.isfinite(v) for v in vals) or vals[2] == vals[3]:
                    continue
                pairs += 1
                agree += 0.5 if vals[0] == vals[1] else float((vals[0] > vals[1]) == (vals[2] > vals[3]))
    return {"agree": agree, "pairs": pairs, "rate": agree / pairs if pairs else None}


__all__ = ["SCORES", "LogMEFit", "early_alignment", "hard_labels", "hscore", "logme", "logme_fit", "picks_better",
           "pool_to_grid", "rankme", "scores_for_task", "transrate"]
