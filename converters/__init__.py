"""PyTorch -> Flax conversion: a safe checkpoint reader, one key map per model, and the dispatcher.

``from_pytorch(path)`` reads a torch checkpoint without torch, infers the architecture from the
state_dict's keys (or takes ``arch=``), infers every size the tensors determine, and returns the
Flax model with a report of what was used and what was ignored.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from typing import Any

from converters.torch_reader import load_state_dict
from vfm_align.errors import ConversionError

# One key-map module per model family. Each exposes ARCHS (names), detect(state_dict) -> arch or
# None, and convert(state_dict, extras, arch, source, **config) -> (model, info dict).
_KEYMAPS = (
    "converters.profound_mae",
    "converters.provicnet",
    "converters.profound_conv",
)


def _keymaps():
    return [importlib.import_module(name) for name in _KEYMAPS]


def known_archs() -> list[str]:
    return [a for km in _keymaps() for a in km.ARCHS]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_arch(state_dict: dict, source: str = "<state_dict>") -> str:
    found = [a for km in _keymaps() if (a := km.detect(state_dict))]
    if len(found) != 1:
        sample = list(state_dict)[:8]
        raise ConversionError(
            f"{source}: cannot infer the architecture from its keys "
            f"({'ambiguous: ' + str(found) if found else 'no match'}); "
            f"first keys {sample}; pass arch= one of {known_archs()}"
        )
    return found[0]


def convert_state_dict(state_dict: dict, arch: str | None = None, *, extras: dict | None = None,
                       source: str = "<state_dict>", **config: Any):
    """Convert an in-memory state_dict (numpy arrays, torch key names) to ``(model, info)``."""
    arch = arch or detect_arch(state_dict, source)
    for km in _keymaps():
        if arch in km.ARCHS:
            model, info = km.convert(state_dict, extras or {}, arch, source, **config)
            info = {"arch": arch, "source": source, **info}
            return model, info
    raise ConversionError(f"unknown arch '{arch}'; known: {known_archs()}")


def from_pytorch(path: str | os.PathLike, arch: str | None = None, **config: Any):
    """Load a PyTorch checkpoint (``.pth``, ``.pth.tar``, ``.safetensors``) as a Flax NNX model.

    Returns ``(model, info)``; ``info`` has the arch, the resolved config, the source path and
    sha256, every source key used, and every key ignored with its reason.
    """
    path = os.fspath(path)
    state_dict, extras = load_state_dict(path)
    model, info = convert_state_dict(state_dict, arch, extras=extras, source=path, **config)
    info["sha256"] = sha256(path)
    return model, info


__all__ = ["from_pytorch", "convert_state_dict", "detect_arch", "known_archs"]
