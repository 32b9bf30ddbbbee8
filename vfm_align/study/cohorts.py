"""Which cases the study uses for what: a pretraining cohort apart from the fine-tuning cohort, a
probe set of held-out cases, and the ``design`` section of results.json that states all of it.

Design note.

* Pretraining data never overlaps fine-tuning data. By default the pretraining cohort is the phantom
  generated with another seed (its cases are independent draws); its manifest renames the case ids
  (``pre-phantom0000``) so that ids can be compared across cohorts, and puts every case in ``train``
  (pretraining uses the whole cohort). Any manifest works in general. :func:`check_disjoint` refuses
  shared case ids or image files (and, with ``content=True``, byte-identical image files under other
  names), naming the cases.
* Probes (the cases whose features MMD\u00b2 compares before and after fine-tuning) are held-out cases of
  the fine-tuning cohort: validation first, then test, in manifest order; never training cases. They
  carry no labels into anything: their features only measure drift.
* The ``design`` section is plain JSON: cohorts with case ids per split, the probe ids, seeds,
  steps, model sizes with parameter counts, and \u03c3 per pair; it is checked while it is built
  (disjoint cohorts, probes outside the training split).
"""

from __future__ import annotations

import csv
import hashlib
import os

from vfm_align.atomic import atomic_file
from vfm_align.data.cohort import IMAGES, MASKS, SPLITS, read_manifest
from vfm_align.errors import ConfigError, DataError

PRETRAIN_PREFIX = "pre-"


def _few(items, limit=10) -> str:
    items = sorted(items)
    return ", ".join(map(str, items[:limit])) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def make_pretraining_phantom(out_dir: str, cases: int, *, shape, seed: int, finetune_seed: int,
                             workers: int = 1, progress: bool = False) -> str:
    """The phantom drawn with ``seed`` (not the fine-tuning cohort's) as a pretraining manifest; its path.

    Writes ``out_dir/phantom/`` (make_phantom: idempotent for the same recipe) and ``out_dir/manifest.csv``
    with ids prefixed ``pre-`` and every case in the training split.
    """
    from vfm_align.data.phantom import make_phantom

    if int(seed) == int(finetune_seed):
        raise ConfigError(f"the pretraining phantom needs a seed other than the fine-tuning cohort's ({seed})")
    source = make_phantom(os.path.join(out_dir, "phantom"), int(cases), shape=tuple(shape), seed=int(seed),
                          workers=workers, progress=progress)
    with open(source, newline="") as fh:
        rows = list(csv.DictReader(fh))
    path = os.path.join(out_dir, "manifest.csv")
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "case_id": PRETRAIN_PREFIX + r["case_id"], "split": "train",
                        **{k: f"phantom/{r[k]}" for k in IMAGES + MASKS if r.get(k)}})
    return path


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_disjoint(pretrain_manifest: str, finetune_manifest: str, *, content: bool = False) -> dict:
    """Raise DataError if the two cohorts share a case id or an image file; returns what was checked.

    ``content``: also compare the SHA-256 of every image file (reads every byte: cheap for the phantom).
    """
    pre, fine = read_manifest(pretrain_manifest), read_manifest(finetune_manifest)
    problems = []
    ids = {c.case_id for c in pre.cases} & {c.case_id for c in fine.cases}
    if ids:
        problems.append(f"case id(s) in both: {_few(ids)}")

    def files(cohort):
        return {os.path.realpath(p): c.case_id for c in cohort.cases for k, p in c.paths.items() if k in IMAGES}

    fp, ff = files(pre), files(fine)
    shared = set(fp) & set(ff)
    if shared:
        problems.append("image file(s) in both: " + _few(f"{fp[p]} / {ff[p]} ({p})" for p in shared))
    if content:
        hp = {}
        for p, cid in fp.items():
            hp.setdefault(_sha256(p), cid)
        same = {f"{hp[h]} / {cid}" for p, cid in ff.items() if p not in shared and (h := _sha256(p)) in hp}
        if same:
            problems.append(f"identical image content (pretraining / fine-tuning case): {_few(same)}")
    if problems:
        raise DataError(f"pretraining cohort {pre.manifest} overlaps fine-tuning cohort {fine.manifest}: "
                        + "; ".join(problems))
    return {"pretrain_cases": len(pre), "finetune_cases": len(fine), "shared_case_ids": 0, "shared_files": 0,
            "content_compared": bool(content)}


def choose_probe_cases(case_ids, splits, *, num: int | None = 32, order=("val", "test")) -> list[int]:
    """Indices of the probe cases: held-out cases, ``order[0]`` split first, in manifest order.

    ``num`` cases (all held-out cases if None; at least ``num`` must exist). Raises DataError with
    the counts when the cohort has too few held-out cases.
    """
    if "train" in order or any(s not in SPLITS for s in order):
        raise ConfigError(f"probe splits must be held-out splits among {SPLITS[1:]}, got {list(order)}")
    case_ids, splits = list(case_ids), [str(s) for s in splits]
    if len(case_ids) != len(splits):
        raise DataError(f"{len(case_ids)} case ids but {len(splits)} split labels")
    idx = [i for s in order for i, sp in enumerate(splits) if sp == s]
    counts = " + ".join(f"{sum(sp == s for sp in splits)} {s}" for s in order)
    if num is not None and len(idx) < int(num):
        raise DataError(f"the probe set needs {int(num)} held-out cases, but the fine-tuning cohort has {counts} = "
                        f"{len(idx)}; use a larger cohort or fewer probe cases")
    if not idx:
        raise DataError("the fine-tuning cohort has no held-out cases for the probe set")
    return idx if num is None else idx[:int(num)]


def describe_cohort(manifest: str) -> dict:
    """{"manifest", "num_cases", "case_ids": {split: [ids in manifest order]}} of a manifest."""
    c = read_manifest(manifest)
    ids = {s: [x.case_id for x in c.split(s)] for s in SPLITS}
    return {"manifest": c.manifest, "num_cases": {s: len(v) for s, v in ids.items()}, "case_ids": ids}


def count_params(model) -> int:
    """Parameters of an nnx module (its ``nnx.Param`` leaves), or an int passed through."""
    if isinstance(model, int):
        return model
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _pair_key(k) -> str:
    return "/".join(map(str, k)) if isinstance(k, tuple) else str(k)


def design_section(*, pretrain_cohort: str | dict, finetune_cohort: str | dict, probe_case_ids, seeds,
                   steps: dict, models: dict, sigma: dict, extra: dict | None = None) -> dict:
    """The ``design`` section of results.json, checked: disjoint cohorts, probes outside the training split.

    ``*_cohort``: a manifest path or :func:`describe_cohort`'s dict; ``steps``: e.g. {"pretrain": 400,
    "finetune": 150, "eval_every": 15}; ``models``: name -> nnx module or parameter count (with optional
    {"arch": ..., "params": ...} dicts); ``sigma``: (backbone, task) or "backbone/task" -> {site: \u03c3}.
    """
    pre = describe_cohort(pretrain_cohort) if isinstance(pretrain_cohort, str) else pretrain_cohort
    fine = describe_cohort(finetune_cohort) if isinstance(finetune_cohort, str) else finetune_cohort
    pre_ids = {i for v in pre["case_ids"].values() for i in v}
    fine_ids = {i for v in fine["case_ids"].values() for i in v}
    if pre_ids & fine_ids:
        raise DataError(f"design: case id(s) in both the pretraining and the fine-tuning cohort: "
                        f"{_few(pre_ids & fine_ids)}")
    probes = [str(p) for p in probe_case_ids]
    in_train = set(probes) & set(fine["case_ids"].get("train", []))
    unknown = set(probes) - fine_ids
    if in_train or unknown:
        raise DataError(f"design: probe case(s) {_few(in_train | unknown)} are "
                        + ("training cases" if in_train else "not in the fine-tuning cohort"))
    sizes = {}
    for name, m in models.items():
        info = dict(m) if isinstance(m, dict) else {"params": m}
        info["params"] = count_params(info["params"])
        sizes[name] = info
    return {
        "pretrain_cohort": pre,
        "finetune_cohort": fine,
        "probe_case_ids": probes,
        "num_probe_cases": len(probes),
        "probe_splits": sorted({s for s, v in fine["case_ids"].items() for i in v if i in set(probes)}),
        "seeds": [int(s) for s in seeds],
        "steps": {k: int(v) for k, v in steps.items()},
        "models": sizes,
        "sigma": {_pair_key(k): ({s: float(x) for s, x in v.items()} if isinstance(v, dict) else float(v))
                  for k, v in sigma.items()},
        "checks": {"cohorts_disjoint": True, "probes_outside_train": True},
        **(extra or {}),
    }
