"""Saving and restoring converted or fine-tuned models: an Orbax checkpoint plus a JSON sidecar.

Layout of a model directory::

    DIR/vfm_align.json   arch, config, provenance (source file, sha256, key report)
    DIR/params/          Orbax checkpoint of the Param and BatchStat variables (pure dict)

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place
only once complete, so an interrupted or failed run never leaves a half-written DIR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vfm_align.atomic import atomic_dir
from vfm_align.errors import CheckpointError
from vfm_align.models.registry import build_model, config_from_dict

SIDECAR = "vfm_align.json"
FORMAT_VERSION = 1


def _weights(model: nnx.Module):
    return nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


# One Orbax save or restore at a time, so that threads (the study's concurrent runs) can share this module.
_IO_LOCK = threading.Lock()


def save_model(model: nnx.Module, arch: str, config: Any, out_dir: str | os.PathLike, *,
               extra: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Write ``model`` to ``out_dir`` atomically; return the directory path."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    with _IO_LOCK, atomic_dir(out_dir) as tmp:
        pure = nnx.to_pure_dict(_weights(model))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), pure)
            ckptr.wait_until_finished()
        sidecar = {"format_version": FORMAT_VERSION, "arch": arch, "config": _jsonable(config), **_jsonable(extra or {})}
        with open(os.path.join(tmp, SIDECAR), "w") as fh:
            json.dump(sidecar, fh, indent=1)
    return out_dir


def read_sidecar(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(os.fspath(model_dir), SIDECAR)
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir}: not a vfm-align model directory (no {SIDECAR})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt sidecar ({exc})") from exc


def load(model_dir: str | os.PathLike) -> nnx.Module:
    """Restore a model saved by :func:`save_model` (or ``vfm-align convert``); needs no torch."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    meta = read_sidecar(model_dir)
    arch = meta.get("arch")
    config = config_from_dict(arch, meta.get("config", {}))
    model = build_model(arch, config)
    target = nnx.to_pure_dict(_weights(model))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    try:
        with _IO_LOCK, ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(model_dir, "params"), abstract)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{model_dir}: cannot restore weights ({type(exc).__name__}: {exc})") from exc
    state = _weights(model)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
