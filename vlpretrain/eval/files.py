"""Reading benchmark files (JSON annotations, predictions, saved tensors) with errors that name the file and field.

Every reader of the public formats goes through :func:`read_json` and :func:`field`, so a bad file ends the command
with one line such as ``annotations.json: images[3]: missing field 'sentences'`` (a :class:`UserError`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlpretrain.errors import UserError


def read_json(path: str | Path) -> Any:
    """The parsed JSON of ``path``; a missing file or invalid JSON is a :class:`UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason})") from err


def field(record: Any, key: str, source: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """``record[key]``, checked: ``source`` names the file and ``where`` the record (``"annotations[3]"``).

    Raises:
        UserError: the record is not an object, the key is missing, or the value is not of ``kind``.
    """
    if not isinstance(record, Mapping):
        raise UserError(f"{source}: {where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise UserError(f"{source}: {where}: missing field '{key}'")
    value = record[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and bool not in _tuple(kind)):
        names = "/".join(k.__name__ for k in _tuple(kind))
        raise UserError(f"{source}: {where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def json_list(data: Any, source: str, key: str | None = None) -> list[Any]:
    """``data`` (or ``data[key]``) as a list; a :class:`UserError` naming the file when it is not one."""
    value = field(data, key, source, "top level") if key is not None else data
    if not isinstance(value, list):
        where = f"'{key}'" if key is not None else "top level"
        raise UserError(f"{source}: {where}: expected a JSON list, got {type(value).__name__}")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


__all__ = ["field", "json_list", "read_json"]
