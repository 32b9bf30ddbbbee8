"""Feature banks: features of a model over a cohort, stored as an on-disk float32 .npy plus a JSON sidecar.

A bank is (rows, width) float32, C-ordered, written through ``np.lib.format.open_memmap`` so it is
never held in memory, and read back memory-mapped. Token sites (N, T, E) are flattened to N*T
rows, input-major. The sidecar (``<bank>.json``) records the site, shape, per-input row count and
the caller's provenance (model, checkpoint, cohort, ...). Both files are written under temporary
names and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vfm_align.atomic import atomic_file, write_json
from vfm_align.errors import DataError

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Bank:
    """An opened bank: ``data`` is a read-only memmap (rows, width); ``provenance`` is the sidecar dict."""

    data: np.ndarray
    provenance: dict
    path: str

    def __len__(self) -> int:
        return self.data.shape[0]


def sidecar_path(path: str | os.PathLike) -> str:
    root, _ = os.path.splitext(os.fspath(path))
    return root + ".json"


def _rows(feats: dict, site: str, batch_index: int) -> np.ndarray:
    if site not in feats:
        raise DataError(f"feature site '{site}' not produced by the model (available: {', '.join(sorted(feats))})")
    a = np.asarray(feats[site], dtype=np.float32)
    if a.ndim == 3:  # (N, T, E) tokens -> N*T rows
        a = a.reshape(-1, a.shape[-1])
    if a.ndim != 2:
        raise DataError(
            f"feature site '{site}': expected (N, E) or (N, T, E), got shape {a.shape} in batch {batch_index}")
    if not np.isfinite(a).all():
        raise DataError(f"feature site '{site}': non-finite value (NaN or inf) in batch {batch_index}")
    return a


def extract_bank(feature_fn: Callable[[Any], dict], batches: Iterable, path: str | os.PathLike, *, site: str = "pooled",
                 provenance: dict | None = None, num_rows: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> Bank:
    """Run ``feature_fn`` over ``batches`` and write the ``site`` features to the bank ``path`` (.npy).

    ``num_rows`` (total rows, when known) lets the bank be written in place; otherwise rows are
    appended to a scratch file and copied into the .npy once the count is known. Returns the
    opened bank.
    """
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".npy"):
        raise DataError(f"{path}: a bank path must end in .npy")
    side = sidecar_path(path)
    if not overwrite and (os.path.exists(path) or os.path.exists(side)):
        raise DataError(f"{path}: bank already exists (pass overwrite=True / --overwrite to replace it)")
    total = 0
    width = None
    rows_per_input = None
    out = None
    # The .npy appears under its name only once complete, then its sidecar.
    with atomic_file(path, suffix=".npy") as tmp:
        raw = tmp + ".raw"
        try:
            total_batches = len(batches) if hasattr(batches, "__len__") else None
            with open(raw, "wb") if num_rows is None else contextlib.nullcontext() as sink:
                for b, batch in enumerate(tqdm(batches, total=total_batches, desc=f"bank {site}", unit="batch",
                                               disable=not progress)):
                    feats = feature_fn(batch)
                    raw_site = np.shape(feats.get(site, ())) if isinstance(feats, dict) else ()
                    a = _rows(feats, site, b)
                    if width is None:
                        width = a.shape[1]
                        rows_per_input = int(raw_site[1]) if len(raw_site) == 3 else 1
                        if num_rows is not None:
                            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_rows, width))
                    elif a.shape[1] != width:
                        raise DataError(
                            f"feature site '{site}': width changed from {width} to {a.shape[1]} in batch {b}")
                    if num_rows is None:
                        sink.write(np.ascontiguousarray(a).tobytes())
                    else:
                        if total + len(a) > num_rows:
                            raise DataError(f"bank {path}: more rows than num_rows={num_rows} (batch {b})")
                        out[total:total + len(a)] = a
                    total += len(a)
            if total == 0:
                raise DataError(f"bank {path}: no features were produced (empty batch iterator?)")
            if num_rows is None:
                src = np.memmap(raw, dtype=np.float32, mode="r", shape=(total, width))
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, width))
                step = max(1, (64 << 20) // (4 * width))
                for s in range(0, total, step):
                    out[s:s + step] = src[s:s + step]
                del src
            elif total != num_rows:
                raise DataError(f"bank {path}: produced {total} rows, expected num_rows={num_rows}")
            out.flush()
            del out
            with contextlib.suppress(FileNotFoundError):  # an overwritten bank's sidecar never describes the new rows
                os.remove(side)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(raw)
    meta = {
        "format_version": FORMAT_VERSION,
        "site": site,
        "shape": [total, width],
        "dtype": "float32",
        "rows_per_input": rows_per_input,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "provenance": provenance or {},
    }
    write_json(side, meta, default=repr)
    return open_bank(path)


def open_bank(path: str | os.PathLike) -> Bank:
    """Open a bank memory-mapped (read-only); the sidecar is optional for plain .npy files."""
    path = os.fspath(path)
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: bank not found") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy bank ({exc})") from None
    if data.ndim != 2:
        raise DataError(f"{path}: a bank must be 2-D (rows, width), got shape {data.shape}")
    if data.shape[0] == 0:
        raise DataError(f"{path}: bank is empty")
    if data.dtype != np.float32:
        raise DataError(f"{path}: a bank must be float32, got {data.dtype}")
    side = sidecar_path(path)
    prov = {}
    if os.path.exists(side):
        try:
            with open(side) as fh:
                prov = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{side}: unreadable bank sidecar ({exc})") from None
    return Bank(data=data, provenance=prov, path=os.path.abspath(path))


# -- features of a saved model over cohort samples (shared by ``vfm-align score`` and ``vfm-align rank``) ------

def _layer_sites(sites) -> bool:
    """Whether any requested site is a per-block output (models give those with ``layers=True``)."""
    from vfm_align.models.task_model import is_layer_site

    return any(is_layer_site(s) for s in sites)


def _pick(feats: dict, sites) -> dict:
    missing = [s for s in sites if s not in feats]
    if missing:
        raise DataError(f"feature site(s) {', '.join(missing)} not produced by the model "
                        f"(available: {', '.join(sorted(feats))})")
    # Maps (N, d, h, w, C) become token rows (N, d*h*w, C), row-major, like "patch".
    return {s: feats[s].reshape(feats[s].shape[0], -1, feats[s].shape[-1]) if feats[s].ndim > 3 else feats[s]
            for s in sites}


def _volume_features(model, x, sites):
    feats = model.features(x, layers=True) if _layer_sites(sites) else model.features(x)
    return _pick(feats, sites)


def _slice_features(model, x, sites, size):
    from vfm_align.models.task_model import volume_to_slices

    s, pos = volume_to_slices(x, 0, 3, size)
    feats = model.features(s, pos, layers=True) if _layer_sites(sites) else model.features(s, pos)
    return _pick(feats, sites)


_JIT = {}


def _jit():
    # Module-level jitted functions: two models of one graph (before / after) share one compilation.
    if not _JIT:
        from flax import nnx

        _JIT["volume"] = nnx.jit(_volume_features, static_argnames=("sites",))
        _JIT["slices"] = nnx.jit(_slice_features, static_argnames=("sites", "size"))
    return _JIT


def model_input_shape(model, arch: str):
    """The (D, H, W) a volume model was built for (MAE-ViT's img_size), or None: any size goes."""
    target = getattr(model.config, "img_size", None)
    if arch == "provicnet" or not (isinstance(target, (tuple, list)) and len(target) == 3):
        return None
    return tuple(int(t) for t in target)


def fit_sample(sample: dict, model, arch: str) -> dict:
    """Centre-crop / pad a sample (image and masks) to the model's input size, where it has one."""
    target = model_input_shape(model, arch)
    if target is None:
        return sample
    from vfm_align.data.augment import crop_or_pad

    return crop_or_pad(sample, target)


def model_feature_fn(model, arch: str, sites=("pooled",)):
    """image (D, H, W, C) -> {site: features (numpy)} for a loaded model; ProViCNet runs on 2.5D slices of
    the T2w channel (one row per slice), volume models on the whole volume (batch of one)."""
    import jax.numpy as jnp

    sites = tuple(sites)

    def run(image):
        x = jnp.asarray(np.asarray(image, np.float32))[None]
        if arch == "provicnet":
            out = _jit()["slices"](model, x, sites, int(model.config.img_size))
        else:
            out = _jit()["volume"](model, x, sites)
        return {s: np.asarray(v) for s, v in out.items()}

    return run


def patch_grid(model, arch: str, image_shape) -> tuple[int, int, int]:
    """The (d, h, w) grid of the "patch" rows of an image (D, H, W, C): row-major cells, one row each.

    ProViCNet: one (gh, gw) patch grid per slice, so (D, gh, gw); ProFound-Conv: its last stage's map;
    MAE-ViT: the patch grid of the (cropped) volume.
    """
    key = (arch, repr(model.config), tuple(image_shape))
    if key not in _GRIDS:
        _GRIDS[key] = _patch_grid(model, arch, tuple(image_shape))
    return _GRIDS[key]


_GRIDS = {}


def _patch_grid(model, arch, image_shape):
    import jax
    import jax.numpy as jnp

    d, h, w, c = image_shape
    if arch == "provicnet":
        s = int(model.config.img_size)
        from vfm_align.models.task_model import volume_to_slices

        shape = jax.eval_shape(lambda m, x: m.features(*volume_to_slices(x, 0, 3, s))["patch_map"], model,
                               jax.ShapeDtypeStruct((1, d, h, w, c), jnp.float32)).shape
        return (d, int(shape[1]), int(shape[2]))
    if hasattr(model.config, "grid_for"):
        return tuple(int(g) for g in model.config.grid_for((d, h, w)))
    shape = jax.eval_shape(lambda m, x: m.features(x)["stage3"], model,
                           jax.ShapeDtypeStruct((1, d, h, w, c), jnp.float32)).shape
    return tuple(int(g) for g in shape[1:4])


def task_feature_rows(model, arch: str, sample: dict, task, features=None) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of one case for a task and the targets they are scored against, row for row.

    Classification: one row per case, the "pooled" features (ProViCNet: averaged over the slices, as its
    task head does) and the class label. Segmentation / detection: one row per "patch" token with the
    fraction of each class in its cell; dense regression: the mean target per cell (align.pool_to_grid).
    ``sample`` is a cohort sample (vfm_align.data.tasks); ``task`` a Task; ``features`` a
    :func:`model_feature_fn` of (model, arch, ("pooled", "patch")) to reuse its compilation.
    """
    from vfm_align.align.transferability import pool_to_grid

    features = features or model_feature_fn(model, arch, ("pooled", "patch"))
    sample = fit_sample(sample, model, arch)
    image, target = task.make(sample)
    feats = features(image)
    if task.kind == "classification":
        return feats["pooled"].reshape(-1, feats["pooled"].shape[-1]).mean(0, keepdims=True), np.reshape(target, (1,))
    rows = feats["patch"].reshape(-1, feats["patch"].shape[-1])
    grid = patch_grid(model, arch, np.shape(image))
    pooled = pool_to_grid(target, grid, num_classes=task.num_outputs if task.kind == "segmentation" else None)
    if len(pooled) != len(rows):
        raise DataError(f"case '{sample.get('case_id')}': {len(rows)} patch rows but a {grid} grid")
    return rows, pooled
