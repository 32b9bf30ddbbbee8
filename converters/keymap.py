"""Shared machinery of the per-model key maps: layout transforms, and strict bookkeeping of keys.

A key map reads tensors from a torch state_dict through :class:`KeyReader`, which records every
key it consumes, every key explicitly ignored (with a reason), and every problem (missing key,
wrong shape). ``finish()`` raises one :class:`ConversionError` listing all problems at once, and
refuses any key that was neither consumed nor ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vfm_align.errors import ConversionError


# torch layout -> channels-last Flax layout. Never `.T` on >2-D weights: for cubic kernels it
# has the right shape and silently the wrong values.
def linear(w: np.ndarray) -> np.ndarray:
    """Linear [O, I] -> Dense kernel [I, O]."""
    return np.ascontiguousarray(w.T)


def conv2d(w: np.ndarray) -> np.ndarray:
    """Conv2d [O, I, kh, kw] -> [kh, kw, I, O]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv3d(w: np.ndarray) -> np.ndarray:
    """Conv3d [O, I, kd, kh, kw] -> [kd, kh, kw, I, O]."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return w


class KeyReader:
    """Strict, bookkeeping access to a state_dict."""

    def __init__(self, state_dict: dict[str, np.ndarray], source: str = "<state_dict>"):
        self.sd = state_dict
        self.source = source
        self.used: list[str] = []
        self.ignored: dict[str, str] = {}
        self.problems: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.sd

    def shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self.sd[key].shape) if key in self.sd else None

    def take(self, key: str, transform: Callable[[np.ndarray], np.ndarray] = identity,
             shape: Iterable[int] | None = None) -> np.ndarray | None:
        """Consume ``key``; check its torch-layout ``shape`` if given; return it transformed."""
        if key not in self.sd:
            self.problems.append(f"missing key '{key}'")
            return None
        arr = self.sd[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            self.problems.append(f"key '{key}' has shape {tuple(arr.shape)}, expected {tuple(shape)}")
            self.used.append(key)
            return None
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            self.problems.append(f"key '{key}' has non-numeric dtype {arr.dtype}")
        self.used.append(key)
        return transform(np.asarray(arr))

    def ignore(self, pattern: str, reason: str) -> None:
        """Mark every key matching the regex ``pattern`` as deliberately unused."""
        rx = re.compile(pattern)
        for k in self.sd:
            if rx.fullmatch(k) and k not in self.used:
                self.ignored[k] = reason

    def finish(self) -> dict[str, Any]:
        leftover = [k for k in self.sd if k not in self.used and k not in self.ignored]
        problems = list(self.problems) + [f"unexpected key '{k}' (shape {tuple(self.sd[k].shape)})" for k in leftover]
        if problems:
            raise ConversionError(
                f"{self.source}: {len(problems)} problem(s) converting the state_dict:\n  - " + "\n  - ".join(problems)
            )
        return {"used": list(self.used), "ignored": dict(self.ignored)}


def assign(model: nnx.Module, params: dict[tuple, np.ndarray], source: str = "<state_dict>") -> nnx.Module:
    """Write converted arrays into ``model``'s Param/BatchStat variables, by state path.

    Every Param and BatchStat leaf must receive an array of exactly its shape; extra paths are
    errors too. The model is updated in place and returned.
    """
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = dict(nnx.to_flat_state(state))
    problems = []
    for path, var in flat.items():
        if path not in params:
            problems.append(f"model variable {'/'.join(map(str, path))} received no weight")
            continue
        value = params[path]
        if value is None:  # already reported by KeyReader
            continue
        if tuple(value.shape) != tuple(var.get_value().shape):
            problems.append(
                f"model variable {'/'.join(map(str, path))}: converted shape {tuple(value.shape)}, "
                f"model expects {tuple(var.get_value().shape)}"
            )
            continue
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    extra = [p for p in params if p not in flat]
    problems += [f"converted weight for unknown model variable {'/'.join(map(str, p))}" for p in extra]
    if problems:
        raise ConversionError(
            f"{source}: {len(problems)} problem(s) assigning weights:\n  - " + "\n  - ".join(problems))
    nnx.update(model, state)
    return model
