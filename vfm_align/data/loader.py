"""Batches for training and evaluation: grain MapDataset over the preprocessing cache.

Pipeline per epoch: cases -> shuffle (seeded by seed and epoch) -> this process's shard
(``jax.process_index()`` of ``jax.process_count()``, strided so shards are disjoint and equal-sized)
-> per-sample random map (augment, crop/pad, task pairs; its generator is derived by grain from the
seed and the element index, so results do not depend on thread timing) -> batch -> background
threads that prefetch whole batches. A batch is a dict of numpy arrays, channels-last:
``image`` (B, D, H, W, 3) [T2w, DWI, ADC] (the task's input), ``target``, ``gland`` (B, D, H, W)
int32, ``case_id`` (B,) str.
"""

from __future__ import annotations

import zlib

import grain
import numpy as np

from vfm_align.data.augment import AugmentConfig, augment, crop_or_pad
from vfm_align.data.cache import PreprocessCache
from vfm_align.data.tasks import Task
from vfm_align.errors import ConfigError, DataError


class CaseSource:
    """Random-access source: index -> sample dict of memmapped arrays (see tasks.py)."""

    def __init__(self, cases, cache: PreprocessCache):
        self.cases = list(cases)
        self.cache = cache
        self._spacing = {}

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        arrays = self.cache.get(case)
        if case.case_id not in self._spacing:
            self._spacing[case.case_id] = tuple(self.cache.meta(case)["spacing"])
        return {**arrays, "labels": dict(case.labels), "case_id": case.case_id,
                "spacing": self._spacing[case.case_id]}


def _collate(items):
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = np.array(vals) if key == "case_id" else np.stack(vals)
    return out


def _epoch_seed(seed: int, epoch: int, salt: str) -> int:
    return int(zlib.crc32(f"{salt}:{seed}:{epoch}".encode()))


class Loader:
    """Iterate batches of one split for one task.

    Batches do not depend on ``num_threads`` or ``workers``: every element's randomness comes from
    (seed, epoch, index).

    ``for batch in loader.epoch(e)`` yields that epoch's batches; the same (seed, epoch) gives the
    same batches. ``train=True`` shuffles, augments and random-crops; ``train=False`` keeps the
    manifest order and centre-crops. With ``shape`` every case is cropped/padded to it (needed
    when native grids differ).
    """

    def __init__(self, cases, cache: PreprocessCache, task: Task, *, batch_size: int, seed: int = 0,
                 train: bool = True, augment_cfg: AugmentConfig | None = AugmentConfig(), shape=None,
                 drop_remainder: bool | None = None, num_threads: int = 2, prefetch: int = 2, workers: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not cases:
            raise DataError("loader: no cases to load (empty split?)")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if len(cases) < process_count:
            raise DataError(f"loader: {len(cases)} cases cannot be sharded over {process_count} processes")
        self.source = CaseSource(cases, cache)
        self.task, self.batch_size, self.seed, self.train = task, batch_size, seed, train
        self.augment_cfg = augment_cfg if train else None
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.drop_remainder = train if drop_remainder is None else drop_remainder
        self.read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self.process_index, self.process_count = process_index, process_count
        self.workers = int(workers)

    def _prepare(self, sample: dict, rng: np.random.Generator) -> dict:
        if self.augment_cfg is not None:  # augments only the voxels of the random crop
            sample = augment(sample, rng, self.augment_cfg, shape=self.shape)
        elif self.shape is not None:
            sample = crop_or_pad(sample, self.shape, rng if self.train else None)
        x, y = self.task.make(sample)
        return {"image": x, "target": y, "gland": np.asarray(sample["gland"], np.int32),
                "case_id": sample["case_id"]}

    def dataset(self, epoch: int = 0) -> grain.MapDataset:
        ds = grain.MapDataset.source(self.source)
        if self.train:
            ds = ds.shuffle(seed=_epoch_seed(self.seed, epoch, "shuffle"))
        # Equal-sized disjoint shards: drop the tail that does not divide evenly (training only).
        n = len(self.source)
        usable = n - n % self.process_count if self.train else n
        ds = ds.slice(slice(self.process_index, usable, self.process_count))
        ds = ds.random_map(self._prepare, seed=_epoch_seed(self.seed, epoch, "augment"))
        return ds.batch(self.batch_size, drop_remainder=self.drop_remainder, batch_fn=_collate)

    def epoch(self, epoch: int = 0):
        """An iterator over this epoch's batches, computed ahead by background threads, or by
        ``workers`` spawned processes (for many-core hosts: scipy's resampling holds the GIL)."""
        it = self.dataset(epoch).to_iter_dataset(self.read_options)
        if self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain 0.2.18's mp_prefetch reads an absl flag directly
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=self.read_options.prefetch_buffer_size))
        return iter(it)

    def __len__(self) -> int:
        return len(self.dataset(0))
