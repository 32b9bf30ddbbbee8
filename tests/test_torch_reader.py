"""The safe checkpoint reader: real torch files load, code-carrying pickles load nothing and run nothing."""

import pickle
import zipfile

import numpy as np
import pytest

from converters.torch_reader import Namespace, extract_state_dict, load_state_dict, read_torch
from vfm_align.errors import CheckpointError


def test_reads_provicnet_state_dict(fixtures_dir, golden):
    sd, extras = load_state_dict(fixtures_dir / "provicnet_t2.pth")
    assert extras == {}
    assert len(sd) == 64
    assert sd["backbone.pos_embed"].shape == (1, 1370, 384)
    assert sd["backbone.blocks.1.attn.qkv.weight"].shape == (1152, 384)
    assert sd["head.segmentation_conv.2.num_batches_tracked"].dtype == np.int64
    assert int(sd["head.segmentation_conv.2.num_batches_tracked"]) == 1234
    # The class row of the position table is added unchanged: an independent check of the bytes.
    np.testing.assert_array_equal(sd["backbone.pos_embed"][0, 0], golden("provicnet_t2")["pos_embed_interp"][0, 0])


def test_reads_profound_namespace_without_executing(fixtures_dir):
    sd, extras = load_state_dict(fixtures_dir / "profound_conv_cls.pth.tar")
    assert sd["encoder.downsample_layers.0.0.weight"].shape == (16, 3, 4, 4, 4)
    assert extras["epoch"] == 7
    assert extras["args"]["model"] == "profound_conv"
    assert extras["args"]["num_classes"] == 4
    assert tuple(extras["args"]["input_size"]) == (32, 32, 48)
    ckpt = read_torch(fixtures_dir / "profound_conv_cls.pth.tar")
    assert isinstance(ckpt.obj["args"], Namespace)


def _torch_like_zip(path, payload: bytes, name="archive"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/data.pkl", payload)
        z.writestr(f"{name}/byteorder", "little")
        z.writestr(f"{name}/version", "3\n")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _torch_like_zip(path, pickle.dumps({"model": {"w": _Evil(marker)}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        load_state_dict(path)
    assert not marker.exists()


def test_eval_global_refused(tmp_path):
    # A hand-written pickle calling builtins.eval on a string.
    payload = b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R."
    path = tmp_path / "evil2.pth"
    _torch_like_zip(path, payload)
    with pytest.raises(CheckpointError, match="builtins.eval"):
        read_torch(path)


def test_truncated_and_garbage_files(tmp_path, fixtures_dir):
    data = (fixtures_dir / "provicnet_fusion.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_state_dict(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_state_dict(junk)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy"):
        load_state_dict(legacy)
    with pytest.raises(CheckpointError, match="no such"):
        load_state_dict(tmp_path / "missing.pth")


def test_safetensors_and_containers(tmp_path):
    from safetensors.numpy import save_file

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_file({"module.layer.weight": w, "module.layer.bias": np.ones(3, np.float32)}, str(tmp_path / "m.safetensors"))
    sd, extras = load_state_dict(tmp_path / "m.safetensors")
    assert set(sd) == {"layer.weight", "layer.bias"}
    np.testing.assert_array_equal(sd["layer.weight"], w)
    assert extras["stripped_prefix"] == "module."


def test_state_dict_container_unwrap():
    from converters.torch_reader import Checkpoint

    inner = {"a.weight": np.zeros((2, 2), np.float32)}
    sd, extras = extract_state_dict(Checkpoint("x", {"state_dict": inner, "epoch": 3}))
    assert list(sd) == ["a.weight"] and extras["epoch"] == 3
    with pytest.raises(CheckpointError, match="no state_dict"):
        extract_state_dict(Checkpoint("x", {"foo": 1}))
