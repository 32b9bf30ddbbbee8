"""Cohort manifests: one row per case, validated before any run starts.

A manifest is a CSV (or JSON) file. Columns:

* ``case_id`` (unique), ``split`` (train / val / test);
* ``t2w``, ``adc``, ``dwi``: image paths, relative to the manifest's folder (absolute paths work too);
* optional ``gland`` (zone mask: 0 background, 1 transition zone, 2 peripheral zone) and
  ``lesion`` (0/1, or the ISUP grade 0-5 per voxel);
* any other column is an integer case label, e.g. ``cspca`` (0/1) and ``grade`` (ISUP 0-5).
  Empty cells mean "unknown".

A JSON manifest is ``{"cases": [{...row...}, ...], "classes": {"gland": [0, 1, 2], ...}}`` (or
just the list of rows); ``classes`` overrides :data:`DEFAULT_CLASSES` for its keys.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np

from vfm_align.data.nifti import Volume, check_same_grid, load_volume
from vfm_align.errors import DataError

IMAGES = ("t2w", "adc", "dwi")
MASKS = ("gland", "lesion")
SPLITS = ("train", "val", "test")
# Declared label values; a mask voxel or case label outside these is an error.
DEFAULT_CLASSES = {
    "gland": (0, 1, 2),
    "lesion": (0, 1, 2, 3, 4, 5),
    "cspca": (0, 1),
    "grade": (0, 1, 2, 3, 4, 5),
}


@dataclass(frozen=True)
class Case:
    """One row of a manifest, with absolute paths."""

    case_id: str
    split: str
    paths: dict  # name -> absolute path, for the images and the masks present
    labels: dict = field(default_factory=dict)  # name -> int (missing labels are absent)


@dataclass
class Cohort:
    """The validated cases of a manifest, and the ones skipped (``skip_bad=True``) with why."""

    manifest: str
    cases: list
    classes: dict
    skipped: list = field(default_factory=list)  # [(case_id, reason)]

    def split(self, name: str) -> list:
        if name not in SPLITS:
            raise DataError(f"{self.manifest}: unknown split '{name}' (expected one of {SPLITS})")
        return [c for c in self.cases if c.split == name]

    def __len__(self) -> int:
        return len(self.cases)


def _read_rows(path: str):
    if path.endswith(".json"):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable JSON manifest ({exc})") from exc
        rows = doc.get("cases") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: JSON manifest must be a list of rows or {{'cases': [...]}}")
        classes = doc.get("classes", {}) if isinstance(doc, dict) else {}
        return [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows], classes
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV manifest ({exc})") from exc
    return rows, {}


def read_manifest(path: str | os.PathLike, *, classes: dict | None = None, skip_bad: bool = False) -> Cohort:
    """Parse and check a manifest: columns, unique ids, splits, label values and that files exist.

    Structural problems (missing columns, duplicate ids, no cases) always raise DataError. Per-case
    problems raise one DataError listing every bad case, unless ``skip_bad``: then those cases are
    left out and listed in ``Cohort.skipped``.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise DataError(f"{path}: manifest not found")
    rows, file_classes = _read_rows(path)
    declared = {**DEFAULT_CLASSES, **{k: tuple(int(v) for v in vs) for k, vs in file_classes.items()},
                **{k: tuple(vs) for k, vs in (classes or {}).items()}}
    if not rows:
        raise DataError(f"{path}: manifest has no cases")
    missing = [c for c in ("case_id", "split", *IMAGES) if c not in rows[0]]
    if missing:
        raise DataError(f"{path}: manifest lacks required column(s) {missing}")
    seen, dups = set(), []
    for r in rows:
        cid = (r.get("case_id") or "").strip()
        if cid in seen:
            dups.append(cid)
        seen.add(cid)
    if dups:
        raise DataError(f"{path}: duplicate case_id(s) {sorted(set(dups))}")

    root = os.path.dirname(path)
    cases, bad = [], []
    for n, r in enumerate(rows, start=2):
        cid = (r.get("case_id") or "").strip()
        where = f"{path}: case '{cid}' (row {n})"
        problems = []
        if not cid:
            problems.append("empty case_id")
        split = (r.get("split") or "").strip()
        if split not in SPLITS:
            problems.append(f"split '{split}' is not one of {SPLITS}")
        paths = {}
        for name in IMAGES + MASKS:
            rel = (r.get(name) or "").strip()
            if not rel:
                if name in IMAGES:
                    problems.append(f"no {name} path")
                continue
            full = os.path.normpath(os.path.join(root, rel))
            if not os.path.isfile(full):
                problems.append(f"{name} file not found: {full}")
            paths[name] = full
        labels = {}
        for key, val in r.items():
            if key is None or key in ("case_id", "split", *IMAGES, *MASKS) or val is None or str(val).strip() == "":
                continue
            try:
                num = float(val)
                if num != int(num):
                    raise ValueError
                labels[key] = int(num)
            except ValueError:
                problems.append(f"label {key}='{val}' is not an integer")
                continue
            if key in declared and labels[key] not in declared[key]:
                problems.append(f"label {key}={labels[key]} outside declared classes {list(declared[key])}")
        if problems:
            bad.append((cid or f"row {n}", f"{where}: " + "; ".join(problems)))
        else:
            cases.append(Case(case_id=cid, split=split, paths=paths, labels=labels))
    cohort = Cohort(manifest=path, cases=cases, classes=declared, skipped=bad)
    if bad and not skip_bad:
        raise DataError(summarise_bad(bad))
    return cohort


def summarise_bad(bad) -> str:
    head = f"{len(bad)} bad case(s); fix them or pass skip_bad=True to leave them out:\n  "
    return head + "\n  ".join(reason for _, reason in bad)


def load_case(case: Case, classes: dict | None = None) -> dict:
    """Read one case's volumes and check them: same grid, finite, masks within declared classes.

    Returns {"t2w", "adc", "dwi", optional "gland", "lesion": Volume}. Raises DataError naming the
    case and file.
    """
    classes = {**DEFAULT_CLASSES, **(classes or {})}
    vols: dict[str, Volume] = {}
    try:
        for name in IMAGES + MASKS:
            if name in case.paths:
                vols[name] = load_volume(case.paths[name], kind=name)
        check_same_grid(vols)
    except DataError as exc:
        raise DataError(f"case '{case.case_id}': {exc}") from exc
    check_masks(case, vols, classes)
    return vols


def check_masks(case: Case, vols: dict, classes: dict | None = None) -> None:
    """Raise DataError unless each mask holds integers within its declared classes; cast to uint8."""
    classes = {**DEFAULT_CLASSES, **(classes or {})}
    for name in MASKS:
        if name not in vols:
            continue
        data = vols[name].data
        if not np.allclose(data, np.rint(data)):
            raise DataError(f"case '{case.case_id}': {vols[name].path}: {name} mask has non-integer values")
        values = np.unique(np.rint(data).astype(np.int64))
        extra = sorted(set(values.tolist()) - set(classes[name]))
        if extra:
            raise DataError(f"case '{case.case_id}': {vols[name].path}: {name} mask has values {extra} outside "
                            f"declared classes {list(classes[name])}")
        vols[name].data = np.rint(data).astype(np.uint8)
