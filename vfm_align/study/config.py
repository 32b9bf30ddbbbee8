"""Loading a recipe file (``get_config()`` returning an ml_collections ConfigDict) by path."""

from __future__ import annotations

import importlib.util
import os

from vfm_align.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def load_config(path: str, overrides: list[str] = ()):
    """Run ``path``'s ``get_config()``, apply ``key.sub=value`` overrides, lock and return it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location("_vfm_align_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        cfg = mod.get_config()
    except AttributeError as exc:
        raise ConfigError(f"{path}: no get_config() ({exc})") from exc
    import json

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override must be KEY=VALUE, got '{item}'")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node, *_ = [cfg]
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, (list, tuple)) else node[p]
        try:
            node[parts[-1]] = value
        except (KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot set '{key}' ({exc})") from exc
    cfg.lock()
    return cfg


def default_config_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, f"{name}.py")
