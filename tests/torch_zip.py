"""Write torch.save-format zip checkpoints without torch, for tests: the same opcodes, globals and layout.

``write_torch_zip(path, obj)`` pickles ``obj`` (protocol 2, as torch.save does) with every :class:`T` becoming a
``torch._utils._rebuild_tensor_v2`` call on a persistent storage record, and every storage's bytes written,
uncompressed, to ``<name>/data/<key>``. A :class:`T` may declare any offset, size and stride, so crafted views
are as easy to write as honest ones. ``G(module, name)`` writes a bare global reference.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


@dataclass(frozen=True, eq=False)
class G:
    """A global by name, pickled as GLOBAL 'module name'."""

    module: str
    name: str

    def __call__(self, *args):  # pickle insists that a REDUCE target be callable; never called
        raise TypeError("a stand-in for a global")


@dataclass(eq=False)
class S:
    """A storage: flat data, written to data/<key>. ``stype`` overrides the storage class named in the pickle."""

    data: np.ndarray
    stype: str | None = None
    numel: int | None = None  # overrides the element count the pickle declares


@dataclass(eq=False)
class T:
    """A tensor view of a storage, with torch's (offset, size, stride); size/stride default to the whole storage."""

    storage: S
    offset: object = 0
    size: object = None
    stride: object = None


def tensor(a) -> T:
    """An honest contiguous tensor holding ``a``."""
    a = np.array(a, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    strides = tuple(s // a.itemsize for s in a.strides)
    return T(S(a.reshape(-1)), 0, tuple(a.shape), strides)


@dataclass(frozen=True)
class Call:
    """REDUCE: call ``func`` (a G) with ``args``; lets tests write any call the allow-list might see."""

    func: G
    args: tuple


class _Writer(pickle._Pickler):  # the pure-Python pickler lets a test choose the globals it names
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, fh, keys):
        super().__init__(fh, protocol=2)
        self.keys = keys

    def save_g(self, obj: G) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[G] = save_g

    def persistent_id(self, obj):
        if isinstance(obj, S):
            key = self.keys.setdefault(id(obj), (str(len(self.keys)), obj))[0]
            numel = obj.data.size if obj.numel is None else obj.numel
            return ("storage", G("torch", obj.stype or _STORAGE_NAMES[obj.data.dtype]), key, "cpu", numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, T):
            size = tuple(obj.storage.data.shape) if obj.size is None else obj.size
            stride = (1,) * len(size) if obj.stride is None else obj.stride
            return G("torch._utils", "_rebuild_tensor_v2"), (obj.storage, obj.offset, size, stride, False,
                                                               collections.OrderedDict())
        if isinstance(obj, Call):
            return obj.func, obj.args
        return NotImplemented


def torch_pickle(obj) -> tuple[bytes, dict[str, S]]:
    """The data.pkl bytes of ``obj`` and the storages it refers to, by key."""
    keys: dict = {}
    buf = io.BytesIO()
    _Writer(buf, keys).dump(obj)
    return buf.getvalue(), {key: s for key, s in keys.values()}


def write_torch_zip(path, obj=None, *, pickle_bytes: bytes | None = None, storages: dict | None = None,
                    name: str = "archive", byteorder: str = "little", compress: bool = False,
                    extra: dict[str, bytes] | None = None) -> None:
    """Write a torch.save-style zip. ``pickle_bytes``/``storages`` bypass the pickler for hand-made payloads."""
    if pickle_bytes is None:
        pickle_bytes, storages = torch_pickle(obj)
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pickle_bytes)
        z.writestr(f"{name}/byteorder", byteorder)
        for key, s in (storages or {}).items():
            data = s.data if byteorder == "little" else s.data.astype(s.data.dtype.newbyteorder(">"))
            z.writestr(f"{name}/data/{key}", data.tobytes(), compress_type=mode)
        z.writestr(f"{name}/version", "3\n")
        for member, data in (extra or {}).items():
            z.writestr(member, data)


def state_dict(**tensors) -> collections.OrderedDict:
    """An OrderedDict of honest tensors, as module.state_dict() returns (with torch's _metadata attribute)."""
    sd = collections.OrderedDict((k, tensor(v) if isinstance(v, np.ndarray) else v) for k, v in tensors.items())
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    return sd


def raw_zip(path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip written field by field: (name, payload, method, declared uncompressed size, crc32) per member.

    zipfile cannot write pre-compressed payloads or lie about sizes; crafted archives need both.
    """
    import struct

    out, central = bytearray(), bytearray()
    for name, payload, method, size, crc in members:
        nm = name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size, len(nm), 0)
        out += nm + payload
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload), size,
                               len(nm), 0, 0, 0, 0, 0, offset)
        central += nm
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    with open(path, "wb") as fh:
        fh.write(bytes(out + central + eocd))


def deflate_bomb(gib: int = 1) -> bytes:
    """A raw deflate stream of ``gib`` GiB of zeros in about 1 MiB: one fully flushed 1 MiB segment, repeated."""
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return segment * (1024 * gib) + b"\x03\x00"  # an empty final block ends the stream
