"""Stage parameters: a JSON string or a YAML/JSON file, checked against a dataclass so that an
unknown key or a wrong type fails with a message that names the key."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bd.errors import ConfigError

T = TypeVar("T")
_FLOAT_TEXT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def read_mapping(value: str | dict[str, Any] | None, what: str = "--params") -> dict[str, Any]:
    """Parse ``value``: a dict, a JSON object string, or the path of a YAML/JSON file."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{what}: {value!r} is neither a JSON object nor an existing file")
        text = path.read_text()
    try:
        data = _json_object(text)
        data = yaml.safe_load(text) if data is None else data
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _json_object(text: str) -> Any:
    """``text`` parsed as JSON when it is a JSON object (YAML 1.1 reads JSON's ``1e-05`` as a
    string), else None."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"key '{key}': {value!r} is not of type {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"key '{key}': expected null, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"key '{key}': {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML, Snakemake) reads 1e-4 without a dot as text
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"key '{key}': expected int, got {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=f"{key}.")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"key '{key}': expected {hint.__name__}, got {value!r}")
    return value


def build(cls: type[T], value: str | dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``value``; unknown keys and wrong types raise ConfigError."""
    data = read_mapping(value)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a params dataclass (for JSON attributes and checkpoints)."""
    return dataclasses.asdict(obj)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)
