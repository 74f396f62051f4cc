"""config/README.md's key reference, generated from the config schema (bd/schemas, itself generated
from the params dataclasses by bd/workflow/schema.py): each key's type, range and description as
declared once. ``bd schema --out bd/schemas/config.schema.yaml --readme config/README.md`` (or
``python -m bd.workflow.reference`` for the README alone) rewrites it, and a test fails when the
README and the schema disagree."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bd.io import write_text
from bd.workflow.check import SCHEMA, load_schema

BEGIN = ("<!-- keys: generated from the params dataclasses by `bd schema --out bd/schemas/config.schema.yaml "
         "--readme config/README.md`; do not edit -->")
END = "<!-- end of keys -->"
RANGES = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
          ("minItems", "items ≥"))


def _type(node: dict[str, Any]) -> str:
    """A key's type as text: its JSON types, its allowed values and its range."""
    if "oneOf" in node or "anyOf" in node:
        return " or ".join(_type(n) for n in node.get("oneOf", node.get("anyOf")))
    kinds = node.get("type", "any")
    text = " or ".join(kinds) if isinstance(kinds, list) else str(kinds)
    if "enum" in node:
        text += ": " + ", ".join(f"`{v}`" for v in node["enum"])
    if isinstance(node.get("items"), dict):
        text += " of " + _type(node["items"])
    limits = [f"{sign} {node[key]}" for key, sign in RANGES if key in node]
    return text + (f" ({', '.join(limits)})" if limits else "")


def _escape(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def reference(schema: dict[str, Any] | None = None) -> str:
    """The Markdown table of every config key: type, allowed values, range, description."""
    schema = schema or load_schema(SCHEMA)
    rows = ["| key | type | description |", "|---|---|---|"]
    rows += _rows(schema, "")
    return "\n".join([BEGIN, *rows, END])


def _rows(node: dict[str, Any], prefix: str) -> list[str]:
    """One row per key of ``node``, each followed by the rows of its own keys (nested sections)."""
    rows = []
    for key, sub in (node.get("properties") or {}).items():
        rows.append(f"| `{prefix}{key}` | {_escape(_type(sub))} | {_escape(sub.get('description', ''))} |")
        rows += _rows(sub, f"{prefix}{key}.")
    return rows


def rewrite(readme: Path, schema: dict[str, Any] | None = None) -> bool:
    """Put the generated reference between the markers of ``readme``; True when it changed."""
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + reference(schema) + text[end:]
    if new != text:
        write_text(readme, new)
    return new != text


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "config/README.md")
    print(f"{path}: {'rewritten' if rewrite(path) else 'up to date'}")
