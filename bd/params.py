"""Stage parameters: a JSON string or a YAML/JSON file, checked against a dataclass so that an
unknown key, a wrong type or a value out of range fails with a message that names the key.

The params dataclasses are the one description of each config key: a field declared with
:func:`param` carries its range, choices and description, which :func:`build` enforces and
:func:`json_schema` writes into the config schema (``bd schema``, bd/workflow/schema.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bd.errors import ConfigError

T = TypeVar("T")
META = "bd"  # the key of a field's metadata that param() fills
PRECISION_CHOICES = ("auto", "bf16", "fp32")  # training.precision, features.precision (bd.device.resolve_precision)
# param()'s keywords -> the JSON-schema keywords they become
WORDS = {"minimum": "minimum", "exclusive_minimum": "exclusiveMinimum", "maximum": "maximum",
         "exclusive_maximum": "exclusiveMaximum", "choices": "enum", "min_items": "minItems",
         "max_items": "maxItems", "unique_items": "uniqueItems"}
NUMBER_LIMITS = {"minimum": (">=", operator.ge), "exclusiveMinimum": (">", operator.gt),
                 "maximum": ("<=", operator.le), "exclusiveMaximum": ("<", operator.lt)}
ARRAY_LIMITS = ("minItems", "maxItems", "uniqueItems")

# Every top-level key of the workflow config, in the config schema's (and config/README.md's)
# order: the params dataclass (``module:Class``) that describes a section, or None for a top-level
# setting described by hand (bd/schemas/workflow-keys.yaml). Strings, so that no stage module is
# imported here.
SECTIONS: dict[str, str | None] = {
    "results": None,
    "on_slide_error": None,
    "train_runs_per_job": None,
    "extract_slides_per_job": None,
    "segment_slides_per_job": None,
    "cohort": "bd.cohort.samples:CohortParams",
    "demo": "bd.demo.params:DemoParams",
    "segmentation": "bd.slides.segment:SegmentParams",
    "tiling": "bd.slides.tiling:TileParams",
    "features": "bd.features.params:FeatureParams",
    "clinical": "bd.cohort.table:ClinicalParams",
    "split": "bd.cohort.split:SplitParams",
    "training": "bd.mil.train:TrainParams",
    "evaluation": "bd.evaluation.evaluate:EvaluationParams",
    "ablations": "bd.paper.experiments:AblationParams",
    "h5_features": "bd.features.h5store:H5FeatureParams",
    "external": "bd.external:ExternalParams",
    "versions": "bd.workflow.versions:VersionParams",
}
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
        fixed = _fixed_length(hint)
        if fixed and len(value) != len(args):
            raise ConfigError(f"key '{key}': expected {len(args)} items, got {value!r}")
        inner = args if fixed else [args[0] if args else Any] * len(value)
        items = [_check_type(f"{key}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, inner))]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r}")
        for name, item in value.items():  # checked, kept as given
            _check_type(f"{key}.{name}", item, args[1] if len(args) == 2 else Any)
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


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s resolved type hints, once per class (the workflow builds a section many times a parse)."""
    return typing.get_type_hints(cls)


def _fixed_length(hint: Any) -> bool:
    """Whether ``hint`` is a tuple of a fixed length (``tuple[float, float]``, not ``tuple[int, ...]``)."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) is tuple and bool(args) and args[-1] is not Ellipsis


def required(f: dataclasses.Field[Any]) -> bool:
    """Whether a params field has no default: the config must give it."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def section_of(cls: type) -> str | None:
    """The config section that params dataclass ``cls`` describes (None: none)."""
    source = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, s in SECTIONS.items() if s == source), None)


def build(cls: type[T], value: str | dict[str, Any] | None, prefix: str | None = None) -> T:
    """Build dataclass ``cls`` from ``value``; unknown keys, wrong types and values outside a
    field's declared range or choices raise ConfigError naming the key (``training.lr``: keys
    are prefixed with the section ``cls`` describes, unless ``prefix`` says otherwise)."""
    if prefix is None:
        section = section_of(cls)
        prefix = f"{section}." if section else ""
    data = read_mapping(value)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(fields))})"
        )
    missing = [name for name, f in fields.items() if required(f) and name not in data]
    if missing:
        raise ConfigError(f"missing key '{prefix}{missing[0]}'")
    hints = _hints(cls)
    kwargs = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    for k, v in kwargs.items():
        _check_limits(prefix + k, v, limits_of(fields[k], enforced=True))
    return cls(**kwargs)


def with_defaults(cls: type, value: str | dict[str, Any] | None, prefix: str | None = None) -> dict[str, Any]:
    """Section ``value``, checked as :func:`build` checks it, with ``cls``'s default for each key it
    leaves out: the workflow reads a section's defaults from its dataclass, never from a copy. Keys
    given keep their value as written (``30``, not ``30.0``), so that the rule commands and rerun
    triggers built from them stay those of the config."""
    built = build(cls, value, prefix)
    return {**{f.name: getattr(built, f.name) for f in dataclasses.fields(built)}, **read_mapping(value)}


# --- one declaration per key: param(), the checks it implies, its JSON schema -----------------


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          description: str = "", minimum: float | None = None, maximum: float | None = None,
          exclusive_minimum: float | None = None, exclusive_maximum: float | None = None,
          choices: typing.Iterable[str] | None = None, min_items: int | None = None,
          max_items: int | None = None, unique_items: bool = False, in_config: bool = True,
          schema_only: typing.Iterable[str] = ()) -> Any:
    """A params dataclass field with its description and allowed values, written once.

    Ranges apply to the numbers of the value (a list's items, a mapping's values), ``choices``
    to its strings, ``min_items``/``max_items``/``unique_items`` to its outermost list. A field
    with ``in_config=False`` is set by the workflow (e.g. an experiment's method), not the config.
    ``schema_only`` names the limits that only the workflow's config needs (``("min_items",)``:
    the workflow needs a rate, the stage command runs with none): the schema has them, build()
    and check() do not enforce them."""
    given = {"minimum": minimum, "exclusive_minimum": exclusive_minimum, "maximum": maximum,
             "exclusive_maximum": exclusive_maximum, "choices": None if choices is None else list(choices),
             "min_items": min_items, "max_items": max_items, "unique_items": unique_items or None}
    meta = {"description": " ".join(description.split()), "in_config": in_config,
            "limits": {WORDS[k]: v for k, v in given.items() if v is not None},
            "schema_only": [WORDS[k] for k in schema_only]}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META: meta})


def limits_of(f: dataclasses.Field[Any], enforced: bool = False) -> dict[str, Any]:
    """The JSON-schema keywords (minimum, enum, minItems, ...) declared for a field (``enforced``:
    those that build() and check() enforce, without the schema-only ones)."""
    meta = f.metadata.get(META, {})
    skip = meta.get("schema_only", []) if enforced else []
    return {k: v for k, v in meta.get("limits", {}).items() if k not in skip}


def check(obj: Any) -> None:
    """Check every field of a params object against its declared limits (for ``__post_init__``:
    objects made in code are held to the config's ranges too)."""
    section = section_of(type(obj)) or type(obj).__name__
    for f in dataclasses.fields(obj):
        _check_limits(f"{section}.{f.name}", getattr(obj, f.name), limits_of(f, enforced=True))


def _check_limits(key: str, value: Any, limits: dict[str, Any]) -> None:
    """``value`` against ``limits``, placed as :func:`json_schema` places them."""
    if not limits or value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        for word, (sign, holds) in NUMBER_LIMITS.items():
            if word in limits and not holds(value, limits[word]):
                raise ConfigError(f"key '{key}': {value!r} must be {sign} {limits[word]}")
    elif isinstance(value, str):
        if "enum" in limits and value not in limits["enum"]:
            raise ConfigError(f"key '{key}': {value!r} is not one of {limits['enum']}")
    elif isinstance(value, (list, tuple)):
        _check_items(key, value, limits)
        inner = {k: v for k, v in limits.items() if k not in ARRAY_LIMITS}
        for i, item in enumerate(value):
            _check_limits(f"{key}[{i}]", item, inner)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_limits(f"{key}.{name}", item, limits)


def _check_items(key: str, value: list[Any] | tuple[Any, ...], limits: dict[str, Any]) -> None:
    if len(value) < limits.get("minItems", 0):
        raise ConfigError(f"key '{key}': {len(value)} items, at least {limits['minItems']} needed")
    if len(value) > limits.get("maxItems", len(value)):
        raise ConfigError(f"key '{key}': {len(value)} items, at most {limits['maxItems']} allowed")
    if limits.get("uniqueItems"):
        repeated = next((v for i, v in enumerate(value) if v in value[:i]), None)
        if repeated is not None:
            raise ConfigError(f"key '{key}': {repeated!r} is listed twice")


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON schema of params dataclass ``cls``: types from its type hints, ranges, choices and
    descriptions from its :func:`param` fields, unknown keys refused."""
    hints = _hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(META, {})
        if not meta.get("in_config", True):
            continue
        node = _type_node(hints[f.name], limits_of(f))
        properties[f.name] = {**node, **({"description": meta["description"]} if meta.get("description") else {})}
    doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    doc = "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclass's own __doc__: no docstring
    needed = [f.name for f in dataclasses.fields(cls) if required(f)]
    return {"type": "object", "additionalProperties": False, **({"description": doc} if doc else {}),
            **({"required": needed} if needed else {}), "properties": properties}


def _type_node(hint: Any, limits: dict[str, Any]) -> dict[str, Any]:
    """The JSON-schema node of one type hint, with the limits that apply at its level."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return {}
    if origin in (typing.Union, types.UnionType):
        nodes = [_type_node(a, limits) for a in args if a is not type(None)]
        node = nodes[0] if len(nodes) == 1 else {"anyOf": nodes}
        return _nullable(node) if type(None) in args else node
    if origin is typing.Literal:
        return {"type": _json_type(type(args[0])), "enum": list(args)}
    if _fixed_length(hint):  # a pair, ...: an array of exactly that many items
        inner = {k: v for k, v in limits.items() if k not in ARRAY_LIMITS}
        nodes = [_type_node(a, inner) for a in args]
        items = {"items": nodes[0]} if all(n == nodes[0] for n in nodes) else {"prefixItems": nodes, "items": False}
        return {"type": "array", **items, "minItems": len(args), "maxItems": len(args)}
    if origin in (list, tuple):
        inner = {k: v for k, v in limits.items() if k not in ARRAY_LIMITS}
        items = _type_node(args[0] if args else Any, inner)
        return {"type": "array", **({"items": items} if items else {}),
                **{k: limits[k] for k in ARRAY_LIMITS if k in limits}}
    if origin is dict:
        values = _type_node(args[1], limits) if len(args) == 2 else {}
        return {"type": "object", **({"additionalProperties": values} if values else {})}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return json_schema(hint)
    kind = _json_type(hint)
    words = ("enum",) if kind == "string" else tuple(NUMBER_LIMITS) if kind in ("integer", "number") else ()
    return {"type": kind, **{k: limits[k] for k in words if k in limits}}


def _json_type(hint: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if hint not in kinds:
        raise TypeError(f"no JSON type for {hint!r}")
    return kinds[hint]


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` that also accepts null."""
    if "anyOf" in node:
        return {"anyOf": [*node["anyOf"], {"type": "null"}]}
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    out = {**node, "type": [*kinds, "null"]}
    if "enum" in node:
        out["enum"] = [*node["enum"], None]
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a params dataclass (for JSON attributes and checkpoints)."""
    return dataclasses.asdict(obj)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)
