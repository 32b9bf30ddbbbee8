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
import re
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
        sidecar = {"format_version": FORMAT_VERSION, "arch": arch, "config": _jsonable(config),
                   **_jsonable(extra or {})}
        with open(os.path.join(tmp, SIDECAR), "w") as fh:
            json.dump(sidecar, fh, indent=1)
    return out_dir


MAX_SIDECAR_BYTES = 16 << 20  # the sidecar holds a config and a key report: kilobytes, not megabytes


MAX_SIDECAR_DEPTH = 64
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _check_json_depth(text: str, path: str) -> None:
    """Refuse JSON nested deeper than MAX_SIDECAR_DEPTH without recursing (strings skipped whole)."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()[0]
        if c in "[{":
            depth += 1
            if depth > MAX_SIDECAR_DEPTH:
                raise CheckpointError(f"{path}: corrupt sidecar (nested deeper than {MAX_SIDECAR_DEPTH})")
        elif c in "]}":
            depth -= 1


def read_sidecar(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The sidecar's JSON object; a missing, oversized, undecodable or non-object sidecar is a CheckpointError."""
    path = os.path.join(os.fspath(model_dir), SIDECAR)
    try:
        if os.path.getsize(path) > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"{path}: sidecar larger than {MAX_SIDECAR_BYTES} bytes")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        _check_json_depth(text, path)  # before json: its RecursionError can upset CPython 3.11's parser state
        meta = json.loads(text)
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir}: not a vfm-align model directory (no {SIDECAR})") from None
    except (ValueError, RecursionError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: corrupt sidecar ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt sidecar (a JSON {type(meta).__name__}, not an object)")
    return meta


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}; keys as strings (nnx uses ints for list indices, Orbax strings)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _check_weights_fit(model_dir: str, arch: str, expected: dict[str, Any], stored: Any) -> None:
    """Every weight the model needs is stored with its shape and dtype, and nothing else is: else one error."""
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _flat(expected).items()}
    have = _flat(stored)
    problems = [f"missing array '{k}'" for k in want if k not in have]
    problems += [f"unexpected array '{k}'" for k in have if k not in want]
    for k in want.keys() & have.keys():
        shape, dtype = tuple(getattr(have[k], "shape", ()) or ()), getattr(have[k], "dtype", None)
        if shape != want[k][0] or dtype is None or np.dtype(dtype) != want[k][1]:
            problems.append(f"array '{k}' is {shape} {dtype}, the '{arch}' model needs {want[k][0]} {want[k][1]}")
    if problems:
        raise CheckpointError(f"{model_dir}: the stored weights do not fit the '{arch}' model its sidecar describes "
                              f"({len(problems)} problem(s)):\n  - " + "\n  - ".join(sorted(problems)[:40]))


def load(model_dir: str | os.PathLike) -> nnx.Module:
    """Restore a model saved by :func:`save_model` (or ``vfm-align convert``); needs no torch.

    The sidecar's arch and config are first built abstractly (no memory) and their weights' names, shapes and
    dtypes checked against the Orbax checkpoint's metadata; only a directory that matches throughout is restored.
    Anything wrong surfaces as one :class:`CheckpointError` naming the directory; no half-built model is returned.
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    sidecar = os.path.join(model_dir, SIDECAR)
    meta = read_sidecar(model_dir)
    arch, config = meta.get("arch"), meta.get("config", {})
    if not isinstance(arch, str) or not isinstance(config, dict):
        raise CheckpointError(f"{sidecar}: 'arch' must be a string and 'config' an object")
    try:
        config = config_from_dict(arch, config)
        abstract = nnx.eval_shape(lambda: build_model(arch, config))
    except Exception as exc:  # ConfigError, or a builder refusing the values
        raise CheckpointError(f"{sidecar}: its config does not describe a '{arch}' model "
                              f"({type(exc).__name__}: {exc})") from exc
    expected = nnx.to_pure_dict(_weights(abstract))
    params = os.path.join(model_dir, "params")
    try:
        with _IO_LOCK, ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params).item_metadata.tree
    except Exception as exc:  # whatever Orbax raises on a missing or tampered directory
        raise CheckpointError(f"{model_dir}: cannot read the weights' metadata ({type(exc).__name__}: {exc})") from exc
    _check_weights_fit(model_dir, arch, expected, stored)
    # Restore into the abstract model: no random initialisation (for a released model, tens of compiled init
    # ops and a second copy of the weights). A model holding other state than weights (e.g. an RNG stream)
    # is built for real so that state gets its values.
    graphdef, weights, rest = nnx.split(abstract, nnx.Any(nnx.Param, nnx.BatchStat), ...)
    model = None if not jax.tree.leaves(rest) else build_model(arch, config)
    abstract_target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), expected)
    try:
        with _IO_LOCK, ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params, abstract_target)
        state = weights if model is None else _weights(model)
        nnx.replace_by_pure_dict(state, restored)
    except Exception as exc:  # array data missing or corrupt behind intact metadata
        raise CheckpointError(f"{model_dir}: cannot restore weights ({type(exc).__name__}: {exc})") from exc
    if model is None:
        return nnx.merge(graphdef, state, rest)
    nnx.update(model, state)
    return model
