"""Where the loop's batches come from: a batch is a function of the step alone (exact resume).

* :class:`ArrayBatches`: in-memory arrays (small studies, tests); rows of step ``s`` are a slice
  of a per-epoch seeded permutation; each process takes its contiguous share.
* :class:`CohortBatches`: a manifest through the project's loader (``vfm_align.data``): the
  grain dataset of epoch ``s // steps_per_epoch`` indexed at ``s % steps_per_epoch`` (random
  access, so nothing has to be replayed after a restart). The loader shards per process.
"""

from __future__ import annotations

import numpy as np

from vfm_align.errors import ConfigError
from vfm_align.train.mesh import process_rows


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Rows of global batch ``step``: consecutive slices of a per-epoch seeded permutation."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch:(k + 1) * batch]


class ArrayBatches:
    def __init__(self, arrays: dict, batch_size: int, seed: int):
        for key in ("image", "target"):
            if key not in arrays:
                raise ConfigError(f"in-memory data needs an '{key}' array")
        if arrays["image"].ndim != 5:
            raise ConfigError(f"'image' must be (N, D, H, W, C), got shape {arrays['image'].shape}")
        if len(arrays["image"]) < batch_size:
            raise ConfigError(f"{len(arrays['image'])} cases are fewer than train.batch_size {batch_size}")
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.input_shape = arrays["image"].shape[1:]

    def batch(self, step: int) -> dict:
        idx = batch_indices(len(self.arrays["image"]), self.batch_size, step, self.seed)[process_rows(self.batch_size)]
        return {"image": self.arrays["image"][idx], "target": self.arrays["target"][idx]}


class CohortBatches:
    """Training batches from a ``vfm_align.data.loader.Loader`` (built with the per-process batch)."""

    def __init__(self, loader):
        self.loader = loader
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ConfigError("the training split gives no full batch; lower train.batch_size")
        self._epoch, self._ds = None, None
        first = loader.dataset(0)[0]
        self.input_shape = first["image"].shape[1:]

    def batch(self, step: int) -> dict:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._ds = epoch, self.loader.dataset(epoch)
        b = self._ds[k]
        return {"image": np.asarray(b["image"], np.float32), "target": np.asarray(b["target"])}


class ArrayValidation:
    """In-memory validation arrays scored with the loop's own minimal metrics (train.metrics)."""

    def __init__(self, arrays: dict, kind: str):
        from vfm_align.train.metrics import PRIMARY

        self.images, self.targets, self.kind = arrays["image"], arrays["target"], kind
        self.primary = PRIMARY[kind]

    def evaluate(self, outputs: np.ndarray) -> dict:
        from vfm_align.train.metrics import evaluate

        return evaluate(self.kind, outputs, self.targets)


class CohortValidation:
    """A validation split loaded once (centre crops, no augmentation), scored by the task's metrics."""

    def __init__(self, loader, task):
        rows = list(loader.epoch(0))
        if not rows:
            raise ConfigError("the validation split is empty")
        self.images = np.concatenate([np.asarray(b["image"], np.float32) for b in rows])
        self.targets = np.concatenate([np.asarray(b["target"]) for b in rows])
        self.glands = np.concatenate([np.asarray(b["gland"]) for b in rows])
        self.task, self.primary = task, task.primary

    def evaluate(self, outputs: np.ndarray) -> dict:
        return self.task.evaluate(self.task.predictions(outputs), self.targets, self.glands)


class DrawnBatches:
    """Batches of ``batch_size`` rows drawn at random (with replacement only when there are fewer rows),
    from ``np.random.default_rng(seed)`` in step order: the study's short runs, which resume per run
    rather than per step. ``keys``: the arrays of ``arrays`` a batch carries."""

    def __init__(self, arrays: dict, batch_size: int, seed: int, keys=("image", "target")):
        self.arrays, self.batch_size, self.keys = arrays, int(batch_size), tuple(keys)
        self.rng = np.random.default_rng(seed)
        self.n = len(arrays[self.keys[0]])

    def next(self) -> dict:
        idx = self.rng.choice(self.n, self.batch_size, replace=self.n < self.batch_size)
        return {k: self.arrays[k][idx] for k in self.keys}
