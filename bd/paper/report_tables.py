"""Tables as self-contained HTML pages, so that the Snakemake report shows them as tables.

Snakemake's HTML report (8.x, 9.x) displays images, PDFs and HTML files of a ``report()`` item in
the page; any other file type (``.csv``, ``.tsv``, ``.md``) is only a download link. The workflow
therefore marks an HTML rendering of each table for the report (the CSV/TSV stays beside it for
programs to read). ``bd report-table --table FILE --out FILE.html`` writes one page from CSV, TSV
or a Markdown pipe table (with the paragraphs around it, e.g. Table I's footnote). Standard
library only: the command starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import csv
import html
import re
from pathlib import Path

from bd.errors import BDError
from bd.io import write_text

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 13px; margin: 12px; }
table { border-collapse: collapse; margin: 8px 0 16px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
p.note { color: #444; max-width: 60em; }
"""
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?%?$|^[+-]?\d+(\.\d+)? ± \d+(\.\d+)?$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """HTML of a Markdown cell or line: escaped, with **bold** and `code` kept."""
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<b>\1</b>", html.escape(text.strip())))


def _cell(tag: str, text: str) -> str:
    plain = _BOLD.sub(r"\1", text.strip())
    cls = ' class="num"' if tag == "td" and _NUMBER.match(plain) else ""
    return f"<{tag}{cls}>{_inline(text)}</{tag}>"


def table_html(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    """One HTML table; numeric cells right-aligned."""
    head = "".join(_cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(_cell("td", c) for c in row) + "</tr>\n" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n"


def read_delimited(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV (``.csv``) or TSV (any other suffix) file."""
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh, delimiter=delimiter))
    except OSError as exc:
        raise BDError(f"{path}: {exc.strerror or exc}") from exc
    if not rows:
        raise BDError(f"{path}: empty table (no header row)")
    width = len(rows[0])
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != width:
            raise BDError(f"{path}: row {i} has {len(row)} fields, the header {width}")
    return rows[0], rows[1:]


def _split_row(line: str) -> list[str]:
    return [c for c in line.strip().strip("|").split("|")]


def markdown_html(text: str, source: str = "markdown") -> str:
    """HTML of Markdown holding pipe tables and plain paragraphs (what ``bd aggregate`` writes)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            if len(block) < 2 or not re.fullmatch(r"[\s|:-]+", block[1]):
                raise BDError(f"{source}: a pipe table needs a header and a |---| line")
            header, rows = _split_row(block[0]), [_split_row(b) for b in block[2:]]
            out.append(table_html(header, rows))
            continue
        if line.strip().startswith("#"):
            out.append(f"<h3>{_inline(line.strip().lstrip('#'))}</h3>")
        elif line.strip():
            out.append(f'<p class="note">{_inline(line)}</p>')
        i += 1
    return "\n".join(out)


def page(title: str, body: str) -> str:
    """A self-contained HTML page (inline style, no scripts)."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n")


def render(path: Path) -> str:
    """HTML body of one table file: Markdown (``.md``), CSV or TSV."""
    if not path.exists():
        raise BDError(f"{path}: no such table")
    if path.suffix.lower() == ".md":
        return markdown_html(path.read_text(encoding="utf-8"), str(path))
    header, rows = read_delimited(path)
    if not rows:
        return table_html(header, []) + '<p class="note">(no rows)</p>'
    return table_html(header, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", action="append", required=True, type=Path,
                        help="table file (.csv, .tsv or Markdown .md); repeat for several on one page")
    parser.add_argument("--out", required=True, type=Path, help="HTML page to write")
    parser.add_argument("--title", default=None, help="page title (default: the first table's file name)")


def run(args: argparse.Namespace) -> int:
    title = args.title or args.table[0].name
    body = "\n".join((f"<h3>{html.escape(t.name)}</h3>\n" if len(args.table) > 1 else "") + render(t)
                     for t in args.table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, page(title, body))
    return 0
