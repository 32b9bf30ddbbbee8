"""Architecture registry: name -> (config class, model builder), so a saved model can be rebuilt from its sidecar."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from flax import nnx

from vfm_align.errors import ConfigError

# arch name -> module that registers it on import. Each model module adds its own names here.
_ARCH_MODULES: dict[str, str] = {
    "profound_mae_vit": "vfm_align.models.mae_vit3d",
    "provicnet": "vfm_align.models.provicnet",
    "provicnet_fusion": "vfm_align.models.provicnet",
    "profound_conv": "vfm_align.models.convnext3d",
    "profound_conv_cls": "vfm_align.models.heads.classifier",
    "profound_conv_upernet": "vfm_align.models.heads.upernet3d",
    "profound_fcmae": "vfm_align.models.fcmae",
}

_REGISTRY: dict[str, tuple[type, Callable[..., nnx.Module]]] = {}


def register(arch: str, config_cls: type):
    """Decorator: ``@register("provicnet", ProViCNetConfig)`` on a ``builder(config, *, rngs)``."""

    def deco(builder):
        _REGISTRY[arch] = (config_cls, builder)
        return builder

    return deco


def _lookup(arch: str):
    if arch not in _REGISTRY and arch in _ARCH_MODULES:
        importlib.import_module(_ARCH_MODULES[arch])
    if arch not in _REGISTRY:
        raise ConfigError(f"unknown architecture '{arch}'; known: {sorted(set(_ARCH_MODULES) | set(_REGISTRY))}")
    return _REGISTRY[arch]


def known_archs() -> list[str]:
    return sorted(set(_ARCH_MODULES) | set(_REGISTRY))


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
