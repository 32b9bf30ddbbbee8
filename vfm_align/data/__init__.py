"""Cohorts, preprocessing, loading, the five downstream tasks and the synthetic phantom.

cohort.py (manifest + validation) -> cache.py (recipe: reorient, resample, normalise; .npy memmaps)
-> loader.py (grain: shuffle, shard, augment.py, tasks.py pairs, batch, prefetch); metrics.py scores
task outputs; phantom.py writes the default synthetic cohort; nifti.py and resample.py handle geometry.
"""
