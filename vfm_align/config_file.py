"""Recipe files (``configs/*.py`` with ``get_config()``): loading one by path, with typed overrides.

Every command that takes a recipe (finetune, pretrain, study) loads it here, so an override means the
same everywhere: ``KEY=VALUE`` (``--config.KEY=VALUE`` on the command line) with a dotted key (list items
by index, ``backbones.0.weights``) that must already exist, and a value parsed to the type of the value
it replaces.

The project's recipes ship inside the package (``vfm_align/configs``, the checkout's top-level
``configs/`` folder), so ``configs/finetune.py:...`` resolves in a checkout, an editable and a plain
install alike, from any working directory.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import json
import os

from vfm_align.errors import ConfigError

# Through the package's resources, not a path relative to the source tree: the recipes are package data.
CONFIG_DIR = os.fspath(importlib.resources.files("vfm_align").joinpath("configs"))


def default_config_path(name: str) -> str:
    """The path of the project's recipe ``configs/<name>.py``."""
    return os.path.join(CONFIG_DIR, f"{name}.py")


def resolve_recipe(path: str) -> str:
    """``path`` if that file exists; else, for ``NAME.py`` or ``configs/NAME.py``, the project's recipe of
    that name (so the documented ``--config configs/finetune.py:...`` works from any directory)."""
    if os.path.isfile(path):
        return path
    head, name = os.path.split(os.path.normpath(path))
    if head in ("", "configs") and os.path.isfile(os.path.join(CONFIG_DIR, name)):
        return os.path.join(CONFIG_DIR, name)
    raise ConfigError(f"{path}: recipe file not found (the project's recipes: {project_recipes()})")


def project_recipes() -> list[str]:
    return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def recipe_module(path: str, beside: str | None = None):
    """The recipe file ``path`` (relative to the folder of the file ``beside`` when given, so a recipe
    can build on its neighbours wherever the configs folder is copied) as a module."""
    if beside is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(beside)), path)
    path = resolve_recipe(path)
    spec = importlib.util.spec_from_file_location("_vfm_align_recipe_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(spec: str, overrides=()):
    """``get_config()`` of the recipe file ``spec`` ("path" or "path:arg", which passes arg), with
    ``KEY=VALUE`` overrides applied and the result locked."""
    path, _, arg = spec.partition(":")
    path = resolve_recipe(path)
    mod = recipe_module(path)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: no get_config() function")
    cfg = mod.get_config(arg) if arg else mod.get_config()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{path}: override must be KEY=VALUE, got '{item}'")
        set_override(cfg, key, value)
    cfg.lock()
    return cfg


def set_override(cfg, key: str, text: str) -> None:
    """Set ``cfg.<key>`` from text, typed like the current value (bools, numbers, tuples, lists, strings)."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = _child(node, part, key)
    if isinstance(node, (list, tuple)):
        raise ConfigError(f"{key}: cannot replace a list item; set the whole list")
    if leaf not in node:
        raise ConfigError(f"{key}: unknown key (known: {sorted(node.keys())})")
    old = node[leaf]
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{key}: expected true/false, got '{text}'")
        value = text.lower() in ("true", "1")
    elif isinstance(old, str):
        value = text
    else:
        value = _parse(key, text)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def _child(node, part: str, key: str):
    if isinstance(node, (list, tuple)):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{key}: '{part}' is not an index of a list of {len(node)}")
        return node[int(part)]
    if part not in node:
        raise ConfigError(f"{key}: no section '{part}'")
    return node[part]


def _literal(text: str):
    """A Python literal ("(16, 64, 64)", "None"), else JSON ("null", "true"); raises ValueError if neither."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(text) from exc


def _parse(key: str, text: str):
    try:
        return _literal(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot parse '{text}'") from exc


def parse_value(text: str):
    """An override value without a config value to type it by: a Python or JSON literal, else the text."""
    try:
        return _literal(text)
    except ValueError:
        return text
