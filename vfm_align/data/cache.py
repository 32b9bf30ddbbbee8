"""Preprocess each case once and keep it as C-ordered ``.npy`` files read back as memmaps.

The deterministic part of the pipeline (read, reorient, resample, normalise, stack channels) is a
:class:`Recipe`; its JSON hash names the cache folder, so changing any recipe field never reuses
stale arrays. Each entry also records the size and mtime of its source files and is rebuilt
when they change. Entries are written to a temporary folder and renamed, so an interrupted build
leaves no half-written case behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass

import numpy as np

from vfm_align.atomic import atomic_dir
from vfm_align.data.cohort import MASKS, Case, Cohort, check_masks, load_case, summarise_bad
from vfm_align.data.nifti import load_volume
from vfm_align.data.resample import resample_onto, resample_to_spacing, to_canonical
from vfm_align.errors import DataError

CHANNELS = ("t2w", "dwi", "adc")  # channel order of "image": [T2w, DWI, ADC]
NORMALIZERS = ("none", "zscore_nonzero")


@dataclass(frozen=True)
class Recipe:
    """What is done to every case before training. Part of the cache key."""

    canonical: bool = True  # reorient to RAS+
    spacing: tuple | None = None  # (D, H, W) mm; None keeps the native grid
    align_to_t2w: bool = False  # resample DWI/ADC/masks onto the T2w grid instead of rejecting a mismatch
    normalize: str = "zscore_nonzero"
    version: int = 1

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def zscore_nonzero(x: np.ndarray) -> np.ndarray:
    """Per channel, subtract the mean and divide by the population std of the non-zero voxels.

    Matches MONAI ``NormalizeIntensityd(nonzero=True, channel_wise=True)``: zero voxels stay zero.
    """
    out = np.zeros_like(x, dtype=np.float32)
    for c in range(x.shape[-1]):
        ch = x[..., c]
        nz = ch != 0
        if nz.any():
            vals = ch[nz].astype(np.float64)
            std = vals.std()
            out[..., c][nz] = ((vals - vals.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def preprocess_case(case: Case, recipe: Recipe, classes: dict | None = None) -> dict:
    """Run ``recipe`` on one case: {"image" (D,H,W,3) float32, "gland"/"lesion" (D,H,W) uint8, "meta"}."""
    if recipe.normalize not in NORMALIZERS:
        raise DataError(f"recipe normalize '{recipe.normalize}' unknown (expected one of {NORMALIZERS})")
    if recipe.align_to_t2w:  # co-register by resampling through the affines instead of rejecting
        vols = {}
        try:
            for name, path in case.paths.items():
                vols[name] = load_volume(path, kind=name)
        except DataError as exc:
            raise DataError(f"case '{case.case_id}': {exc}") from exc
        ref = vols["t2w"]
        vols = {n: v if n == "t2w" else resample_onto(v, ref, order=0 if n in MASKS else 1) for n, v in vols.items()}
        check_masks(case, vols, classes)
    else:
        vols = load_case(case, classes)
    if recipe.canonical:
        vols = {n: to_canonical(v) for n, v in vols.items()}
    if recipe.spacing is not None:
        vols = {n: resample_to_spacing(v, recipe.spacing, order=0 if n in MASKS else 1) for n, v in vols.items()}
    image = np.stack([vols[c].data.astype(np.float32) for c in CHANNELS], axis=-1)
    if recipe.normalize == "zscore_nonzero":
        image = zscore_nonzero(image)
    shape = image.shape[:3]
    out = {"image": np.ascontiguousarray(image)}
    for m in MASKS:
        out[m] = np.ascontiguousarray(vols[m].data.astype(np.uint8)) if m in vols else np.zeros(shape, np.uint8)
    t2 = vols["t2w"]
    out["meta"] = {"case_id": case.case_id, "affine": t2.affine.tolist(), "spacing": list(t2.spacing),
                   "shape": list(shape), "has": sorted(vols)}
    return out


def _fingerprint(case: Case) -> dict:
    out = {}
    for name, path in sorted(case.paths.items()):
        st = os.stat(path)
        out[name] = [path, st.st_size, st.st_mtime_ns]
    return out


_NPY_HEADER_LOCK = threading.Lock()


class PreprocessCache:
    """``root/<recipe key>/<case_id>/{image,gland,lesion}.npy + meta.json``."""

    def __init__(self, root: str | os.PathLike, recipe: Recipe = Recipe(), classes: dict | None = None):
        self.recipe = recipe
        self.classes = classes
        self.dir = os.path.join(os.path.abspath(os.fspath(root)), recipe.key())

    def _case_dir(self, case: Case) -> str:
        return os.path.join(self.dir, case.case_id)

    def is_fresh(self, case: Case) -> bool:
        meta = os.path.join(self._case_dir(case), "meta.json")
        if not os.path.isfile(meta):
            return False
        try:
            with open(meta) as f:
                return json.load(f).get("sources") == json.loads(json.dumps(_fingerprint(case)))
        except (OSError, json.JSONDecodeError):
            return False

    def put(self, case: Case) -> None:
        arrays = preprocess_case(case, self.recipe, self.classes)
        final = self._case_dir(case)
        # concurrent_ok: another thread or process may finish the same case first; keep theirs if fresh.
        with atomic_dir(final, concurrent_ok=True) as tmp:
            for name in ("image", *MASKS):
                np.save(os.path.join(tmp, f"{name}.npy"), arrays[name])
            meta = {**arrays["meta"], "recipe": asdict(self.recipe), "sources": _fingerprint(case)}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, default=list)
        if not self.is_fresh(case):
            raise DataError(
                f"case {case.case_id}: the cache entry {final} was replaced by a different one while writing")

    def get(self, case: Case) -> dict:
        """The cached arrays of ``case`` as read-only memmaps (preprocessing it first if needed)."""
        if not self.is_fresh(case):
            self.put(case)
        d = self._case_dir(case)
        # np.load parses the .npy header with ast.literal_eval, which is not thread-safe on
        # CPython 3.11 ("AST constructor recursion depth mismatch"); the loader calls this from
        # several threads, so header parsing is serialised (opening a memmap is cheap).
        with _NPY_HEADER_LOCK:
            return {name: np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r") for name in ("image", *MASKS)}

    def meta(self, case: Case) -> dict:
        """The sidecar of a cached case: affine, spacing (D, H, W mm), shape, recipe and sources."""
        with open(os.path.join(self._case_dir(case), "meta.json")) as f:
            return json.load(f)

    def build(self, cohort: Cohort, *, skip_bad: bool = False, workers: int = 1, progress: bool = False) -> Cohort:
        """Preprocess every stale case. Bad cases raise one DataError listing all of them, or
        with ``skip_bad`` are dropped from the returned cohort and listed in its ``skipped``."""
        todo = [c for c in cohort.cases if not self.is_fresh(c)]
        errors = {}
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress) as bar:
            if workers <= 1:
                for c in todo:
                    try:
                        self.put(c)
                    except DataError as exc:
                        errors[c.case_id] = str(exc)
                    bar.update()
            else:
                with cf.ThreadPoolExecutor(workers) as pool:  # nibabel/gzip/numpy release the GIL
                    futs = {pool.submit(self.put, c): c for c in todo}
                    for fut in cf.as_completed(futs):
                        try:
                            fut.result()
                        except DataError as exc:
                            errors[futs[fut].case_id] = str(exc)
                        bar.update()
        if errors and not skip_bad:
            raise DataError(summarise_bad(sorted(errors.items())))
        good = [c for c in cohort.cases if c.case_id not in errors]
        return Cohort(manifest=cohort.manifest, cases=good, classes=cohort.classes,
                      skipped=list(cohort.skipped) + sorted(errors.items()))
