"""The config schema ships inside the package, and config/README.md's key reference is generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bd.errors import ConfigError
from bd.workflow.check import SCHEMA, config_errors, load_schema
from bd.workflow.reference import reference

ROOT = Path(__file__).resolve().parents[2]


def test_the_schema_is_package_data():
    assert SCHEMA.is_file() and SCHEMA.parent.parent == ROOT / "bd"
    assert 'bd = ["schemas/*.yaml"]' in (ROOT / "pyproject.toml").read_text()


def test_config_readme_lists_every_key_as_the_schema_describes_it():
    readme = (ROOT / "config" / "README.md").read_text()
    assert reference() in readme, "config/README.md is stale: run `python -m bd.workflow.reference`"
    for section, node in load_schema()["properties"].items():
        for key in node.get("properties") or {}:
            assert f"| `{section}.{key}` |" in readme


def test_a_missing_schema_is_an_error_not_a_skipped_check(tmp_path):
    with pytest.raises(ConfigError, match="schema is missing"):
        config_errors({"results": "x"}, tmp_path / "none.yaml")
