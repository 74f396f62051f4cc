"""The config schema is generated from the params dataclasses (bd/workflow/schema.py): the committed
bd/schemas/config.schema.yaml is exactly what they generate, and build() and the schema accept and
refuse the same values of every key with a declared range or choices."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from bd.cli import main
from bd.errors import ConfigError
from bd.params import build, limits_of, required
from bd.workflow import schema as S
from bd.workflow.check import SCHEMA

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "bd schema --out bd/schemas/config.schema.yaml --readme config/README.md"


def test_the_committed_schema_is_what_the_dataclasses_generate():
    assert SCHEMA.read_text() == S.render(S.config_schema()), f"the schema is stale or edited by hand: run `{COMMAND}`"


def test_bd_schema_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "config.schema.yaml"
    assert main(["schema", "--out", str(out)]) == 0
    assert out.read_text() == SCHEMA.read_text()
    assert main(["schema"]) == 0
    assert capsys.readouterr().out.endswith(SCHEMA.read_text())


def test_a_generated_section_written_by_hand_too_is_an_error(tmp_path, monkeypatch):
    keys = yaml.safe_load(S.WORKFLOW_KEYS.read_text())
    keys["properties"]["training"] = {"type": "object"}
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(keys))
    monkeypatch.setattr(S, "WORKFLOW_KEYS", tmp_path / "keys.yaml")
    with pytest.raises(ConfigError, match="keys.yaml: properties .*training"):
        S.config_schema()


# word -> a value outside the bound, as an offset from it; an inclusive bound is itself allowed
OUTSIDE = {"minimum": -1, "exclusiveMinimum": 0, "maximum": 1, "exclusiveMaximum": 0}


def _number_kind(hint: Any) -> type | None:
    """int or float when ``hint`` (or one of its union members) is a number."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((a for a in args if a in (int, float)), None)


def _literal_values(hint: Any) -> list[Any]:
    """The string values of the Literal in ``hint`` (a Literal or a union with one)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]


def _scalar_cases() -> list[tuple[str, str, Any, bool]]:
    """(section, key, value, valid) on both sides of every declared bound and choice of a scalar key."""
    cases = []
    for section, cls in S.section_params().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            limits, kind = limits_of(f), _number_kind(hints[f.name])
            if not f.metadata.get("bd", {}).get("in_config", True) or typing.get_origin(hints[f.name]) in (list, dict):
                continue
            for word, offset in OUTSIDE.items():
                if word in limits and kind:
                    bound = kind(limits[word])
                    cases.append((section, f.name, bound + offset, False))
                    if offset:
                        cases.append((section, f.name, bound, True))
            for choice in limits.get("enum") or _literal_values(hints[f.name]):
                cases += [(section, f.name, choice, True), (section, f.name, f"{choice}-not", False)]
    return cases


CONTAINER_CASES = [  # (section, key, value, valid): lists and mappings
    ("segmentation", "pen_colors", ["green", "green"], False), ("segmentation", "pen_colors", ["red"], False),
    ("segmentation", "pen_colors", [], True), ("tiling", "annotation_keys", [], False),
    ("features", "std", [0.2, 0.2, 0.0], False), ("features", "mean", [0.5, 0.5], False),
    ("features", "mean", [0.5, 0.5, 0.5], True), ("clinical", "features", {"Age": "text"}, False),
    ("clinical", "features", {"Age": "numeric"}, True), ("clinical", "ranges", {"Age": [18]}, False),
    ("clinical", "positive_values", [], False), ("training", "methods", ["bd", "bd"], False),
    ("training", "methods", ["bdx"], False), ("training", "seeds", [], False), ("training", "seeds", [0, 1], True),
    ("evaluation", "missing_rates", [0, 101], False), ("evaluation", "curve_rates", [-1], False),
    ("evaluation", "missing_rates", [0, 100], True), ("evaluation", "missing_kinds", {"bd": ["slides"]}, False),
    ("evaluation", "missing_kinds", {"bd": []}, False), ("evaluation", "missing_kinds", {"bd": ["slide"]}, True),
    ("evaluation", "figures", {"roc_rates": [0, 0]}, False), ("evaluation", "figures", {"heatmap_patients": 0}, False),
    ("evaluation", "figures", {"tsne_perplexity": 0}, False), ("evaluation", "figures", {"roc_rates": [50]}, True),
    ("ablations", "directions", ["both", "m2s"], True), ("ablations", "directions", ["sideways"], False),
    ("ablations", "directions", [], False), ("ablations", "lambda_grid", [[0.6, 0.5], [1, 0]], True),
    ("ablations", "lambda_grid", [[0.6]], False), ("ablations", "lambda_grid", [[0.6, 0.5, 0.1]], False),
    ("ablations", "lambda_grid", [[0.6, 0.5], [0.6, 0.5]], False), ("ablations", "prompt_lengths", [0], False),
    ("ablations", "seeds", [], False), ("cohort", "sample_sheet", None, True), ("cohort", "name", 3, False),
]


def _required(cls: type) -> dict[str, Any]:
    """A value for each key the section requires (the cohort's name and clinical table), so that a
    case checks its own key only."""
    return {f.name: "x" for f in dataclasses.fields(cls) if required(f)}


@pytest.mark.parametrize(("section", "key", "value", "valid"), _scalar_cases() + CONTAINER_CASES)
def test_build_and_the_schema_agree(section, key, value, valid):
    """Every key with a declared range or choices: the workflow's schema check (Snakemake, bd check)
    and the stage command's build() take the same values, and refuse the others naming the key."""
    node = yaml.safe_load(SCHEMA.read_text())["properties"][section]
    cls = S.section_params()[section]
    data = {**_required(cls), key: value}
    assert jsonschema.Draft202012Validator(node).is_valid(data) == valid
    if valid:
        build(cls, data)
    else:
        with pytest.raises(ConfigError, match=f"{section}\\.{key}"):
            build(cls, data)


def test_the_workflow_needs_a_curve_rate_bd_evaluate_does_not():
    """A schema-only limit (param(schema_only=...)): the config check has it, the command not."""
    node = yaml.safe_load(SCHEMA.read_text())["properties"]["evaluation"]
    assert not jsonschema.Draft202012Validator(node).is_valid({"curve_rates": []})
    assert build(S.section_params()["evaluation"], {"curve_rates": []}).curve_rates == []


def test_every_bound_is_covered():
    """The scalar cases reach every section that declares a bound (the generator above is not empty)."""
    sections = {s for s, *_ in _scalar_cases()}
    assert sections >= {"cohort", "demo", "segmentation", "tiling", "features", "split", "training", "evaluation",
                        "h5_features", "external", "versions"}
