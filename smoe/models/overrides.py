"""Config overrides and JSON-safe serialisation: ``apply_overrides``, ``config_to_dict``, ``config_from_dict``.

Overrides are dotted paths into the nested config dataclasses (``"moe.top_k"``, ``"depth"``,
``"momentum.kind"``); a path into a dict field sets one key (``"moe.router_kwargs.noise_std"``). Values may be
Python values of the field's type or strings from a command line, converted by the field's annotation:
``"1" -> 1``, ``"0.5" -> 0.5``, ``"none"``/``"null" -> None`` (optional fields), ``"true"``/``"false"`` (also
``yes/no/on/off/1/0``) for booleans, JSON for dicts and lists (``'{"noise": "gaussian"}'``, ``"[1, 3]"``; lists
may also be written ``"1,3"``). An unknown key or a value of the wrong type raises ``ValueError`` naming it; the
config's own validation (``__post_init__``) then checks ranges.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from typing import Any

from smoe.models.config import CONFIG_CLASSES

__all__ = ["apply_overrides", "config_to_dict", "config_from_dict"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _coerce(value, hint, path: str):
    """Convert ``value`` (a Python value or a CLI string) to the annotated type ``hint``; ``ValueError`` if not."""
    if _is_union(hint):
        options = typing.get_args(hint)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{path}: cannot use {value!r} as {hint}") from None
    origin = typing.get_origin(hint)
    bad = ValueError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if hint is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            except json.JSONDecodeError:
                raise bad from None
        if not isinstance(value, list | tuple):
            raise bad
        args = typing.get_args(hint)
        elem = args[0] if args else Any
        return tuple(v if elem is Any else _coerce(v.strip() if isinstance(v, str) else v, elem, path) for v in value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return copy.deepcopy(value)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        if isinstance(value, dict):
            return _dataclass_from_dict(hint, value, path)
        raise bad
    raise ValueError(f"{path}: unsupported field type {hint}")  # pragma: no cover - all config fields are covered


def _dataclass_from_dict(cls: type, data: dict, path: str):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[f'{path}.{k}'.lstrip('.') for k in unknown]}; {cls.__name__} has {names}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(cfg, parts: list[str], value, full: str):
    name = parts[0]
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        raise ValueError(f"unknown config key {full!r}: {type(cfg).__name__} has no field {name!r}; fields: {names}")
    if name == "task":
        raise ValueError(f"{full!r} cannot be overridden: the task selects the config class")
    hint = _hints(type(cfg))[name]
    current = getattr(cfg, name)
    if len(parts) == 1:
        return dataclasses.replace(cfg, **{name: _coerce(value, hint, full)})
    if dataclasses.is_dataclass(current):
        return dataclasses.replace(cfg, **{name: _set_path(current, parts[1:], value, full)})
    if isinstance(current, dict):
        new = copy.deepcopy(current)
        node = new
        for key in parts[1:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{full!r}: {key!r} is not a dict")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a plain string option, e.g. noise=gaussian
        node[parts[-1]] = value
        return dataclasses.replace(cfg, **{name: new})
    raise ValueError(
        f"unknown config key {full!r}: {type(cfg).__name__}.{name} is a {type(current).__name__}, not a nested config"
    )


def apply_overrides(config, overrides: dict[str, Any], *, prefix: str = ""):
    """Return a new config with the dotted-path ``overrides`` applied (the input is not modified).

    This is the project's one override parser: model configs (presets), ``TrainConfig`` and ``DataConfig``
    (``--set train.lr=...``, through :func:`smoe.train.config.apply_dataclass_overrides`) all go through it.

    Args:
        config: a config dataclass instance (:class:`~smoe.models.config.LMConfig`, ``ViTConfig``, ``VAEConfig``,
            ``TrainConfig``, ...).
        overrides: ``{"moe.top_k": 1, "depth": "4", "moe.router_kwargs": {...}, ...}``; keys may also use
            ``"__"`` instead of ``"."``.
        prefix: the name errors show before a key (``"train"`` gives ``train.lr``).

    Returns:
        The new, validated config.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"apply_overrides needs a config dataclass instance, got {type(config).__name__}")
    new = copy.deepcopy(config)
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"override keys must be non-empty strings, got {key!r}")
        path = key.replace("__", ".")
        new = _set_path(new, path.split("."), value, f"{prefix}.{path}" if prefix else path)
    return new


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-safe dict of ``config`` (nested dicts, lists for tuples); ``"task"`` names the config class."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"config_to_dict needs a config dataclass instance, got {type(config).__name__}")
    return _jsonable(dataclasses.asdict(config))


def config_from_dict(data: dict[str, Any]):
    """Inverse of :func:`config_to_dict`: the config class is chosen by ``data["task"]``."""
    if not isinstance(data, dict):
        raise ValueError(f"config_from_dict needs a dict, got {type(data).__name__}")
    task = data.get("task")
    if task not in CONFIG_CLASSES:
        raise ValueError(f"config dict has task={task!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return _dataclass_from_dict(CONFIG_CLASSES[task], data, "")
