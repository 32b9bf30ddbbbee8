"""Resume that cannot mix: an output folder records the config and cohorts its results came from.

Design note. The first run into a folder writes ``study_record.json`` (atomically): the resolved
config flattened to dotted keys, and a fingerprint of each cohort. A later run compares. Nothing
changed: resume. Something changed: without ``overwrite`` a :class:`ConfigError` names every changed
key (``finetune.steps: 150 -> 100``); with ``overwrite`` the returned :class:`ResumePlan` says which
stages are stale, the runner deletes their outputs, then calls ``plan.commit()`` to record the new
config. A crash between deleting and committing leaves the old record, so the next run sees the
change again (deleting is idempotent); the record never claims outputs it did not check.

* Config. ``ConfigDict.to_dict()`` flattened: nested keys joined with ".", lists of dicts with a
  ``name`` (the backbones) keyed by name (``backbones[contrastive].pretrain.steps``), other values
  kept as JSON. Keys matching :data:`NOT_RESULT_KEYS` are left out: they cannot change a number
  (how many threads, progress bars, where output goes).
* Cohorts. A manifest is fingerprinted per case in manifest order (row order sets batch order):
  split, labels, and per image/mask file its size plus the SHA-256 of its first and last 64 KiB.
  For a .nii.gz the last bytes are gzip's CRC-32 and length of the whole volume, so any change of
  voxels is caught without reading the file; for an uncompressed .nii a change in the middle of a
  large file is not (``full=True`` hashes every byte). Paths are not part of the fingerprint, so a
  moved cohort still matches. A generated phantom is fingerprinted by its recipe (a dict), since
  its files are a function of it; pass the recipe instead of a manifest path.
* Stages. Each changed key invalidates what depends on it: statistics keys
  (:data:`SUMMARY_KEYS`) only the summary; ``backbones[b].pretrain.*`` / ``.weights`` the pretraining
  of b and its fine-tunes; other ``backbones[b].*`` the fine-tunes of b; ``finetune.*`` and ``tasks``
  every fine-tune; a changed fine-tuning cohort every fine-tune; anything else (seed, cohort recipe,
  mesh, the pretraining cohort, unknown keys) everything. The summary is redone on any change.
  Adding a task or seed therefore reruns every fine-tune: conservative, never mixed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field

from vfm_align.atomic import write_json
from vfm_align.data.cohort import IMAGES, MASKS, read_manifest
from vfm_align.errors import ConfigError, DataError

RECORD = "study_record.json"
FORMAT = 1
# Keys that cannot change any result: parallelism, progress display, output location.
NOT_RESULT_KEYS = ("workers", "progress", "out", "out_dir", "overwrite", "*.workers", "*.progress", "*.num_workers")
# Keys that only change the statistics and report computed from finished runs.
SUMMARY_KEYS = ("primary_site", "gain_floor", "num_bootstrap", "num_correlation_permutations", "confidence",
                "exact_limit", "stats.*", "report.*")
# Existing outputs that a folder without a record must not silently reuse.
OUTPUTS = ("runs", "pretrained", "results.json")
_EDGE = 64 * 1024


# ----------------------------------------------------------------------------------------------
# Config


def _plain(cfg):
    return cfg.to_dict() if hasattr(cfg, "to_dict") else cfg


def flatten_config(cfg, exclude=NOT_RESULT_KEYS) -> dict:
    """{dotted key: JSON value} of a ConfigDict or dict, without the keys matching ``exclude``."""
    flat = {}

    def walk(prefix, v):
        v = _plain(v)
        if isinstance(v, dict):
            if not v:
                flat[prefix] = {}
            for k in sorted(v, key=str):
                walk(f"{prefix}.{k}" if prefix else str(k), v[k])
        elif isinstance(v, (list, tuple)) and v and all(isinstance(_plain(e), dict) and "name" in _plain(e)
                                                        for e in v):
            names = [str(_plain(e)["name"]) for e in v]
            if len(set(names)) != len(names):
                raise ConfigError(f"{prefix}: entries need unique names, got {names}")
            for n, e in zip(names, v):
                walk(f"{prefix}[{n}]", e)
            flat[f"{prefix}.order"] = names  # the order of the entries is part of the config
        elif isinstance(v, (list, tuple)):
            flat[prefix] = json.loads(json.dumps([_plain(e) for e in v], default=repr))
        else:
            flat[prefix] = json.loads(json.dumps(v, default=repr))

    walk("", cfg)
    return {k: v for k, v in flat.items() if not any(fnmatch.fnmatchcase(k, p) for p in exclude)}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_hash(cfg, exclude=NOT_RESULT_KEYS) -> str:
    """SHA-256 of the canonical JSON of the flattened config (see :func:`flatten_config`)."""
    return _sha(flatten_config(cfg, exclude))


# ----------------------------------------------------------------------------------------------
# Cohorts


def file_fingerprint(path: str, *, full: bool = False) -> str:
    """``size:sha256`` of the whole file (``full``) or of its first and last 64 KiB."""
    try:
        size = os.path.getsize(path)
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            if full or size <= 2 * _EDGE:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    except OSError as exc:
        raise DataError(f"{path}: cannot fingerprint ({exc})") from exc
    return f"{size}:{h.hexdigest()[:32]}"


def cohort_fingerprint(source, *, full: bool = False) -> dict:
    """Fingerprint of a cohort: a manifest path (per case, see the module note) or a generator recipe (a dict)."""
    if isinstance(source, dict) or hasattr(source, "to_dict"):
        return {"recipe": json.loads(json.dumps(_plain(source), sort_keys=True, default=repr))}
    cohort = read_manifest(os.fspath(source))
    cases = {}
    for c in cohort.cases:
        cases[c.case_id] = {"split": c.split, "labels": dict(sorted(c.labels.items())),
                            "files": {k: file_fingerprint(c.paths[k], full=full) for k in IMAGES + MASKS
                                      if k in c.paths}}
    return {"order": [c.case_id for c in cohort.cases], "cases": cases}


def _cohort_changes(name: str, old: dict, new: dict, limit: int = 8) -> list[str]:
    if old == new:
        return []
    tag = f"cohort {name}"
    if "recipe" in old or "recipe" in new:
        if "recipe" in old and "recipe" in new:
            return [f"{tag}.{k}: {old['recipe'].get(k)!r} -> {new['recipe'].get(k)!r}"
                    for k in sorted(set(old["recipe"]) | set(new["recipe"]), key=str)
                    if old["recipe"].get(k) != new["recipe"].get(k)]
        return [f"{tag}: {'generated' if 'recipe' in old else 'manifest'} -> "
                f"{'generated' if 'recipe' in new else 'manifest'}"]
    out = []

    def few(ids):
        return ", ".join(ids[:limit]) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")

    added = [c for c in new["order"] if c not in old["cases"]]
    removed = [c for c in old["order"] if c not in new["cases"]]
    if added:
        out.append(f"{tag}: case(s) added: {few(added)}")
    if removed:
        out.append(f"{tag}: case(s) removed: {few(removed)}")
    changed = []
    for c in new["order"]:
        if c in old["cases"] and old["cases"][c] != new["cases"][c]:
            o, n = old["cases"][c], new["cases"][c]
            what = [k for k in ("split", "labels") if o[k] != n[k]]
            what += [f for f in sorted(set(o["files"]) | set(n["files"])) if o["files"].get(f) != n["files"].get(f)]
            changed.append(f"{c} ({', '.join(what)})")
    if changed:
        out.append(f"{tag}: case(s) changed: {few(changed)}")
    kept_old = [c for c in old["order"] if c in new["cases"]]
    kept_new = [c for c in new["order"] if c in old["cases"]]
    if kept_old != kept_new:
        out.append(f"{tag}: case order changed")
    return out


# ----------------------------------------------------------------------------------------------
# The record and the plan


def _backbone_of(key: str) -> str | None:
    if key.startswith("backbones[") and "]" in key:
        return key[len("backbones["):key.index("]")]
    return None


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def config_changes(old: dict, new: dict) -> list[tuple[str, str]]:
    """[(key, readable change)] between two flattened configs, sorted by key."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append((k, f"{k}: {_short(old[k])} -> (removed)"))
        elif k not in old:
            out.append((k, f"{k}: (new) -> {_short(new[k])}"))
        elif old[k] != new[k]:
            out.append((k, f"{k}: {_short(old[k])} -> {_short(new[k])}"))
    return out


@dataclass
class ResumePlan:
    """What a run into an existing folder must recompute; ``commit()`` records the new config afterwards."""

    out_dir: str
    fresh: bool  # no earlier record: nothing to reuse or delete
    changes: list = field(default_factory=list)  # readable lines
    pretrain: list = field(default_factory=list)  # backbone names whose pretraining is stale
    finetune: list = field(default_factory=list)  # backbone names whose fine-tunes are stale
    summary: bool = False
    record: dict = field(default_factory=dict, repr=False)

    @property
    def unchanged(self) -> bool:
        return not self.fresh and not self.changes

    def commit(self) -> None:
        """Write the new record (atomic). Call after the stale outputs are deleted."""
        write_json(os.path.join(self.out_dir, RECORD), self.record)


def _stages(keys, cohort_names, backbones) -> tuple[set, set]:
    pre, fine = set(), set()
    for k in keys:
        b = _backbone_of(k)
        if any(fnmatch.fnmatchcase(k, p) for p in SUMMARY_KEYS):
            continue
        if b is not None and (k.startswith(f"backbones[{b}].pretrain.") or k == f"backbones[{b}].pretrain"
                              or k.startswith(f"backbones[{b}].weights")):
            pre.add(b)
            fine.add(b)
        elif b is not None:
            fine.add(b)
        elif k == "tasks" or k.startswith("finetune.") or k == "backbones.order":
            fine |= backbones
        else:  # seed, cohort recipe, mesh, anything not known to be narrower
            pre |= backbones
            fine |= backbones
    for name in cohort_names:
        if name != "finetune":
            pre |= backbones
        fine |= backbones
    return pre, fine


def check_resume(out_dir: str, cfg, cohorts: dict, *, overwrite: bool = False, full_hash: bool = False,
                 outputs=OUTPUTS) -> ResumePlan:
    """Compare ``cfg`` and ``cohorts`` ({name: manifest path or generator recipe}) with the folder's record.

    First run (no record, no outputs): writes the record, returns a fresh plan. Same config and cohorts:
    an unchanged plan. Anything changed: ConfigError naming the changes, or with ``overwrite`` a plan of
    the stale stages (names of backbones to re-pretrain / re-fine-tune, whether to redo the summary);
    the caller deletes those outputs, then calls ``plan.commit()``.
    """
    out_dir = os.path.abspath(out_dir)
    flat = flatten_config(cfg)
    prints = {name: cohort_fingerprint(src, full=full_hash) for name, src in sorted(cohorts.items())}
    record = {"format": FORMAT, "config": flat, "config_sha256": _sha(flat), "cohorts": prints,
              "cohorts_sha256": _sha(prints)}
    backbones = {b for k in flat if (b := _backbone_of(k)) is not None}
    path = os.path.join(out_dir, RECORD)
    if not os.path.exists(path):
        found = [o for o in outputs if os.path.exists(os.path.join(out_dir, o))]
        if found and not overwrite:
            raise ConfigError(f"{out_dir}: holds {found} but no {RECORD} saying which config made them; "
                              "choose another output folder or pass --overwrite to recompute everything")
        plan = ResumePlan(out_dir, fresh=not found, record=record)
        if found:  # outputs of unknown origin: everything is stale
            plan.changes = [f"{out_dir}: earlier outputs without a record"]
            plan.pretrain, plan.finetune, plan.summary = sorted(backbones), sorted(backbones), True
        else:
            plan.commit()
        return plan
    try:
        with open(path) as fh:
            old = json.load(fh)
        old_flat, old_prints = old["config"], old["cohorts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable study record ({exc}); pass --overwrite to recompute everything") \
            from exc
    changed = config_changes(old_flat, flat)
    cohort_lines, cohort_names = [], []
    for name in sorted(set(old_prints) | set(prints)):
        lines = (_cohort_changes(name, old_prints[name], prints[name]) if name in old_prints and name in prints
                 else [f"cohort {name}: {'(new)' if name in prints else '(removed)'}"])
        if lines:
            cohort_names.append(name)
            cohort_lines += lines
    lines = [line for _, line in changed] + cohort_lines
    plan = ResumePlan(out_dir, fresh=False, changes=lines, record=record)
    if not lines:
        return plan
    if not overwrite:
        raise ConfigError(f"{out_dir} holds results of another config or cohort; changed:\n  " + "\n  ".join(lines)
                          + "\nchoose another output folder or pass --overwrite to recompute what depends on them")
    old_backbones = {b for k in old_flat if (b := _backbone_of(k)) is not None}
    pre, fine = _stages([k for k, _ in changed], cohort_names, backbones | old_backbones)
    plan.pretrain, plan.finetune, plan.summary = sorted(pre), sorted(fine), True
    return plan
