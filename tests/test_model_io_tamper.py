"""vfm_align.load on a tampered model directory: one CheckpointError naming the directory, never a half-built model."""

import json
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import vfm_align
from vfm_align.errors import CheckpointError
from vfm_align.model_io import SIDECAR, save_model
from vfm_align.models.convnext3d import ConvNeXt3DConfig
from vfm_align.models.registry import build_model

SMALL = ConvNeXt3DConfig(in_chans=1, depths=(1, 1, 1, 1), dims=(4, 8, 8, 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_io")
    model = build_model("profound_conv", SMALL, rngs=nnx.Rngs(3))
    good = pathlib.Path(save_model(model, "profound_conv", SMALL, root / "good"))
    # The same weights with two arrays of other shapes, written by Orbax as a model directory's params/ would be.
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    pure["norm"]["scale"] = np.ones(16, np.float32)
    pure["stages"][3][0]["pwconv1"]["kernel"] = np.zeros((8, 64), np.float32)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(root / "misshaped", pure)
        ckptr.wait_until_finished()
    return {"root": root, "good": good, "misshaped": root / "misshaped", "model": model}


def _copy(saved, tmp_path, name="m"):
    out = tmp_path / name
    shutil.copytree(saved["good"], out)
    return out


def _edit_sidecar(path, edit):
    meta = json.loads((path / SIDECAR).read_text())
    edit(meta)
    (path / SIDECAR).write_text(json.dumps(meta))


def test_untampered_directory_restores_exactly(saved):
    loaded = vfm_align.load(saved["good"])
    want = nnx.to_flat_state(nnx.state(saved["model"], nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert len(want) > 0
    for path, var in want:
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(var.get_value()))


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


def _set_config(key, value):
    return lambda meta: meta["config"].__setitem__(key, value)


@pytest.mark.parametrize("edit,why", [
    (_set("arch", "no_such_arch"), "unknown architecture 'no_such_arch'"),
    (_set("arch", None), "'arch' must be a string"),
    (_set("config", [1, 2]), "'config' an object"),
    (_set("arch", "provicnet"), "does not describe a 'provicnet' model|do not fit the 'provicnet'"),
    (_set("arch", "profound_conv_cls"), "profound_conv_cls"),  # another arch, the same config fields
    (_set_config("dims", [4, 8, 8, 16]), r"array 'stages/3/.*' is \(.*8.*\) float32, the 'profound_conv' model needs"),
    (_set_config("depths", [1, 1, 1, 2]), "missing array 'stages/3/1/"),
    (_set_config("depths", [1, 1, 1, 0]), "unexpected array 'stages/3/0/"),
    (_set_config("no_such_field", 3), "unknown fields"),
    (_set_config("dims", "wide"), "does not describe"),
])
def test_edited_sidecar(saved, tmp_path, edit, why):
    path = _copy(saved, tmp_path)
    _edit_sidecar(path, edit)
    with pytest.raises(CheckpointError, match=why) as err:
        vfm_align.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text,why", [
    ("{not json", "corrupt sidecar"), ("[1, 2, 3]", "a JSON list, not an object"), ("[" * 100_000, "corrupt sidecar"),
])
def test_garbage_sidecar(saved, tmp_path, text, why):
    path = _copy(saved, tmp_path)
    (path / SIDECAR).write_text(text)
    with pytest.raises(CheckpointError, match=why):
        vfm_align.load(path)
    (path / SIDECAR).write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="corrupt sidecar"):
        vfm_align.load(path)
    (path / SIDECAR).unlink()
    with pytest.raises(CheckpointError, match="not a vfm-align model directory"):
        vfm_align.load(path)


def test_tampered_orbax_arrays(saved, tmp_path):
    # Arrays of other shapes under an intact sidecar: refused by name before anything is restored.
    path = _copy(saved, tmp_path, "swapped")
    shutil.rmtree(path / "params")
    shutil.copytree(saved["misshaped"], path / "params")
    with pytest.raises(CheckpointError, match=rf"{path}: the stored weights do not fit .*2 problem") as err:
        vfm_align.load(path)
    assert "array 'norm/scale' is (16,) float32, the 'profound_conv' model needs (8,) float32" in str(err.value)
    assert "array 'stages/3/0/pwconv1/kernel' is (8, 64) float32" in str(err.value)
    # One array struck from Orbax's index of the tree: named as missing.
    path = _copy(saved, tmp_path, "struck")
    index = json.loads((path / "params" / "_METADATA").read_text())
    struck = next(k for k in index["tree_metadata"] if "pwconv1" in k)
    del index["tree_metadata"][struck]
    (path / "params" / "_METADATA").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing array 'stages/\d/0/pwconv1/"):
        vfm_align.load(path)
    # No arrays at all, then array metadata that is garbage.
    path = _copy(saved, tmp_path, "noparams")
    shutil.rmtree(path / "params")
    with pytest.raises(CheckpointError, match=f"{path}: cannot read the weights' metadata"):
        vfm_align.load(path)
    path = _copy(saved, tmp_path, "badmeta")
    (path / "params" / "_METADATA").write_text("{garbage")
    with pytest.raises(CheckpointError, match=str(path)):
        vfm_align.load(path)
    # Metadata intact, array data gone: restoring fails, and says so.
    path = _copy(saved, tmp_path, "nodata")
    for sub in (path / "params").iterdir():
        if sub.is_dir() and sub.name != "_sharding" and sub.name != "array_metadatas":
            shutil.rmtree(sub)
    with pytest.raises(CheckpointError, match=str(path)):
        vfm_align.load(path)
