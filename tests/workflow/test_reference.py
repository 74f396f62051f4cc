"""The config schema ships inside the package, and config/README.md's key reference is generated from
it: every key the schema knows is documented there (with a description), and no key the README
names is unknown to the schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
    assert reference() in readme, "config/README.md is stale: run `bd schema --out bd/schemas/config.schema.yaml --readme config/README.md`"
    for key in _keys(load_schema()):
        assert f"| `{key}` |" in readme


def test_a_missing_schema_is_an_error_not_a_skipped_check(tmp_path):
    with pytest.raises(ConfigError, match="schema is missing"):
        config_errors({"results": "x"}, tmp_path / "none.yaml")


def _keys(node: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every key of a schema node, nested sections included (``evaluation.figures.roc_rates``)."""
    out = {}
    for key, sub in (node.get("properties") or {}).items():
        out[prefix + key] = sub
        out.update(_keys(sub, f"{prefix}{key}."))
    return out


def test_every_key_has_a_description():
    """The schema's description is the one description of a key (the dataclass's param())."""
    missing = [key for key, node in _keys(load_schema()).items() if not node.get("description")]
    assert not missing, f"keys without a description: {missing}"


def test_config_readme_names_no_unknown_key():
    """The sections table lists exactly the schema's sections, and every dotted key the README names
    (`tiling.use_annotations`) is a key of the schema."""
    readme = (ROOT / "config" / "README.md").read_text()
    keys = _keys(load_schema())
    sections = {k for k in keys if "." not in k}
    table = readme.split("## Sections", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(sections) and len(listed) == len(set(listed))
    named = {m for m in re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9]+)+)`", readme) if m.split(".")[0] in sections}
    assert named, "the README names no key: the pattern above is wrong"
    assert not named - set(keys), f"config/README.md names keys the schema does not know: {sorted(named - set(keys))}"
