"""Alignment measured inside the training loop.

Once, before any update, the pretrained backbone's features on a fixed probe set are banked per
feature site. Every K steps the current backbone is run on the same probe inputs and compared
with the bank: RFF MMD^2 (unbiased, sin/cos, Gaussian kernel with one bandwidth for every step: given, e.g. fixed
once per (backbone, task) by the study, or the median heuristic on the bank), linear CKA and the paired drift
(mean 1 - cosine between a sample's features before and after, and the relative L2 change).
All of it runs in one jitted function on the device. Features equal to the bank bit for bit (the
evaluation before any update) score MMD^2 = 0 exactly: the distributions are the same, while the
unbiased estimate of a finite sample would scatter around 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vfm_align.align.cka import linear_cka_jax as linear_cka
from vfm_align.align.kernels import median_sigma
from vfm_align.align.rff import rff_frequencies, rff_mmd2_from_sums, rff_sums
from vfm_align.errors import ConfigError


def _site_scores(pre, pre_sums, post, freqs):
    eps = 1e-12
    cos = jnp.sum(pre * post, -1) / (jnp.linalg.norm(pre, axis=-1) * jnp.linalg.norm(post, axis=-1) + eps)
    rel = jnp.linalg.norm(post - pre, axis=-1) / (jnp.linalg.norm(pre, axis=-1) + eps)
    n = pre.shape[0]
    mmd2 = rff_mmd2_from_sums(pre_sums, rff_sums(post, freqs), n, post.shape[0], num_features=freqs.shape[1])
    mmd2 = jnp.where(jnp.array_equal(pre, post), jnp.zeros_like(mmd2), mmd2)  # identical features: exactly 0
    return {"mmd2": mmd2, "cka": linear_cka(pre, post), "drift_cos": jnp.mean(1.0 - cos), "drift_rel": jnp.mean(rel)}


def align_probe(images: np.ndarray, probe_cases: int, devices: int) -> tuple[np.ndarray, int]:
    """(probe inputs, real cases): the first ``probe_cases`` validation cases (0: all of them), padded by
    repeating the last case to a multiple of the device count; features of the padding are dropped."""
    probe = images[: int(probe_cases)] if int(probe_cases) > 0 else images
    n = len(probe)
    if n == 0:
        raise ConfigError("in-loop alignment needs at least one validation case (align.probe_cases)")
    pad = -n % devices
    if pad:
        probe = np.concatenate([probe, np.repeat(probe[-1:], pad, 0)])
    return probe, n


@jax.jit
def _score(pre, pre_sums, post, freqs):
    return {s: _site_scores(pre[s], pre_sums[s], post[s], freqs[s]) for s in pre}


_rff_sums = jax.jit(rff_sums)


class AlignmentMonitor:
    """``bank(state)`` once with the pretrained state; ``__call__(state) -> {"align/<site>/<score>": float}``.

    ``bank_features`` / ``score_features`` do the same from features already computed (one feature
    call can serve several runs stacked in one state, each with its own monitor).
    """

    def __init__(self, feature_fn, probe_images, sites, *, num_features: int = 2048, max_rows: int = 4096,
                 seed: int = 0, sigma: dict | None = None):
        self.feature_fn = feature_fn
        self.probe = probe_images
        self.sites = tuple(sites)
        self.num_features, self.max_rows, self.seed = num_features, max_rows, seed
        self.given_sigma = dict(sigma or {})  # site -> bandwidth; sites not given: median heuristic on the bank
        self.sigma = {}
        self.pre = None

    def rows(self, feats) -> dict:
        """The banked rows of each site: token-level sites can be large, so a fixed, seeded subset of rows."""
        out = {}
        for s, f in feats.items():
            if f.shape[0] > self.max_rows:
                f = f[self._idx[s]]
            out[s] = f
        return out

    def features(self, state) -> dict:
        """The probe features of ``state`` at every site, as the rows that are scored."""
        return self.rows(self.feature_fn(state, self.probe))

    def bank(self, state) -> None:
        self.bank_features(self.feature_fn(state, self.probe))

    def bank_features(self, feats) -> None:
        rng = np.random.default_rng(self.seed)
        self._idx = {s: np.sort(rng.choice(f.shape[0], self.max_rows, replace=False)) if f.shape[0] > self.max_rows
                     else None for s, f in feats.items()}
        self.pre = self.rows(feats)
        self.freqs = {}
        for s, f in self.pre.items():
            fh = np.asarray(f)
            sigma = float(self.given_sigma[s]) if s in self.given_sigma else median_sigma(fh, seed=self.seed)
            self.sigma[s] = sigma
            self.freqs[s] = jnp.asarray(rff_frequencies(fh.shape[1], self.num_features, [sigma], seed=self.seed))
        # The bank's random-feature sums are computed once; each call only featurises the current side.
        self.pre_sums = {s: _rff_sums(self.pre[s], self.freqs[s]) for s in self.pre}
        jax.block_until_ready(_score(self.pre, self.pre_sums, self.pre, self.freqs))  # compile now

    def __call__(self, state) -> dict:
        return self.score_features(self.feature_fn(state, self.probe))

    def score_features(self, feats) -> dict:
        if self.pre is None:
            raise RuntimeError("AlignmentMonitor.bank(pretrained_state) must run before scoring")
        scores = jax.device_get(_score(self.pre, self.pre_sums, self.rows(feats), self.freqs))
        return {f"align/{s}/{k}": float(v) for s, d in scores.items() for k, v in d.items()}
