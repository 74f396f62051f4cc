"""Parsers for the raw cell values of a clinical table (BCNB's messy text included).

Every parser takes one raw cell (``str``, ``int``, ``float``, ``None`` or NaN, as pandas/openpyxl
deliver them) and returns the parsed value, ``None`` for a missing cell, or raises
:class:`ValueParseError` whose message says which forms are accepted. Text is NFKC-normalised
first, so full-width digits, ``％``, ``＜``, ``＞``, ``～`` and ``－`` read as their ASCII forms.

Numbers (``parse_number``):
  * plain numbers ``0.3``, ``58``, ``2.5``, ``1e6``;
  * percentages ``30%`` -> 0.30 (a ``%`` divides by 100, so Ki67 written either way agrees);
  * ranges ``30-40%``, ``0.3~0.4``, ``30%–40%`` -> the midpoint (0.35);
  * inequalities ``<5%``, ``＜5%``, ``<=1``, ``>90%``, ``≥2`` -> the bound itself (0.05, 0.01,
    0.90, 2): the value recorded is the only number the pathologist wrote, and the bound is
    closer to the truth than any midpoint we could invent for an open interval.
Binary (``parse_binary``): Positive/Negative, pos/neg, +/-, yes/no, true/false, 1/0 (any case).
Ordinal (``parse_ordinal``): HER2 expression ``0``, ``1+``, ``2+``, ``3+``; grades ``1``..``3``,
  ``Grade 2``, ``G3``, ``II`` -> the integer rank.
Categorical (``parse_category``): the NFKC text with whitespace collapsed; matching is by
  :func:`category_key` (case-insensitive).
Missing: a blank cell, NaN, or one of ``NA``, ``N/A``, ``NaN``, ``None``, ``null`` (any case).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "none", "null"})

_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER = re.compile(rf"^(?P<num>[+-]?{_UNSIGNED}(?:e[+-]?\d+)?)\s*(?P<pct>%)?$")
_RANGE = re.compile(
    rf"^(?P<lo>{_UNSIGNED})\s*(?P<pct_lo>%)?\s*(?:-|–|—|~|〜|to)\s*(?P<hi>{_UNSIGNED})\s*(?P<pct_hi>%)?$"
)
_BOUND = re.compile(rf"^(?P<op><=|>=|=<|=>|<|>|≤|≥|≦|≧)\s*(?P<num>{_UNSIGNED})\s*(?P<pct>%)?$")

_BINARY = {
    **dict.fromkeys(("positive", "pos", "+", "yes", "y", "true", "1", "阳性"), 1.0),
    **dict.fromkeys(("negative", "neg", "-", "no", "n", "false", "0", "阴性"), 0.0),
}
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
_ORDINAL = re.compile(r"^(?:grade|g)?(?P<rank>\d+|i{1,3}|iv)(?P<plus>\+?)$")


class ValueParseError(ValueError):
    """A cell fits none of a parser's accepted forms; the message lists them."""


def is_missing(value: Any) -> bool:
    """True for None, NaN and the blank/NA tokens in :data:`MISSING_TOKENS`."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and clean_text(value).casefold() in MISSING_TOKENS


def clean_text(value: Any) -> str:
    """NFKC-normalised text with surrounding whitespace stripped and inner runs collapsed;
    integral floats (as Excel stores ``1``) print without ``.0``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(unicodedata.normalize("NFKC", str(value)).split())


def parse_number(value: Any) -> float | None:
    """A number, percentage, range (midpoint) or inequality (its bound); see module docstring."""
    if is_missing(value):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = clean_text(value).casefold()
    if match := _NUMBER.match(text):
        return _scaled(float(match["num"]), match["pct"])
    if match := _RANGE.match(text):
        pct = match["pct_lo"] or match["pct_hi"]
        return _scaled((float(match["lo"]) + float(match["hi"])) / 2.0, pct)
    if match := _BOUND.match(text):
        return _scaled(float(match["num"]), match["pct"])
    raise ValueParseError(
        f"{value!r} is not a number: expected e.g. 0.3, 30%, 30-40% (midpoint), <5% or >90% (the bound)"
    )


def _scaled(number: float, percent: str | None) -> float:
    return number / 100.0 if percent else number


def parse_binary(value: Any) -> float | None:
    """1.0 for Positive (pos, +, yes, true, 1), 0.0 for Negative (neg, -, no, false, 0)."""
    if is_missing(value):
        return None
    key = "".join(clean_text(value).casefold().split())
    if key in _BINARY:
        return _BINARY[key]
    raise ValueParseError(f"{value!r} is not binary: expected Positive or Negative (or +/-, yes/no, 1/0)")


def parse_ordinal(value: Any) -> float | None:
    """The integer rank of ``0``/``1+``/``2+``/``3+``, ``1``..``3``, ``Grade 2``, ``G3`` or ``I``..``IV``."""
    if is_missing(value):
        return None
    key = "".join(clean_text(value).casefold().split())
    match = _ORDINAL.match(key)
    if match:
        rank = match["rank"]
        return float(_ROMAN[rank] if rank in _ROMAN else int(rank))
    raise ValueParseError(f"{value!r} is not an ordinal level: expected e.g. 0, 1+, 2+, 3+, 2, Grade 2 or II")


def parse_category(value: Any) -> str | None:
    """The category's text (NFKC, whitespace collapsed); compare categories by :func:`category_key`."""
    if is_missing(value):
        return None
    return clean_text(value)


def category_key(text: str) -> str:
    """Case- and whitespace-insensitive identity of a category or column name."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


_NUMERIC_ID = re.compile(r"^[+-]?\d+(?:\.0*)?$")


def normalise_id(value: Any) -> str:
    """A patient id as text, the same on every side (sample sheet, clinical table, split files):
    an integral number in any spelling (``1``, ``001``, ``1.0``, `` 1 ``, Excel's 1.0) is ``"1"``;
    other ids are their NFKC text; missing is ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = clean_text(value)
    if _NUMERIC_ID.match(text):
        return str(int(text.split(".")[0]))
    return text
