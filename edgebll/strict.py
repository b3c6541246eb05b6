"""One strict loader for the small typed files of edgebll: block manifests, run.json, device profiles.

:func:`from_plain` builds a dataclass from parsed JSON (or TOML) and refuses, naming the file and
the key, what a hand-edited, truncated or hostile file may hold: keys the dataclass does not
have, required keys it lacks, and values of another type than the field's annotation (``bool``
is not an ``int``; an ``int`` is a ``float``; nested dataclasses, lists, dicts and optionals are
checked all the way down).
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def from_plain(cls: type[T], data: Any, where: str, error: type[Exception], what: str) -> T:
    """``cls(**data)`` once every key and value of ``data`` fits ``cls``'s fields; else ``error`` naming the key.

    ``what`` names the kind of file in messages ("a device profile", "run.json").
    """
    if not isinstance(data, dict):
        raise error(f"{where}: holds a JSON {type(data).__name__}, not an object; this is not {what}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; {what} has {sorted(known)}")
    missing = sorted(name for name, f in known.items() if name not in data and f.default is MISSING
                     and f.default_factory is MISSING)
    if missing:
        raise error(f"{where}: missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {key: _convert(value, hints[key], f"{where}: {key}", error, what) for key, value in data.items()}
    return cls(**values)


def _convert(value: Any, annotation: Any, at: str, error: type[Exception], what: str) -> Any:
    """``value`` checked against ``annotation`` (nested dataclasses built); ``at`` names the key in messages."""
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(value, option, at, error, what)
            except error:
                continue
        raise error(f"{at} must be {_name(annotation)}, got {type(value).__name__} ({value!r:.80})")
    if is_dataclass(annotation):
        return from_plain(annotation, value, at, error, what)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{at} must be {_name(annotation)}, got {type(value).__name__} ({value!r:.80})")
        return [_convert(v, args[0], f"{at}[{i}]", error, what) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise error(f"{at} must be {_name(annotation)}, got {type(value).__name__} ({value!r:.80})")
        return {k: _convert(v, args[1], f"{at}.{k}", error, what) for k, v in value.items()} if args else value
    if origin is tuple:  # stored as a JSON list
        if not isinstance(value, (list, tuple)):
            raise error(f"{at} must be {_name(annotation)}, got {type(value).__name__} ({value!r:.80})")
        return tuple(_convert(v, args[0], f"{at}[{i}]", error, what) for i, v in enumerate(value))
    expected = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}.get(annotation, (annotation,))
    if (isinstance(value, bool) and annotation is not bool) or not isinstance(value, expected):
        raise error(f"{at} must be {_name(annotation)}, got {type(value).__name__} ({value!r:.80})")
    return value


def _name(annotation: Any) -> str:
    """``int``, ``list[str]``, ``dict[str, typing.Any]`` as written in the dataclass."""
    if typing.get_origin(annotation) is None and hasattr(annotation, "__name__"):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
