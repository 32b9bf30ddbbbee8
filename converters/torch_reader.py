"""Read PyTorch checkpoints as numpy arrays without torch and without running pickled code.

torch.save writes a zip archive: ``<name>/data.pkl`` holds a pickle of the object tree, and each tensor's bytes
live, uncompressed, in ``<name>/data/<key>``. The pickle names a handful of globals
(``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``, ...). :mod:`converters.safe_pickle` maps an
allow-list of names onto inert local stand-ins, refuses everything else (naming the offending global) and builds
nothing but plain data. ``.safetensors`` files carry no code at all and are read with the safetensors library.

What any file, however crafted, can do to a read:

- **No code runs**: only the globals in ``_ALLOWED`` resolve, and only to local functions and plain containers.
- **Bounded memory**: reading a file of F bytes allocates at most ``MEMORY_MULTIPLE * F + MEMORY_ALLOWANCE`` bytes
  (2 F + 64 MiB) for what the file declares: zip directory, pickle, object tree, tensor bytes and the copies made
  for strided views are all charged to one budget before they are allocated. Tensor data members must be stored
  (not compressed), of exactly the size their storage declares, and together no larger than the file; the pickle
  is inflated at most to its declared size, itself at most ``MAX_PICKLE_BYTES``. Every tensor view must read only
  elements inside its storage (strides non-negative; zero strides, as ``expand`` writes them, are copied and
  charged). A ``.safetensors`` file's header is at most ``MAX_SAFETENSORS_HEADER`` and must fit the file; the
  library then checks dtypes, shapes and offsets and copies each tensor once (F bytes in all).
- **One error type**: anything a malformed file triggers surfaces as :class:`CheckpointError` naming the file and,
  where known, the tensor's key.
- **No state carried over**: every read builds its own storages, memo and objects. The allow-listed stand-ins are
  never modified: the pickle machine calls them but applies BUILD (and sets items) only to containers and
  Namespace objects the file itself created, so no file changes how a later file is read.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.safe_pickle import MAX_DEPTH, Budget, OverBudget, PickleRefused, loads
from vfm_align.errors import CheckpointError

try:  # bfloat16 checkpoints need a numpy dtype; ml_dtypes ships with jax.
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

MEMORY_MULTIPLE = 2  # a read of an F-byte file allocates at most MEMORY_MULTIPLE * F + MEMORY_ALLOWANCE
MEMORY_ALLOWANCE = 64 << 20
MAX_PICKLE_BYTES = 16 << 20  # data.pkl, inflated; a state_dict needs about 150 bytes per tensor
MAX_MEMBERS = 1 << 16  # zip members (one per storage, plus five records)
MAX_NDIM = 32
MAX_SAFETENSORS_HEADER = 16 << 20
_ZIPINFO_BYTES_PER_DIRECTORY_BYTE = 16  # Python's ZipInfo objects take ~11x the central directory they parse
_STORAGE_KEY = re.compile(r"[0-9A-Za-z_]{1,64}")
_BYTEORDERS = {"little": "<", "big": ">"}

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": _BF16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def memory_bound(file_bytes: int) -> int:
    """The most bytes reading a file of ``file_bytes`` bytes may allocate for what the file declares."""
    return MEMORY_MULTIPLE * int(file_bytes) + MEMORY_ALLOWANCE


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and kin: immutable, and the pickle machine never BUILDs it."""

    name: str

    @property
    def __name__(self) -> str:  # for messages
        return f"torch.{self.name}"

    @property
    def dtype(self) -> np.dtype:
        dt = _STORAGE_DTYPES[self.name]
        if dt is None:
            raise CheckpointError(f"storage type torch.{self.name} needs ml_dtypes, which is not installed")
        return np.dtype(dt)


class Namespace:
    """Inert stand-in for a pickled ``argparse.Namespace``: attributes only, no behaviour."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(type(k) is str for k in state):
            raise CheckpointError("argparse.Namespace state in checkpoint is not a plain dict of names")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Bad:
    """A storage or tensor the file got wrong; reported with its key once the object tree is known."""

    problem: str


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, (np.ndarray, _Bad)):
        raise PickleRefused(f"torch.nn.Parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _short(x: Any) -> str:
    """A file's value for a message: huge integers (whose repr Python refuses) and long tuples abbreviated."""
    if type(x) is int and x.bit_length() > 64:
        return f"<{x.bit_length()}-bit integer>"
    if type(x) is tuple:
        inner = ", ".join(_short(v) for v in x[:8]) + (", ..." if len(x) > 8 else "," if len(x) == 1 else "")
        return f"({inner})"
    return repr(x)[:80]


def _is_index(x: Any) -> bool:
    return type(x) is int and 0 <= x < (1 << 62)


def _view(storage: np.ndarray, offset: Any, size: Any, stride: Any, budget: Budget) -> np.ndarray:
    """torch's (offset, size, stride) view of a flat storage as a C-ordered, read-only array.

    Every element the view reads must lie inside the storage. A contiguous view shares the storage's memory; any
    other (transposed, expanded with zero strides) is copied, and the copy is charged to the read's budget first.
    """
    where = f"(offset {_short(offset)}, size {_short(size)}, stride {_short(stride)})"
    if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) or len(size) > MAX_NDIM:
        raise CheckpointError(f"tensor view {where}: size and stride must be tuples of equal length <= {MAX_NDIM}")
    if not (_is_index(offset) and all(map(_is_index, size)) and all(map(_is_index, stride))):
        raise CheckpointError(f"tensor view {where}: offset, sizes and strides must be non-negative integers < 2**62")
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        if offset > storage.size:
            raise CheckpointError(f"tensor view {where} starts past its storage of {storage.size} elements")
        try:
            return np.empty(size, storage.dtype)
        except ValueError:  # numpy refuses shapes whose non-zero dims alone overflow
            raise CheckpointError(f"tensor view {where}: an empty shape numpy cannot represent") from None
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"tensor view {where} runs past its storage of {storage.size} elements")
    # Dims of size 1 never move the address; their stride is arbitrary in torch and ignored here.
    stride = tuple(st if s > 1 else 0 for s, st in zip(size, stride))
    contiguous, expect = True, 1
    for s, st in zip(reversed(size), reversed(stride)):
        if s > 1 and st != expect:
            contiguous = False
        expect *= s
    itemsize = storage.dtype.itemsize
    if not contiguous:
        budget.charge(numel * itemsize, f"the copy of strided tensor view {where}")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride), writeable=False
    )
    if contiguous:
        return view
    out = np.ascontiguousarray(view)
    out.flags.writeable = False
    return out


class _TorchRead:
    """One read of one torch zip archive: its own storages, budget and record of bad tensors."""

    def __init__(self, path: str, archive: zipfile.ZipFile, prefix: str, byteorder: str, file_bytes: int,
                 budget: Budget):
        self.path = path
        self.archive = archive
        self.prefix = prefix
        self.byteorder = byteorder
        self.file_bytes = file_bytes
        self.budget = budget
        self.storages: dict[str, tuple[_StorageType, int, Any]] = {}
        self.data_bytes = 0
        self.bad: list[_Bad] = []
        self.rebuild = self.rebuild_tensor_v2  # one bound method, so that REDUCE can recognise it by identity

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _ALLOWED[(module, name)]
            return self.rebuild if found is _rebuild_tensor_v2 else found
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{self.path}: refusing to load global '{module}.{name}'; only tensors, plain containers "
                "and argparse.Namespace are allowed (nothing in the file was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise PickleRefused(f"unsupported persistent id of type {type(pid).__name__}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise PickleRefused(f"storage has unknown type {type(stype).__name__}")
        if type(key) is not str or not _STORAGE_KEY.fullmatch(key):
            raise PickleRefused("storage key is not a short alphanumeric name")
        if type(numel) is not int:
            raise PickleRefused(f"storage {key} declares a {type(numel).__name__} as its element count")
        if key in self.storages:
            seen_type, seen_numel, storage = self.storages[key]
            if seen_type != stype or seen_numel != numel:
                raise PickleRefused(f"storage {key} is declared twice, with different types or sizes")
            return storage
        storage = self._load_storage(stype, key, numel)
        if isinstance(storage, _Bad):
            self.bad.append(storage)
        self.storages[key] = (stype, numel, storage)
        return storage

    def _load_storage(self, stype: _StorageType, key: str, numel: Any) -> np.ndarray | _Bad:
        member = f"{self.prefix}data/{key}"
        dtype = stype.dtype.newbyteorder(_BYTEORDERS[self.byteorder])
        if not _is_index(numel):
            return _Bad(f"storage '{member}' declares {_short(numel)} elements")
        nbytes = numel * dtype.itemsize
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            return _Bad(f"missing tensor data '{member}' (truncated file?)")
        if info.compress_type != zipfile.ZIP_STORED:
            return _Bad(f"tensor data '{member}' is compressed; torch.save stores it uncompressed")
        if info.file_size != nbytes or info.compress_size != nbytes:
            return _Bad(f"tensor data '{member}' holds {info.file_size} bytes, but its storage "
                        f"(torch.{stype.name}, {numel} elements) needs {nbytes} (truncated or corrupt?)")
        if info.header_offset + nbytes > self.file_bytes or self.data_bytes + nbytes > self.file_bytes:
            return _Bad(f"tensor data '{member}' does not fit in the file (overlapping or corrupt members?)")
        swap = not dtype.isnative
        try:
            self.budget.charge(nbytes * (2 if swap else 1), f"tensor data '{member}'")
        except OverBudget as exc:
            return _Bad(str(exc))
        self.data_bytes += nbytes
        with self.archive.open(info) as fh:
            raw = fh.read(nbytes)
        if len(raw) != nbytes:
            return _Bad(f"tensor data '{member}' is truncated")
        arr = np.frombuffer(raw, dtype=dtype, count=numel)
        if swap:
            arr = arr.astype(dtype.newbyteorder("="))
            arr.flags.writeable = False
        return arr

    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        if isinstance(storage, _Bad):
            return storage
        if not isinstance(storage, np.ndarray):
            raise PickleRefused(f"tensor built from a {type(storage).__name__}, not a storage")
        try:
            return _view(storage, storage_offset, size, stride, self.budget)
        except (CheckpointError, OverBudget) as exc:
            bad = _Bad(str(exc))
            self.bad.append(bad)
            return bad


# (module, name) -> inert local object. Nothing outside this table is ever resolved. _rebuild_tensor_v2 is a
# placeholder: each read resolves it to its own method (its storages, its budget), so reads share no state.
def _rebuild_tensor_v2(*args):  # pragma: no cover (never called)
    raise AssertionError("resolved per read by _TorchRead.find_class")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
# Python 3 writes protocol-2 pickles, torch.save's default, with Python 2's module name for builtins.
_ALLOWED.update({("__builtin__", name): obj for (module, name), obj in list(_ALLOWED.items()) if module == "builtins"})
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


@dataclass
class Checkpoint:
    """What a checkpoint file holds once read: the raw object tree and where it came from."""

    path: str
    obj: Any
    meta: dict = field(default_factory=dict)


def read_torch(path: str | os.PathLike) -> Checkpoint:
    """Read a file written by ``torch.save`` (zip format) or a ``.safetensors`` file.

    Tensors become read-only numpy arrays, ``argparse.Namespace`` becomes :class:`Namespace`; any other pickled
    global is refused before anything runs. Every problem is a :class:`CheckpointError` naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        file_bytes = os.path.getsize(path)
        budget = Budget(memory_bound(file_bytes))
        if path.endswith(".safetensors"):
            return _read_safetensors(path, file_bytes)
        return _read_torch_zip(path, file_bytes, budget)
    except CheckpointError as exc:
        msg = str(exc)
        if msg.startswith(path):
            raise
        raise CheckpointError(f"{path}: {msg}") from exc
    except PickleRefused as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:  # whatever a malformed file triggers is the file's fault
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_torch_zip(path: str, file_bytes: int, budget: Budget) -> Checkpoint:
    with open(path, "rb") as fh:
        endrec = zipfile._EndRecData(fh)  # the very parse ZipFile does, to size its directory before reading it
        if endrec is None:
            fh.seek(0)
            if fh.read(1) == b"\x80":
                raise CheckpointError(
                    f"{path}: legacy (pre-1.6, non-zip) torch pickle; re-save it with a current torch.save, "
                    "or convert it to .safetensors"
                )
            raise CheckpointError(f"{path}: not a torch zip checkpoint nor a safetensors file (truncated or corrupt?)")
    directory = min(int(endrec[zipfile._ECD_SIZE]), file_bytes)
    budget.charge((1 + _ZIPINFO_BYTES_PER_DIRECTORY_BYTE) * directory, "the zip directory")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise CheckpointError(f"{path}: {len(infos)} zip members, more than the {MAX_MEMBERS} allowed")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CheckpointError(f"{path}: the zip archive names a member twice")
        pkl = [n for n in names if len(parts := n.split("/")) == 2 and parts[0] and parts[1] == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one '<name>/data.pkl' record, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = _read_small(archive, f"{prefix}byteorder", 16, budget)
        byteorder = "little" if byteorder is None else byteorder.decode("ascii").strip()
        if byteorder not in _BYTEORDERS:
            raise CheckpointError(f"{path}: unknown byteorder {byteorder!r}")
        data = _read_small(archive, pkl[0], MAX_PICKLE_BYTES, budget)
        read = _TorchRead(path, archive, prefix, byteorder, file_bytes, budget)
        obj, ops = loads(data, budget=budget, find_class=read.find_class, persistent_load=read.persistent_load,
                         callables=(read.rebuild, _rebuild_parameter),
                         buildable=(Namespace, collections.OrderedDict))
        del data
    _check_tree(path, obj, read.bad, ops)
    return Checkpoint(path=path, obj=obj, meta={"format": "torch-zip", "budget_used": budget.used,
                                                "budget_limit": budget.limit})


def _read_small(archive: zipfile.ZipFile, member: str, limit: int, budget: Budget) -> bytes | None:
    """A record other than tensor data (pickle, byteorder): inflated at most to its declared size <= limit."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        return None
    if info.file_size > limit:
        raise CheckpointError(f"'{member}' declares {info.file_size} bytes, more than the {limit} allowed")
    budget.charge(info.file_size, f"'{member}'")
    with archive.open(info) as fh:
        data = fh.read(info.file_size)
    if len(data) != info.file_size:
        raise CheckpointError(f"'{member}' is truncated")
    return data


def _key_str(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)[:80]


def _check_tree(path: str, obj: Any, bad: list[_Bad], ops: int) -> None:
    """Walk the object tree once: name the key of the first bad tensor; refuse cycles and runaway sharing.

    Downstream code recurses over the tree (formatting, JSON); a depth and a visit limit keep that safe.
    """
    limit = 2 * ops + 100_000
    todo = [(obj, (), 0)]
    visits = 0
    while todo:
        node, keys, depth = todo.pop()
        visits += 1
        if depth > MAX_DEPTH or visits > limit:
            raise CheckpointError(f"{path}: the object tree is nested too deeply, cyclic or shares containers "
                                  f"too often (at '{'/'.join(keys)[:200]}')")
        if isinstance(node, _Bad):
            where = "/".join(keys)
            raise CheckpointError(f"{path}: tensor '{where}': {node.problem}")
        if isinstance(node, dict):
            todo.extend((v, keys + (_key_str(k),), depth + 1) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            todo.extend((v, keys + (str(i),), depth + 1) for i, v in enumerate(node))
        elif isinstance(node, Namespace):
            todo.extend((v, keys + (k,), depth + 1) for k, v in vars(node).items())
        elif isinstance(node, (set, frozenset)):
            todo.extend((v, keys + ("{}",), depth + 1) for v in node)
    if bad:
        raise CheckpointError(f"{path}: {bad[0].problem}")


def _read_safetensors(path: str, file_bytes: int) -> Checkpoint:
    from safetensors.numpy import load_file

    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: safetensors file shorter than its 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > file_bytes - 8 or n > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"{path}: safetensors header of {n} bytes does not fit the file "
                              f"(or exceeds {MAX_SAFETENSORS_HEADER})")
    try:
        tensors = load_file(path)
    except Exception as exc:  # SafetensorError, or numpy refusing a dtype
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(exc).__name__}: {exc})") from exc
    return Checkpoint(path=path, obj=collections.OrderedDict(tensors), meta={"format": "safetensors"})


_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network")


def extract_state_dict(ckpt: Checkpoint) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Find the weights inside a checkpoint and return ``(state_dict, extras)``.

    Unwraps ``{"model": ...}``-style containers and strips a common ``module.`` prefix
    (DataParallel/DDP). ``extras`` holds the remaining plain data, e.g. ``args`` as a dict.
    """
    obj = ckpt.obj
    extras: dict[str, Any] = {}
    path = ckpt.path
    for _ in range(3):  # containers nest at most a couple of levels in practice
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: top-level object is {type(obj).__name__}, not a dict of tensors")
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            break
        inner = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"{path}: no state_dict found; top-level keys are {sorted(map(str, obj))[:12]} "
                f"(expected tensors or one of {list(_CONTAINER_KEYS)})"
            )
        for k, v in obj.items():
            if k != inner:
                extras[k] = v.to_dict() if isinstance(v, Namespace) else v
        obj = obj[inner]
    else:
        raise CheckpointError(f"{path}: state_dict nested too deeply")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:8]}")
    sd = collections.OrderedDict((str(k), v) for k, v in obj.items())
    if sd and all(k.startswith("module.") for k in sd):
        sd = collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
        extras["stripped_prefix"] = "module."
    return sd, extras


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``read_torch`` + ``extract_state_dict`` in one call."""
    return extract_state_dict(read_torch(path))
