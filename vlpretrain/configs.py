"""Typed dataclass configs: validation, named presets, YAML files and `--set a.b=3` overrides.

Every config in the project is a (nested) dataclass whose fields carry type hints. This module turns plain data
(YAML, JSON, CLI strings) into those dataclasses and back, checking every key and type on the way:

- unknown keys are errors that name the full dotted key (``train.optim.lr``),
- values are checked against the field's type hint (no silent ``"3"`` -> ``3``; ints are accepted for floats),
- ranges and cross-field rules live in each dataclass's ``__post_init__`` and raise :class:`ConfigError`
  (:func:`check_at_least` and :func:`check_divides` word the common ones the same way everywhere).

Presets are functions registered under ``(kind, name)`` that return a config; a YAML file may name one with a
top-level ``preset:`` key and override any field below it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# Exponent notation without a dot ("1e-4"), which PyYAML's YAML 1.1 resolver leaves as a string.
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

_PRESETS: dict[tuple[str, str], Callable[[], Any]] = {}


class ConfigError(ValueError):
    """A config value, key or file is invalid. The message names the offending key or file."""


def check_at_least(cfg: Any, minimum: float, names: Sequence[str], prefix: str = "") -> None:
    """Refuse the first field of ``cfg`` among ``names`` whose value is below ``minimum`` (for ``__post_init__``).

    Args:
        cfg: the dataclass being checked.
        minimum: the smallest allowed value (e.g. 1 for sizes, 0 for weights and counts).
        names: field names, checked in order.
        prefix: the dotted path of ``cfg`` in its parent config (e.g. ``"text."``), for the message.

    Raises:
        ConfigError: ``"{prefix}{name}: must be >= {minimum}, got {value}"``.
    """
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ConfigError(f"{prefix}{name}: must be >= {minimum}, got {value}")


def check_divides(divisor: int, total: int, field: str, total_name: str) -> None:
    """Refuse a ``divisor`` (config field ``field``, e.g. a head count) below 1 or not dividing ``total``.

    Raises:
        ConfigError: ``"{field}: {divisor} does not divide {total_name} {total}"``.
    """
    if divisor < 1 or total % divisor:
        raise ConfigError(f"{field}: {divisor} does not divide {total_name} {total}")


def register_preset(kind: str, name: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
    """Decorator registering a zero-argument function that returns the config preset ``kind/name``."""

    def wrap(fn: Callable[[], T]) -> Callable[[], T]:
        if (kind, name) in _PRESETS:
            raise ConfigError(f"preset {kind}/{name} is registered twice")
        _PRESETS[(kind, name)] = fn
        return fn

    return wrap


def list_presets(kind: str | None = None) -> list[str]:
    """Names of the registered presets as ``kind/name``, optionally only those of one kind."""
    return sorted(f"{k}/{n}" for k, n in _PRESETS if kind is None or k == kind)


def get_preset(kind: str, name: str) -> Any:
    """A fresh config object for the preset ``kind/name``."""
    if (kind, name) not in _PRESETS:
        known = ", ".join(n for k, n in sorted(_PRESETS) if k == kind) or "none"
        raise ConfigError(f"unknown {kind} preset '{name}' (known: {known})")
    return _PRESETS[(kind, name)]()


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, checking keys and types recursively.

    Args:
        cls: a dataclass type.
        data: a mapping of field names to plain values (nested mappings for nested dataclasses).
        where: dotted prefix used in error messages.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{where}{key}' (valid keys: {', '.join(sorted(names))})")
    values = {key: _coerce(value, hints[key], f"{where}{key}") for key, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (JSON/YAML-able) nested dict of a dataclass config."""
    return _plain(dataclasses.asdict(cfg))


def merge(cfg: T, data: dict[str, Any], where: str = "") -> T:
    """Return ``cfg`` with the fields in ``data`` (a nested mapping) replaced, validated like :func:`from_dict`."""
    base = to_dict(cfg)
    _deep_update(base, data)
    return from_dict(type(cfg), base, where)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ``key.path=value`` strings; values are parsed as YAML scalars/lists (``3``, ``1e-4``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        path, raw = item.split("=", 1)
        path = path.strip()
        if not path:
            raise ConfigError(f"override '{item}' has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        cfg = merge(cfg, nested)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(
    cls: type[T],
    kind: str,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> T:
    """Config from a preset, an optional YAML file and ``--set`` strings, applied in that order.

    The base is the YAML file's ``preset:`` key if it has one, else ``preset``, else the defaults of ``cls``.
    """
    data = load_yaml(path) if path is not None else {}
    preset = data.pop("preset", preset)
    cfg = get_preset(kind, preset) if preset is not None else cls()
    if not isinstance(cfg, cls):
        raise ConfigError(f"preset {kind}/{preset} is a {type(cfg).__name__}, expected {cls.__name__}")
    try:
        cfg = merge(cfg, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return apply_overrides(cfg, overrides or [])


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a config as indented JSON."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; convert only lossless cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")
