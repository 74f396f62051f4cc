"""The raw clinical table (CSV, TSV or XLSX) read and checked: patient ids (present, unique) and labels
(known values or blank), with the spreadsheet's row numbers for every error; and the ``clinical``
config section (:class:`ClinicalParams`) that says which columns are which. Read by ``bd split``,
``bd check`` and ``bd clinical`` (whose normalisation is :mod:`bd.cohort.clinical`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from bd.cohort import values as V
from bd.cohort.encoding import ENCODERS
from bd.errors import ConfigError, TableError
from bd.params import param


# Valid ranges of numeric features, in parsed units (a percentage is a fraction: Ki67 30 % is 0.3).
# A value outside is an error naming row and column, or (out_of_range: missing) a missing value,
# counted in summary.csv and by `bd check`. Configurable with clinical.ranges (column -> [min, max]).
DEFAULT_RANGES: dict[str, list[float]] = {
    "Age(years)": [18.0, 100.0],
    "Tumour Size(cm)": [0.1, 20.0],
    "Ki67": [0.0, 1.0],
}


@dataclass
class ClinicalParams:
    """The clinical table's columns, labels and model inputs (`bd clinical`, `bd split`)."""

    id_column: str = param("Patient ID", description="the patient-id column")
    label_column: str = param("ALN status", description="the label column")
    positive_values: list[str] = param(default_factory=lambda: ["N+(1-2)", "N+(>2)"], min_items=1, unique_items=True,
                                       description="label values of N+ (class 1)")
    negative_values: list[str] = param(default_factory=lambda: ["N0"], min_items=1, unique_items=True,
                                       description="label values of N0 (class 0)")
    feature_set: Literal["paper", "extended", "custom"] = param(
        "paper", description="paper: age, size, ER, PR, HER2; extended: + Ki67, HER2 expression, grade, tumour type, "
                             "molecular subtype; custom: the features mapping")
    features: dict[str, str] = param(default_factory=dict, choices=ENCODERS,
                                     description="feature_set custom: column -> kind")
    impute: Literal["median", "zero"] = param("median", description="fill value of a missing numeric feature")
    missing_indicator: bool = param(True, description="add a missing-value indicator column per feature")
    ranges: dict[str, list[float]] = param(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_RANGES.items()}, min_items=2, max_items=2,
        description="numeric feature column -> [min, max] valid range in parsed units (a percentage is a fraction)")
    out_of_range: Literal["error", "missing"] = param(
        "error", description="a value outside its range: an error naming its row and column, or treated as missing")

    def __post_init__(self) -> None:
        for column, bounds in self.ranges.items():
            if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
                raise ConfigError(f"clinical.ranges.{column}: {bounds!r} is not [min, max] with min <= max")

    def range_of(self, column: str) -> list[float] | None:
        """The valid [min, max] of ``column`` (matched ignoring case and whitespace), or None."""
        key = V.category_key(column)
        return next(([float(a), float(b)] for c, (a, b) in self.ranges.items() if V.category_key(c) == key), None)


TABLE_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig"),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8-sig"),
    ".xlsx": lambda p: pd.read_excel(p, dtype=object, na_filter=False, engine="openpyxl"),
}


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The raw table as object cells, column names cleaned, fully blank rows dropped; the index is
    the spreadsheet row number (header = row 1)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"clinical table {path} does not exist")
    reader = TABLE_READERS.get(path.suffix.lower())
    if reader is None:
        raise TableError(f"{path}: unsupported table type {path.suffix!r}; use one of {sorted(TABLE_READERS)}")
    try:
        frame = reader(path)
    except UnicodeDecodeError as exc:
        raise TableError(f"{path}: not UTF-8 text ({exc.reason}); save the table as UTF-8 CSV or XLSX") from exc
    except Exception as exc:  # openpyxl/zipfile/pandas raise many types for a corrupt file
        raise TableError(f"{path}: cannot read the table: {exc}") from exc
    frame.columns = [V.clean_text(c) for c in frame.columns]
    frame.index = np.arange(len(frame)) + 2
    blank = frame.apply(lambda row: all(V.is_missing(v) for v in row), axis=1)
    return frame.loc[~blank] if len(frame) else frame


def find_column(frame: pd.DataFrame, name: str, path: str | os.PathLike[str], what: str = "column") -> str:
    """The table's column called ``name`` (exactly, else ignoring case and whitespace)."""
    if name in frame.columns:
        return name
    matches = [c for c in frame.columns if V.category_key(str(c)) == V.category_key(name)]
    if len(matches) == 1:
        return matches[0]
    raise TableError(f"{path}: no {what} {name!r}; the table has {list(frame.columns)}")


@dataclass
class ClinicalTable:
    """A clinical table read and checked: patient ids and labels, with the spreadsheet rows."""

    path: Path
    frame: pd.DataFrame  # raw cells, index = spreadsheet row
    ids: list[str]
    labels: list[int | None]  # None: no label (excluded from splits)
    id_column: str
    label_column: str

    def rows_by_id(self) -> dict[str, int]:
        return dict(zip(self.ids, self.frame.index, strict=True))

    def labelled(self) -> dict[str, int]:
        return {i: y for i, y in zip(self.ids, self.labels, strict=True) if y is not None}


def _label_keys(values: Sequence[str]) -> set[str]:
    return {V.category_key(V.clean_text(v)) for v in values}


def parse_label(value: Any, params: ClinicalParams) -> int | None:
    """1 for a positive value, 0 for a negative one, None for a blank cell."""
    if V.is_missing(value):
        return None
    key = V.category_key(V.clean_text(value))
    if key in _label_keys(params.positive_values):
        return 1
    if key in _label_keys(params.negative_values):
        return 0
    raise V.ValueParseError(
        f"{value!r} is not a known label: positive {params.positive_values}, negative {params.negative_values}"
    )


def load_table(path: str | os.PathLike[str], params: ClinicalParams) -> ClinicalTable:
    """Read ``path``; check ids (present, unique) and labels (known values or blank)."""
    path = Path(path)
    frame = read_table(path)
    id_col = find_column(frame, params.id_column, path, "id column (clinical.id_column)")
    label_col = find_column(frame, params.label_column, path, "label column (clinical.label_column)")
    ids = [V.normalise_id(v) for v in frame[id_col]]
    seen: dict[str, int] = {}
    for row, pid in zip(frame.index, ids, strict=True):
        if not pid:
            raise TableError(f"{path}: row {row}, column {id_col!r}: the patient id is empty")
        if pid in seen:
            raise TableError(f"{path}: rows {seen[pid]} and {row}, column {id_col!r}: duplicate patient id {pid!r}")
        seen[pid] = row
    labels = [_parse_cell(parse_label, v, path, row, label_col, params) for row, v in frame[label_col].items()]
    return ClinicalTable(path, frame, ids, labels, id_col, label_col)


def _parse_cell(parser: Callable[..., Any], value: Any, path: Path, row: int, column: str, *extra: Any) -> Any:
    try:
        return parser(value, *extra)
    except V.ValueParseError as exc:
        raise TableError(f"{path}: row {row}, column {column!r}: {exc}") from exc
