"""Resume records: a changed config or cohort is named, refused, or mapped to the stages it invalidates."""

import csv
import json
import os
import shutil

import ml_collections as mc
import pytest

from vfm_align.errors import ConfigError
from vfm_align.study.design import RECORD, check_resume, config_hash, flatten_config


def _cfg(**over):
    cfg = mc.ConfigDict(dict(
        seed=0, workers=2, cohort=dict(manifest="", cases=96, shape=(16, 64, 64)),
        tasks=["classification", "segmentation"],
        backbones=[mc.ConfigDict(dict(name="reconstruction", family="mae_vit", weights="", pretrain=dict(steps=400))),
                   mc.ConfigDict(dict(name="contrastive", family="provicnet", weights="", pretrain=dict(steps=400)))],
        finetune=dict(steps=150, batch_size=4), num_bootstrap=2000, gain_floor=0.05))
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = v
    return cfg


RECIPE = {"phantom": {"cases": 96, "seed": 0}}


def test_flatten_names_backbones_and_drops_keys_that_cannot_change_results():
    flat = flatten_config(_cfg())
    assert flat["backbones[contrastive].pretrain.steps"] == 400 and flat["finetune.steps"] == 150
    assert flat["backbones.order"] == ["reconstruction", "contrastive"] and flat["cohort.shape"] == [16, 64, 64]
    assert "workers" not in flat
    assert config_hash(_cfg(workers=1)) == config_hash(_cfg())
    assert config_hash(_cfg(**{"finetune.steps": 100})) != config_hash(_cfg())


def test_changed_steps_are_refused_by_name_then_mapped_to_stages(tmp_path):
    out = str(tmp_path)
    first = check_resume(out, _cfg(), {"finetune": RECIPE})
    assert first.fresh and os.path.isfile(os.path.join(out, RECORD))
    assert check_resume(out, _cfg(workers=1), {"finetune": RECIPE}).unchanged
    with pytest.raises(ConfigError, match=r"finetune\.steps: 150 -> 100"):
        check_resume(out, _cfg(**{"finetune.steps": 100}), {"finetune": RECIPE})
    plan = check_resume(out, _cfg(**{"finetune.steps": 100}), {"finetune": RECIPE}, overwrite=True)
    assert plan.finetune == ["contrastive", "reconstruction"] and plan.pretrain == [] and plan.summary
    # Not committed yet: the folder still records the old config.
    with pytest.raises(ConfigError):
        check_resume(out, _cfg(**{"finetune.steps": 100}), {"finetune": RECIPE})
    plan.commit()
    assert check_resume(out, _cfg(**{"finetune.steps": 100}), {"finetune": RECIPE}).unchanged


@pytest.mark.parametrize("key, value, pretrain, finetune", [
    ("backbones.1.pretrain.steps", 10, ["contrastive"], ["contrastive"]),
    ("backbones.0.family", "profound_mae", [], ["reconstruction"]),
    ("num_bootstrap", 500, [], []),
    ("seed", 1, ["contrastive", "reconstruction"], ["contrastive", "reconstruction"]),
    ("tasks", ["classification"], [], ["contrastive", "reconstruction"]),
])
def test_each_key_invalidates_what_depends_on_it(tmp_path, key, value, pretrain, finetune):
    check_resume(str(tmp_path), _cfg(), {"finetune": RECIPE})
    plan = check_resume(str(tmp_path), _cfg(**{key: value}), {"finetune": RECIPE}, overwrite=True)
    assert (plan.pretrain, plan.finetune, plan.summary) == (pretrain, finetune, True)
    assert len(plan.changes) == 1 and plan.changes[0].startswith(key.replace(".1.", "[contrastive].")
                                                                 .replace(".0.", "[reconstruction]."))


def _manifest(root, n=4, big=False):
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n):
        row = {"case_id": f"c{i}", "split": "train" if i < 2 else "val", "cspca": i % 2}
        for name in ("t2w", "adc", "dwi"):
            rel = f"c{i}_{name}.bin"
            with open(os.path.join(root, rel), "wb") as fh:
                fh.write(bytes([i]) * (300_000 if big else 100))
            row[name] = rel
        rows.append(row)
    path = os.path.join(root, "manifest.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_cohort_changes_are_named_and_a_moved_cohort_still_matches(tmp_path):
    out = str(tmp_path / "out")
    fine = _manifest(str(tmp_path / "fine"), big=True)
    pre = _manifest(str(tmp_path / "pre"))
    check_resume(out, _cfg(), {"finetune": fine, "pretrain": pre})
    shutil.move(str(tmp_path / "fine"), str(tmp_path / "moved"))
    fine = str(tmp_path / "moved" / "manifest.csv")
    assert check_resume(out, _cfg(), {"finetune": fine, "pretrain": pre}).unchanged
    with open(tmp_path / "moved" / "c1_adc.bin", "r+b") as fh:  # same size, last byte changed
        fh.seek(-1, 2)
        fh.write(b"\xff")
    with pytest.raises(ConfigError, match=r"cohort finetune: case\(s\) changed: c1 \(adc\)"):
        check_resume(out, _cfg(), {"finetune": fine, "pretrain": pre})
    plan = check_resume(out, _cfg(), {"finetune": fine, "pretrain": pre}, overwrite=True)
    assert plan.pretrain == [] and plan.finetune == ["contrastive", "reconstruction"]
    plan.commit()
    _manifest(str(tmp_path / "pre"), n=5)  # one more pretraining case: everything is stale
    plan = check_resume(out, _cfg(), {"finetune": fine, "pretrain": pre}, overwrite=True)
    assert plan.changes == ["cohort pretrain: case(s) added: c4"] and plan.pretrain == plan.finetune


def test_outputs_without_a_record_and_a_broken_record_are_refused(tmp_path):
    os.makedirs(tmp_path / "runs")
    with pytest.raises(ConfigError, match="no study_record.json"):
        check_resume(str(tmp_path), _cfg(), {})
    plan = check_resume(str(tmp_path), _cfg(), {}, overwrite=True)
    assert not plan.fresh and plan.finetune == ["contrastive", "reconstruction"]
    (tmp_path / RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable study record"):
        check_resume(str(tmp_path), _cfg(), {})
    (tmp_path / RECORD).write_text(json.dumps({"config": {}, "cohorts": {}}))
    with pytest.raises(ConfigError, match=r"finetune\.steps: \(new\) -> 150"):
        check_resume(str(tmp_path), _cfg(), {})


def test_full_hash_sees_a_change_in_the_middle_of_a_large_file(tmp_path):
    fine = _manifest(str(tmp_path / "fine"), big=True)
    check_resume(str(tmp_path / "a"), _cfg(), {"finetune": fine})
    check_resume(str(tmp_path / "b"), _cfg(), {"finetune": fine}, full_hash=True)
    with open(tmp_path / "fine" / "c0_t2w.bin", "r+b") as fh:
        fh.seek(150_000)
        fh.write(b"\x07")
    assert check_resume(str(tmp_path / "a"), _cfg(), {"finetune": fine}).unchanged  # edges only: documented limit
    with pytest.raises(ConfigError, match=r"c0 \(t2w\)"):
        check_resume(str(tmp_path / "b"), _cfg(), {"finetune": fine}, full_hash=True)
