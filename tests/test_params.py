"""bd/params.py's one declaration per key: param() limits enforced by build() and check(), and the
JSON schema json_schema() writes from the type hints and the same limits."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jsonschema
import pytest

from bd.errors import ConfigError
from bd.params import SECTIONS, build, check, json_schema, param, section_of, with_defaults


@dataclasses.dataclass
class _Inner:
    """Inner settings."""

    n: int = param(1, minimum=1, description="a count")


@dataclasses.dataclass
class _Demo:
    """A demo section.

    More text that is not the description."""

    rate: float | None = param(None, exclusive_minimum=0, maximum=1, description="a  rate\n  in (0, 1]")
    mode: Literal["x", "y"] = "x"
    sizes: list[int] = param(default_factory=lambda: [1], minimum=0, min_items=1, unique_items=True)
    kinds: dict[str, list[str]] = param(default_factory=dict, choices=("p", "q"), min_items=1)
    both: int | Literal["auto"] = param("auto", minimum=2)
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    hidden: str = param("h", in_config=False)


def test_json_schema_from_type_hints_and_param_limits():
    assert json_schema(_Demo) == {
        "type": "object", "additionalProperties": False, "description": "A demo section.",
        "properties": {
            "rate": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1, "description": "a rate in (0, 1]"},
            "mode": {"type": "string", "enum": ["x", "y"]},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "uniqueItems": True},
            "kinds": {"type": "object", "additionalProperties": {
                "type": "array", "items": {"type": "string", "enum": ["p", "q"]}, "minItems": 1}},
            "both": {"anyOf": [{"type": "integer", "minimum": 2}, {"type": "string", "enum": ["auto"]}]},
            "inner": {"type": "object", "additionalProperties": False, "description": "Inner settings.",
                      "properties": {"n": {"type": "integer", "minimum": 1, "description": "a count"}}},
        },
    }


@pytest.mark.parametrize(("data", "key"), [
    ({"rate": 0}, "rate"), ({"rate": 1.5}, "rate"), ({"sizes": []}, "sizes"), ({"sizes": [1, 1]}, "sizes"),
    ({"sizes": [2, -1]}, r"sizes\[1\]"), ({"kinds": {"a": ["r"]}}, r"kinds\.a\[0\]"), ({"kinds": {"a": []}}, "kinds.a"),
    ({"kinds": {"a": "p"}}, "kinds.a"), ({"both": 1}, "both"), ({"both": "manual"}, "both"), ({"inner": {"n": 0}}, "inner.n"), ({"mode": "z"}, "mode"),
])
def test_build_and_the_schema_refuse_the_same_values_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        build(_Demo, data)
    assert not jsonschema.Draft202012Validator(json_schema(_Demo)).is_valid(data)


def test_values_on_the_bounds_pass_both():
    data = {"rate": 1, "sizes": [0, 3], "kinds": {"a": ["p", "q"]}, "both": 2, "inner": {"n": 1}, "hidden": "x"}
    assert build(_Demo, data).inner == _Inner(1)
    del data["hidden"]  # set by the workflow, not a config key
    jsonschema.validate(data, json_schema(_Demo))


def test_check_holds_objects_made_in_code_to_the_ranges():
    check(_Demo())
    with pytest.raises(ConfigError, match=r"key '_Demo\.sizes\[0\]': -1 must be >= 0"):
        check(_Demo(sizes=[-1]))


def test_every_section_dataclass_knows_its_section():
    """build() and check() name keys by section (``training.lr``), from the one registry."""
    import importlib

    for name, source in SECTIONS.items():
        if source:
            module, cls = source.split(":")
            assert section_of(getattr(importlib.import_module(module), cls)) == name
    assert section_of(_Demo) is None


def test_errors_of_a_section_name_the_section_key():
    from bd.mil.train import TrainParams

    with pytest.raises(ConfigError, match="key 'training.lr': 0.0 must be > 0"):
        build(TrainParams, {"lr": 0})
    with pytest.raises(ConfigError, match=r"key 'training.methods\[0\]': 'bdx' is not one of"):
        build(TrainParams, {"methods": ["bdx"]})
    with pytest.raises(ConfigError, match="training.patience"):
        TrainParams(patience=0)  # made in code: the same ranges


@dataclasses.dataclass
class _Curves:
    rates: list[float] = param(default_factory=lambda: [0.0], min_items=1, maximum=100, schema_only=("min_items",))


def test_schema_only_limits_are_in_the_schema_not_in_build():
    """The workflow needs a curve rate; the stage command runs with none."""
    node = json_schema(_Curves)["properties"]["rates"]
    assert node["minItems"] == 1 and node["items"] == {"type": "number", "maximum": 100}
    assert build(_Curves, {"rates": []}).rates == []
    with pytest.raises(ConfigError, match=r"rates\[0\]"):
        build(_Curves, {"rates": [101]})


@dataclasses.dataclass(kw_only=True)
class _Pairs:
    name: str = param(description="required: no default")
    grid: list[tuple[float, float]] = param(default_factory=list, min_items=1, unique_items=True)
    mixed: tuple[int, str] = (1, "a")
    rate: float = 0.5


def test_fixed_length_tuples_and_required_keys():
    """A pair is an array of exactly two items on both sides; a field without default is required."""
    schema = json_schema(_Pairs)
    assert schema["required"] == ["name"]
    assert schema["properties"]["grid"] == {"type": "array", "items": {
        "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}, "minItems": 1, "uniqueItems": True}
    assert schema["properties"]["mixed"] == {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                                             "items": False, "minItems": 2, "maxItems": 2}
    assert build(_Pairs, {"name": "x", "grid": [[1, 0.5]], "mixed": [2, "b"]}).grid == [(1.0, 0.5)]
    validator = jsonschema.Draft202012Validator(schema)
    for data, key in [({"name": "x", "grid": [[1.0]]}, r"grid\[0\]"), ({"name": "x", "grid": [[1, 2, 3]]}, r"grid\[0\]"),
                      ({"name": "x", "grid": [[1, 2], [1, 2]]}, "grid"), ({"name": "x", "mixed": ["a", 1]}, r"mixed\[0\]"),
                      ({"grid": [[1, 2]]}, "name")]:
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            build(_Pairs, data)
        assert not validator.is_valid(data)


def test_with_defaults_keeps_the_given_values_as_written():
    """The workflow's view of a section: given keys as the config writes them, the rest the dataclass's defaults."""
    assert with_defaults(_Pairs, {"name": "x", "rate": 1}) == {"name": "x", "grid": [], "mixed": (1, "a"), "rate": 1}
    with pytest.raises(ConfigError, match="key 'cohort.rate'"):
        with_defaults(_Pairs, {"name": "x", "rate": "fast"}, prefix="cohort.")
