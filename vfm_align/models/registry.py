"""Architecture registry: name -> (config class, model builder), so a saved model can be rebuilt from its sidecar.

Filled only by the ``@register`` decorators of the model modules; every module of ``vfm_align.models``
is imported on the first lookup, so a new model registers itself by living in that package.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from flax import nnx

from vfm_align.errors import ConfigError

_REGISTRY: dict[str, tuple[type, Callable[..., nnx.Module]]] = {}


def register(arch: str, config_cls: type):
    """Decorator: ``@register("provicnet", ProViCNetConfig)`` on a ``builder(config, *, rngs)``."""

    def deco(builder):
        _REGISTRY[arch] = (config_cls, builder)
        return builder

    return deco


def _import_models() -> None:
    """Import every module of ``vfm_align.models`` (their decorators fill the registry); cheap after the first."""
    import vfm_align.models as models

    for info in pkgutil.walk_packages(models.__path__, models.__name__ + "."):
        importlib.import_module(info.name)


def _lookup(arch: str):
    if arch not in _REGISTRY:
        _import_models()
    if arch not in _REGISTRY:
        raise ConfigError(f"unknown architecture '{arch}'; known: {known_archs()}")
    return _REGISTRY[arch]


def known_archs() -> list[str]:
    _import_models()
    return sorted(_REGISTRY)


def config_from_dict(arch: str, data: dict[str, Any]):
    config_cls, _ = _lookup(arch)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(f"config for '{arch}' has unknown fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return config_cls(**kwargs)


def build_model(arch: str, config, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Build a randomly initialised model of ``arch`` from a config object or plain dict."""
    config_cls, builder = _lookup(arch)
    if isinstance(config, dict):
        config = config_from_dict(arch, config)
    if not isinstance(config, config_cls):
        raise ConfigError(f"config for '{arch}' must be {config_cls.__name__}, got {type(config).__name__}")
    return builder(config, rngs=rngs or nnx.Rngs(0))
