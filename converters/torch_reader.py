"""Read PyTorch checkpoints as numpy arrays without torch and without running pickled code.

torch.save writes a zip archive: ``<name>/data.pkl`` holds a pickle of the object tree,
and each tensor's bytes live in ``<name>/data/<key>``. The pickle names a handful of
globals (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``, ...). A plain
``pickle.load`` would import and call whatever the file names; :class:`_SafeUnpickler`
instead maps an allow-list of names onto inert local stand-ins and refuses everything
else, naming the offending global. ``.safetensors`` files carry no code at all and are read
with the safetensors library.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vfm_align.errors import CheckpointError

try:  # bfloat16 checkpoints need a numpy dtype; ml_dtypes ships with jax.
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

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


@dataclass(frozen=True)
class _StorageType:
    name: str

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
        if not isinstance(state, dict):
            raise CheckpointError("argparse.Namespace state in checkpoint is not a plain dict")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _view(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _view(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """torch's (offset, size, stride) view of a flat storage, copied to a C-ordered array."""
    if not size:
        return np.array(storage[offset])
    itemsize = storage.dtype.itemsize
    needed = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if needed > storage.size:
        raise CheckpointError(f"tensor view (offset {offset}, size {size}, stride {stride}) runs past its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride), writeable=False
    )
    return np.ascontiguousarray(view)


# (module, name) -> inert local object. Nothing outside this table is ever resolved.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, path: str, byteorder: str):
        super().__init__(fh)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: refusing to load global '{module}.{name}'; only tensors, plain containers "
                "and argparse.Namespace are allowed (nothing in the file was executed)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self._path}: storage {key} has unknown type {stype!r}")
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise CheckpointError(f"{self._path}: missing tensor data '{member}' (truncated file?)") from None
            dtype = stype.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(f"{self._path}: tensor data '{member}' is truncated")
            arr = np.frombuffer(raw, dtype=dtype, count=numel)
            self._storages[key] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        return self._storages[key]


@dataclass
class Checkpoint:
    """What a checkpoint file holds once read: the raw object tree and where it came from."""

    path: str
    obj: Any
    meta: dict = field(default_factory=dict)


def read_torch(path: str | os.PathLike) -> Checkpoint:
    """Read a file written by ``torch.save`` (zip format) or a ``.safetensors`` file.

    Tensors become numpy arrays, ``argparse.Namespace`` becomes :class:`Namespace`;
    any other pickled global is refused before anything runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head.startswith(b"\x80"):
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) torch pickle; re-save it with a current torch.save, "
                "or convert it to .safetensors"
            )
        raise CheckpointError(f"{path}: not a torch zip checkpoint nor a safetensors file (truncated or corrupt?)")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: expected one '<name>/data.pkl' record, found {len(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode().strip() or "little"
            with archive.open(pkl[0]) as fh:
                obj = _SafeUnpickler(fh, archive, prefix, path, byteorder).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    return Checkpoint(path=path, obj=obj, meta={"format": "torch-zip"})


def _read_safetensors(path: str) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
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
