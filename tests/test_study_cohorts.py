"""Pretraining and fine-tuning cohorts stay apart, probes are held out, and the design section says so."""

import csv
import os

import numpy as np
import pytest
from flax import nnx

from vfm_align.data.cohort import read_manifest
from vfm_align.data.nifti import load_volume
from vfm_align.data.phantom import make_phantom
from vfm_align.errors import ConfigError, DataError
from vfm_align.study.cohorts import (
    check_disjoint,
    choose_probe_cases,
    count_params,
    describe_cohort,
    design_section,
    make_pretraining_phantom,
)

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    fine = make_phantom(str(root / "fine"), 4, shape=SHAPE, seed=0, workers=1, progress=False)
    pre = make_pretraining_phantom(str(root / "pre"), 3, shape=SHAPE, seed=1, finetune_seed=0)
    return root, fine, pre


def test_pretraining_phantom_is_other_cases_with_other_volumes(cohorts):
    root, fine, pre = cohorts
    p, f = read_manifest(pre), read_manifest(fine)
    assert [c.case_id for c in p.cases] == ["pre-phantom0000", "pre-phantom0001", "pre-phantom0002"]
    assert {c.split for c in p.cases} == {"train"}
    # Same index, other seed: different volumes (and masks), not a relabelled copy.
    for a, b in zip(p.cases, f.cases):
        for k in ("t2w", "adc", "gland"):
            va, vb = load_volume(a.paths[k], kind=k).data, load_volume(b.paths[k], kind=k).data
            assert va.shape == vb.shape and not np.array_equal(va, vb)
    assert check_disjoint(pre, fine, content=True)["shared_case_ids"] == 0
    with pytest.raises(ConfigError, match="another seed|other than"):
        make_pretraining_phantom(str(root / "same"), 2, shape=SHAPE, seed=0, finetune_seed=0)


def _renamed(manifest, path, prefix):
    """The manifest with case ids phantomNNNN -> {prefix}NNNN, same image paths."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "case_id": r["case_id"].replace("phantom", prefix)} for r in rows)
    return path


def test_overlap_is_refused_naming_the_cases(cohorts, tmp_path):
    root, fine, pre = cohorts
    with pytest.raises(DataError, match=r"case id\(s\) in both: phantom0000, phantom0001"):
        check_disjoint(fine, fine)
    # Same image files under other ids: caught by path.
    alias = _renamed(fine, os.path.join(os.path.dirname(fine), "alias.csv"), "copy")
    with pytest.raises(DataError, match=r"image file\(s\) in both: copy0000 / phantom0000"):
        check_disjoint(alias, fine)
    # A byte-identical copy elsewhere: caught only by content.
    copy = make_phantom(str(tmp_path / "copy"), 4, shape=SHAPE, seed=0, workers=1, progress=False)
    renamed = _renamed(copy, str(tmp_path / "copy" / "renamed.csv"), "other")
    assert check_disjoint(renamed, fine)["shared_files"] == 0
    with pytest.raises(DataError, match="identical image content"):
        check_disjoint(renamed, fine, content=True)


def test_probe_cases_are_held_out_val_first():
    splits = ["train"] * 5 + ["val", "test", "val", "test", "train", "test"]
    ids = [f"c{i}" for i in range(len(splits))]
    assert choose_probe_cases(ids, splits, num=3) == [5, 7, 6]
    assert choose_probe_cases(ids, splits, num=None) == [5, 7, 6, 8, 10]
    with pytest.raises(DataError, match=r"needs 32 held-out cases, but the fine-tuning cohort has 2 val \+ 3 test = 5"):
        choose_probe_cases(ids, splits)
    with pytest.raises(ConfigError):
        choose_probe_cases(ids, splits, order=("train",))


def test_design_section_states_and_checks_the_design(cohorts):
    root, fine, pre = cohorts
    d = describe_cohort(fine)
    assert d["num_cases"] == {"train": 3, "val": 1, "test": 0}  # round(0.7 * 4), round(0.15 * 4), the rest
    held = d["case_ids"]["val"] + d["case_ids"]["test"]
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    assert count_params(model) == 3 * 4 + 4
    design = design_section(pretrain_cohort=pre, finetune_cohort=d, probe_case_ids=held, seeds=[0, 1, 2],
                            steps={"pretrain": 400, "finetune": 150}, models={"contrastive": model, "mae": 1234},
                            sigma={("contrastive", "classification"): {"pooled": np.float32(1.5)}})
    assert design["models"] == {"contrastive": {"params": 16}, "mae": {"params": 1234}}
    assert design["sigma"] == {"contrastive/classification": {"pooled": 1.5}}
    assert design["pretrain_cohort"]["case_ids"]["train"][0] == "pre-phantom0000"
    import json
    json.dumps(design)  # plain JSON
    with pytest.raises(DataError, match="training cases"):
        design_section(pretrain_cohort=pre, finetune_cohort=d, probe_case_ids=d["case_ids"]["train"][:1], seeds=[0],
                       steps={}, models={}, sigma={})
    with pytest.raises(DataError, match="in both"):
        design_section(pretrain_cohort=d, finetune_cohort=d, probe_case_ids=held, seeds=[0], steps={}, models={},
                       sigma={})
