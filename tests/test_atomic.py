"""Atomic writes: complete under the final name or not there at all, the old version kept on failure."""

import json
import os

import pytest

from vfm_align.atomic import atomic_dir, atomic_file, write_json


def test_file_appears_only_when_complete_and_failure_keeps_the_old_one(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            with open(tmp, "w") as fh:
                fh.write('{"v": 2')  # half written
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(path.parent) == ["out.json"]  # no temporary left behind


def test_suffix_is_kept_for_writers_that_infer_the_format(tmp_path):
    with atomic_file(tmp_path / "a.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").close()
    assert (tmp_path / "a.nii.gz").exists()


def test_dir_replaces_the_old_version_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (open(os.path.join(tmp, "w.txt"), "w")).write("one")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (open(os.path.join(tmp, "w.txt"), "w")).write("two")
            raise KeyboardInterrupt
    assert (out / "w.txt").read_text() == "one"
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "x.txt"), "w").close()
    assert sorted(os.listdir(out)) == ["x.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("concurrent_ok", [True, False])
def test_a_writer_that_finished_first_is_kept_only_when_allowed(tmp_path, monkeypatch, concurrent_ok):
    out = tmp_path / "case"

    def lose_the_race(src, dst):  # another worker renames its complete folder into place first
        os.makedirs(dst)
        open(os.path.join(dst, "theirs"), "w").close()
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr("vfm_align.atomic.os.replace", lose_the_race)
    if concurrent_ok:
        with atomic_dir(out, concurrent_ok=True) as tmp:
            open(os.path.join(tmp, "mine"), "w").close()
    else:
        with pytest.raises(OSError):
            with atomic_dir(out) as tmp:
                open(os.path.join(tmp, "mine"), "w").close()
    assert os.listdir(out) == ["theirs"]
    assert os.listdir(tmp_path) == ["case"]  # the temporary is gone either way
