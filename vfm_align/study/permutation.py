"""Paired permutation test for pre/post feature banks.

Rows i of X (before) and Y (after) come from the same input, so the pooled-shuffle test does not
apply; under the null that each pair is exchangeable, swapping X_i and Y_i is a valid permutation.
With random Fourier features z (fixed frequencies) the V-statistic is ||mean_i s_i (z(x_i) - z(y_i))||^2
for signs s_i = +-1, so all permutations are one (P, n) x (n, F) matmul.
A stand-in for a paired ``mmd_test`` in ``vfm_align.align`` (not yet available).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vfm_align.align.kernels import median_sigma
from vfm_align.align.rff import features, rff_frequencies


def paired_mmd_test(x: np.ndarray, y: np.ndarray, *, num_permutations: int = 1000, num_features: int = 1024,
                    seed: int = 0) -> dict:
    """p-value (1 + #{T_perm >= T_obs}) / (1 + P) of the paired RFF V-statistic; sigma: median on x."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    sigma = median_sigma(x, seed=seed)
    freqs = jnp.asarray(rff_frequencies(x.shape[1], num_features, [sigma], seed=seed))
    diff = np.asarray(features(jnp.asarray(x), freqs) - features(jnp.asarray(y), freqs), np.float64)
    n = len(diff)
    t_obs = float(np.sum((diff.mean(0)) ** 2))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(num_permutations, n))
    t_perm = np.sum((signs @ diff / n) ** 2, axis=1)
    p = (1.0 + np.sum(t_perm >= t_obs)) / (1.0 + num_permutations)
    return {"statistic": t_obs, "p_value": float(p), "num_permutations": num_permutations, "sigma": float(sigma)}
