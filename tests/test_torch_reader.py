"""The safe checkpoint reader: real torch files load, code-carrying pickles load nothing and run nothing."""

import collections
import json
import pickle
import struct
import zipfile
import zlib

import numpy as np
import pytest

from converters.torch_reader import (
    MAX_PICKLE_BYTES,
    Namespace,
    extract_state_dict,
    load_state_dict,
    memory_bound,
    read_torch,
)
from torch_zip import S, T, deflate_bomb, raw_zip, state_dict, torch_pickle, write_torch_zip
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


def test_sets_in_protocol_2_checkpoints(tmp_path):
    # torch.save pickles at protocol 2, where Python 3 names builtins '__builtin__'.
    write_torch_zip(tmp_path / "s.pth", {"model": state_dict(w=np.ones(2, np.float32)), "tags": {"a", "b"},
                                        "frozen": frozenset({1}), "window": slice(1, 9, 2)})
    obj = read_torch(tmp_path / "s.pth").obj
    assert obj["tags"] == {"a", "b"} and obj["frozen"] == frozenset({1}) and obj["window"] == slice(1, 9, 2)
    assert b"c__builtin__\nset" in zipfile.ZipFile(tmp_path / "s.pth").read("archive/data.pkl")


def test_state_dict_container_unwrap():
    from converters.torch_reader import Checkpoint

    inner = {"a.weight": np.zeros((2, 2), np.float32)}
    sd, extras = extract_state_dict(Checkpoint("x", {"state_dict": inner, "epoch": 3}))
    assert list(sd) == ["a.weight"] and extras["epoch"] == 3
    with pytest.raises(CheckpointError, match="no state_dict"):
        extract_state_dict(Checkpoint("x", {"foo": 1}))


# ---- crafted files: every one ends in CheckpointError naming the file (and the tensor, where known) ----------



def _view_file(tmp_path, n, offset, size, stride, dtype=np.float32, name="v.pth"):
    path = tmp_path / name
    write_torch_zip(path, {"model": {"w": T(S(np.arange(n, dtype=dtype)), offset, size, stride)}})
    return path


@pytest.mark.parametrize("offset,size,stride,why", [
    (0, (8,), (-1,), "non-negative"),  # read memory before the buffer
    (7, (8,), (-(2**40),), "non-negative"),  # a wild address far before it
    (0, (8,), (1,), "runs past"),
    (4, (2, 2), (2, 1), "runs past"),
    (9, (0,), (1,), "starts past"),
    (0, (2**62,), (1,), "non-negative integers < 2"),
    (0, (2, 2), (1,), "equal length"),
    (0, (2.0,), (1,), "non-negative integers"),
    (0, (True,), (1,), "non-negative integers"),
    ("0", (1,), (1,), "non-negative integers"),
    (0, [1], [1], "tuples"),
    (0, (1,) * 33, (1,) * 33, "length <= 32"),
    (0, (0, 2**61), (1, 1), "empty shape numpy cannot represent"),
])
def test_view_must_stay_inside_its_storage(tmp_path, offset, size, stride, why):
    path = _view_file(tmp_path, 4, offset, size, stride)
    with pytest.raises(CheckpointError, match=why) as err:
        read_torch(path)
    assert str(err.value).startswith(f"{path}: tensor 'model/w':")


def test_zero_strides_of_expanded_tensors_read_and_count(tmp_path):
    # torch.save writes expand()ed tensors with stride 0 over the small storage: legitimate, and copied.
    path = _view_file(tmp_path, 3, 0, (4, 3), (0, 1))
    np.testing.assert_array_equal(read_torch(path).obj["model"]["w"], np.broadcast_to(np.arange(3.0), (4, 3)))
    # A 4-byte storage viewed as 65536 x 65536 (16 GiB): refused before anything is allocated.
    path = _view_file(tmp_path, 1, 0, (65536, 65536), (0, 0), name="huge.pth")
    with pytest.raises(CheckpointError, match=r"tensor 'model/w'.*memory bound") as err:
        read_torch(path)
    assert str(memory_bound(path.stat().st_size)) in str(err.value)


def test_views_copy_only_when_strided_and_are_read_only(tmp_path):
    base = S(np.arange(12, dtype=np.float32))
    sd = {"t": T(base, 0, (4, 3), (1, 4)), "c": T(base, 2, (2, 5), (5, 1)), "s": T(base, 11, (), ())}
    path = tmp_path / "views.pth"
    write_torch_zip(path, sd)
    got = read_torch(path).obj
    np.testing.assert_array_equal(got["t"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(got["c"], np.arange(2, 12, dtype=np.float32).reshape(2, 5))
    assert got["s"].shape == () and got["s"] == 11
    assert got["t"].flags.c_contiguous and not got["c"].flags.owndata  # contiguous views share the storage
    assert not any(a.flags.writeable for a in got.values())


def test_big_endian_checkpoint(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_torch_zip(tmp_path / "be.pth", state_dict(w=w, n=np.array(7, np.int64)), byteorder="big")
    sd, _ = load_state_dict(tmp_path / "be.pth")
    np.testing.assert_array_equal(sd["w"], w)
    assert sd["w"].dtype == np.float32 and sd["w"].dtype.isnative and int(sd["n"]) == 7


def test_deflated_zip_bombs_are_refused_without_inflating(tmp_path):
    bomb = deflate_bomb(1)  # 1 GiB of zeros in about 1 MiB
    # 1. A tensor's data member deflated: torch never compresses tensor data, so it is refused unread.
    payload, _ = torch_pickle({"w": T(S(np.zeros(1, np.float32)), 0, (1 << 28,), (1,))})
    path = tmp_path / "bomb_data.pth"
    raw_zip(path, [("a/data.pkl", payload, 0, len(payload), zlib.crc32(payload)),
                   ("a/data/0", bomb, 8, 1 << 30, 0)])
    with pytest.raises(CheckpointError, match=r"bomb_data.pth: tensor 'w': .*compressed"):
        read_torch(path)
    # 2. The pickle itself deflated and declaring 1 GiB: refused by its declared size.
    path = tmp_path / "bomb_pkl.pth"
    raw_zip(path, [("a/data.pkl", bomb, 8, 1 << 30, 0)])
    with pytest.raises(CheckpointError, match=r"bomb_pkl.pth: 'a/data.pkl' declares 1073741824 bytes"):
        read_torch(path)
    # 3. The pickle declaring a small size but inflating to 1 GiB: inflated only up to what it declares.
    path = tmp_path / "bomb_lie.pth"
    raw_zip(path, [("a/data.pkl", bomb, 8, 1000, 0)])
    with pytest.raises(CheckpointError, match="bomb_lie.pth"):
        read_torch(path)
    # 4. Within the pickle limit: a compressed data.pkl is inflated (to its declared size) and parsed.
    path = tmp_path / "zeros_pkl.pth"
    zeros = bytes(MAX_PICKLE_BYTES)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw_zip(path, [("a/data.pkl", c.compress(zeros) + c.flush(), 8, len(zeros), zlib.crc32(zeros))])
    with pytest.raises(CheckpointError, match="zeros_pkl.pth"):
        read_torch(path)


def _hand_pickle(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


def _text(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _fixture_weights(fixtures_dir):
    sd, _ = load_state_dict(fixtures_dir / "provicnet_fusion.pth")
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in sd.items()}


@pytest.mark.parametrize("target", [
    "torch\nFloatStorage\n", "torch._utils\n_rebuild_tensor_v2\n", "torch._utils\n_rebuild_parameter\n",
    "argparse\nNamespace\n", "collections\nOrderedDict\n", "builtins\nset\n",
])
def test_build_on_a_stand_in_is_refused_and_poisons_nothing(tmp_path, fixtures_dir, target):
    before = _fixture_weights(fixtures_dir)
    # The attack that used to work: rebuild torch.FloatStorage as IntStorage, so that every later read in the
    # process returned float weights as int32 bit patterns.
    state = b"}" + _text("name") + _text("IntStorage") + b"s" + _text("dtype") + _text("int32") + b"s"
    path = tmp_path / "poison.pth"
    _torch_like_zip(path, _hand_pickle(b"c" + target.encode(), state, b"b"))
    with pytest.raises(CheckpointError, match="poison.pth: pickle BUILD on .* is not allowed"):
        read_torch(path)
    # With slot state too: (None, {...}) is how pickle sets attributes that bypass __dict__.
    _torch_like_zip(path, _hand_pickle(b"c" + target.encode(), b"N", state, b"\x86", b"b"))
    with pytest.raises(CheckpointError, match="poison.pth"):
        read_torch(path)
    assert _fixture_weights(fixtures_dir) == before


_T_FLOAT = b"ctorch\nFloatStorage\n"
_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"


@pytest.mark.parametrize("name,payload,why", [
    ("empty_stack", _hand_pickle(), "underflow"),  # IndexError in pickle.Unpickler
    ("pop_empty", _hand_pickle(b"0"), "MARK missing"),
    ("missing_memo", _hand_pickle(b"h\x05"), "memo entry 5"),  # KeyError
    ("append_to_dict", _hand_pickle(b"}", b"N", b"a"), "cannot add items to a dict"),  # AttributeError
    ("set_on_list", _hand_pickle(b"]", b"N", b"N", b"s"), "cannot set items on a list"),
    ("memo_bomb", _hand_pickle(b"N", b"r\xff\xff\xff\x7f", b"0", b"}"), "no state_dict"),  # 16 GiB memo before
    ("deep_tuple_key", _hand_pickle(b"}", b")" + b"\x85" * 100_000, b"N", b"s"), "nested more than 64"),  # segfault
    ("deep_list", _hand_pickle(b"]" + b"\x85" * 70), "nested more than 64"),
    ("bad_utf8", _hand_pickle(b"X\x01\x00\x00\x00\xff"), "UnicodeDecodeError"),
    ("truncated_arg", b"\x80\x02X\xff\xff\xff\x7fabc", "unreadable"),
    ("no_stop", b"\x80\x02}", "unreadable"),
    ("unknown_opcode", b"\x80\x02\xff.", "unreadable"),
    ("int_key_collisions", _hand_pickle(b"}", b"(", *[b"\x8a\x09" + (i << 64).to_bytes(9, "little") + b"N"
                                                      for i in range(1, 4)], b"u"), "key or set element of type int"),
    ("list_key", _hand_pickle(b"}", b"]", b"N", b"s"), "type list is not supported"),
    ("float_key", _hand_pickle(b"}", b"G" + struct.pack(">d", 1.5), b"N", b"s"), "type float"),
    ("inst_opcode", b"\x80\x02(ibuiltins\nlist\n.", "opcode INST"),
    ("ext_opcode", b"\x80\x02\x82\x01.", "opcode EXT1"),
    ("reduce_storage_type", _hand_pickle(_T_FLOAT, b")", b"R"), "calling"),
    ("ordered_dict_args", _hand_pickle(b"ccollections\nOrderedDict\n", b"]", b"\x85", b"R"), "arguments"),
    ("set_of_tuples_of_tuples", _hand_pickle(b"cbuiltins\nset\n", b"]", b")\x85", b"a", b"\x85", b"R"), "tuple"),
    ("namespace_args", _hand_pickle(b"cargparse\nNamespace\n", b"K\x01\x85", b"\x81"), "creating a Namespace"),
    ("namespace_bad_state", _hand_pickle(b"cargparse\nNamespace\n", b")\x81", b"]", b"b"), "not a plain dict"),
    ("bad_persistent_id", _hand_pickle(_text("storage"), b"Q"), "persistent id"),
    ("storage_of_wrong_type", _hand_pickle(b"(", _text("storage"), b"N", _text("0"), _text("cpu"), b"K\x01t", b"Q"),
     "unknown type"),
    ("storage_key_path", _hand_pickle(b"(", _text("storage"), _T_FLOAT, _text("../0"), _text("cpu"), b"K\x01t", b"Q"),
     "alphanumeric"),
    ("tensor_of_none", _hand_pickle(b"}", _text("w"), _REBUILD, b"(NK\x00K\x01\x85K\x01\x85\x89t", b"R", b"s"),
     "not a storage"),
])
def test_malformed_pickles_end_in_checkpoint_error(tmp_path, name, payload, why):
    path = tmp_path / f"{name}.pth"
    _torch_like_zip(path, payload)
    with pytest.raises(CheckpointError, match=why) as err:
        load_state_dict(path)
    assert str(err.value).startswith(str(path))


def test_storage_records_must_match_their_declaration(tmp_path):
    w = np.arange(6, dtype=np.float32)
    cases = {
        "flipped_type": {"w": T(S(w, stype="HalfStorage"), 0, (6,), (1,))},  # same numel, half the bytes
        "short": {"w": T(S(w, numel=7), 0, (6,), (1,))},
        "long": {"w": T(S(w, numel=5), 0, (5,), (1,))},
        "huge_numel": {"w": T(S(w, numel=2**70), 0, (6,), (1,))},
    }
    for name, obj in cases.items():
        write_torch_zip(tmp_path / f"{name}.pth", obj)
        with pytest.raises(CheckpointError, match=rf"{name}.pth: tensor 'w': .*(needs|declares)"):
            read_torch(tmp_path / f"{name}.pth")


def test_archive_structure_is_checked(tmp_path, fixtures_dir):
    good = state_dict(w=np.ones(3, np.float32))
    # Names are matched exactly: a look-alike pickle name is not the checkpoint's record.
    path = tmp_path / "lookalike.pth"
    pkl, _ = torch_pickle(good)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/evildata.pkl", pkl)
    with pytest.raises(CheckpointError, match="expected one '<name>/data.pkl' record, found 0"):
        read_torch(path)
    # Two records, duplicated names, a bad byteorder, a missing tensor record.
    write_torch_zip(path, good, extra={"other/data.pkl": pkl})
    with pytest.raises(CheckpointError, match="found 2"):
        read_torch(path)
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_torch_zip(path, good, extra={"archive/version": b"3\n"})
    with pytest.raises(CheckpointError, match="twice"):
        read_torch(path)
    write_torch_zip(path, good, byteorder="middle")
    with pytest.raises(CheckpointError, match="byteorder"):
        read_torch(path)
    write_torch_zip(path, pickle_bytes=pkl, storages={})
    with pytest.raises(CheckpointError, match=r"tensor 'w': missing tensor data 'archive/data/0'"):
        read_torch(path)
    # Tensor data that overlaps other members (two directory entries on one payload) cannot add up past the file.
    data = np.ones(1000, np.float32).tobytes()
    obj = {"a": T(S(np.ones(1000, np.float32)), 0, (1000,), (1,)), "b": T(S(np.ones(1000, np.float32)), 0, (1000,),
                                                                           (1,))}
    pkl, _ = torch_pickle(obj)
    raw_zip(path, [("a/data.pkl", pkl, 0, len(pkl), zlib.crc32(pkl)), ("a/data/0", data, 0, len(data),
                                                                       zlib.crc32(data))])
    blob = bytearray(path.read_bytes())  # add a second directory entry, for data/1, pointing at data/0's payload
    cd = blob.index(b"PK\x01\x02", blob.index(b"a/data/0"))
    entry = blob[cd + 0: blob.index(b"PK\x05\x06")][-(46 + len("a/data/0")):]
    entry = entry[:-1] + b"1"
    eocd = blob.index(b"PK\x05\x06")
    tail = blob[eocd:]
    n, size_cd = struct.unpack("<H", tail[10:12])[0], struct.unpack("<L", tail[12:16])[0]
    tail[8:12] = struct.pack("<HH", n + 1, n + 1)
    tail[12:16] = struct.pack("<L", size_cd + len(entry))
    path.write_bytes(bytes(blob[:eocd] + entry + tail))
    with pytest.raises(CheckpointError, match="overlapping|differ"):
        read_torch(path)


def test_safetensors_files_get_the_same_treatment(tmp_path):
    def write(name, header, data=b""):
        h = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(h)) + h + data)
        return tmp_path / name

    ok = write("ok.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    assert load_state_dict(ok)[0]["w"].shape == (2,)
    cases = {
        "outside.safetensors": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, bytes(8)),
        "overlap.safetensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
        "mismatch.safetensors": ({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "shape.safetensors": ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8)),
        "dtype.safetensors": ({"w": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "negative.safetensors": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
    }
    for name, (header, data) in cases.items():
        with pytest.raises(CheckpointError, match=name):
            load_state_dict(write(name, header, data))
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    (tmp_path / "garbage.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    for name in ("long", "garbage", "tiny"):
        with pytest.raises(CheckpointError, match=f"{name}.safetensors"):
            load_state_dict(tmp_path / f"{name}.safetensors")


def test_torch_written_views_read_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = collections.OrderedDict(
        expanded=torch.arange(3.0).expand(4, 3), transposed=base.t(), sliced=base[:, 1:3], stepped=base[::2, ::3],
        unsqueezed=torch.arange(4.0).unsqueeze(0), scalar=torch.tensor(3.5), empty=torch.zeros(0, 5),
        half=torch.arange(6, dtype=torch.float16), longs=torch.arange(5), bools=torch.tensor([True, False]),
        param=torch.nn.Parameter(torch.ones(2, 2)), tied=base,
    )
    torch.save(sd, tmp_path / "t.pth")
    got = read_torch(tmp_path / "t.pth").obj
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v.detach().numpy(), err_msg=k)
        assert got[k].dtype == v.detach().numpy().dtype, k


@pytest.mark.parametrize("protocol", range(6))
def test_safe_pickle_reads_plain_data_as_pickle_does(protocol):
    # The stdlib unpickler is the independent expectation for plain data, at every protocol.
    from converters.safe_pickle import Budget, PickleRefused, loads

    obj = {"list": [1, -5, 2.5, "x\u00e9", None, True, False, 2**70, -(2**40)], "tuple": (1, (2, (3,)), ()),
           "set": {1, 2, "a"}, "frozen": frozenset({"b", (1, 2)}), "od": collections.OrderedDict(a=1, b=[2]),
           7: {"nested": {"deeper": [[]]}}, ("k", 1): "tuple key", "empty": {}}
    if protocol >= 3:
        obj["bytes"] = b"\x00\xff"
    shared = [1, 2]
    obj["shared"] = (shared, shared)
    allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
               ("builtins", "frozenset"): frozenset, ("__builtin__", "set"): set,
               ("__builtin__", "frozenset"): frozenset}

    def find_class(module, name):
        if (module, name) not in allowed:
            raise PickleRefused(f"{module}.{name}")
        return allowed[(module, name)]

    data = pickle.dumps(obj, protocol=protocol)
    got, ops = loads(data, budget=Budget(1 << 20), find_class=find_class, persistent_load=None)
    assert got == pickle.loads(data) and ops > 10
    assert got["shared"][0] is got["shared"][1]  # the memo is honoured
    with pytest.raises(PickleRefused, match="memory bound of 1000 bytes"):
        loads(data, budget=Budget(1000), find_class=find_class, persistent_load=None)
