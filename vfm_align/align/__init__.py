"""Alignment scoring between feature banks (MMD^2, permutation tests, CKA, drift) and transferability scores.

    from vfm_align import align
    align.mmd(x, y)                                  # exact U-statistic, median-heuristic RBF
    align.mmd(x, y, method="rff", num_features=4096) # random features, streams memmapped banks
    align.mmd_test(x, y, paired=True)                # permutation p-value for before/after banks
    align.linear_cka(x, y); align.paired_drift(x, y)
    align.logme(x, labels); align.hscore(x, labels); align.transrate(x, labels); align.rankme(x)  # frozen
    align.early_alignment(fit_summary["align"], steps)  # MMD^2 after 10% of the fine-tuning budget

Inputs are (rows, width) arrays, np.memmap banks or jax arrays; bad input raises DataError.
"""

from vfm_align.align.banks import Bank, extract_bank, open_bank
from vfm_align.align.cka import PairedAccumulator, linear_cka, paired_drift, paired_measures
from vfm_align.align.kernels import median_sigma, resolve_sigmas
from vfm_align.align.mmd import exact_mmd2, mmd, mmd_fn
from vfm_align.align.permutation import TestResult, mmd_test, p_value
from vfm_align.align.rff import feature_sums, features, mmd2_from_sums, rff_frequencies, rff_mmd2
from vfm_align.align.transferability import (
    SCORES,
    LogMEFit,
    early_alignment,
    hard_labels,
    hscore,
    logme,
    logme_fit,
    picks_better,
    pool_to_grid,
    rankme,
    scores_for_task,
    transrate,
)

__all__ = [
    "Bank", "PairedAccumulator", "TestResult",
    "exact_mmd2", "extract_bank", "feature_sums", "features", "linear_cka", "median_sigma", "mmd", "mmd2_from_sums",
    "mmd_fn", "mmd_test", "open_bank", "p_value", "paired_drift", "paired_measures", "resolve_sigmas",
    "rff_frequencies", "rff_mmd2",
    # transferability of frozen features
    "SCORES", "LogMEFit", "early_alignment", "hard_labels", "hscore", "logme", "logme_fit", "picks_better",
    "pool_to_grid", "rankme", "scores_for_task", "transrate",
]
