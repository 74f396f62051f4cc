"""Clinical table normalisation: parse, impute, encode and scale, fitted on the training split only.

``bd clinical`` reads the raw table (CSV or XLSX) and the patient split, and writes

* ``clinical.tsv``: ``patient_id``, ``split``, ``label``, then only model-input columns: one
  standardised float per numeric/binary/ordinal feature, one 0/1 column ``<feature>=<value>`` per
  training category of a categorical feature, and ``<feature>_missing`` 0/1 indicators when
  ``missing_indicator`` is on;
* ``scaler.json``: everything fitted on the training split (medians, means, standard deviations,
  category lists, ordinal levels), read back by :func:`load_transform` so that a new patient's raw
  values go through :meth:`ClinicalTransform.transform_row` exactly as the training rows did;
* ``summary.csv``: patients per split and class, missingness and value ranges per column (a
  report item).

Reading the raw table is :mod:`bd.cohort.table`; feature kinds live in a registry (:data:`ENCODERS`,
:mod:`bd.cohort.encoding`); value parsing is in :mod:`bd.cohort.values`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.cohort import values as V
from bd.cohort.encoding import ENCODERS
from bd.cohort.split import SPLITS
from bd.cohort.table import ClinicalParams, ClinicalTable, find_column, load_table  # noqa: F401  (re-exported)
from bd.errors import ConfigError, TableError

log = logging.getLogger(__name__)

ID_COLUMNS = ["patient_id", "split", "label"]
PRESENT_COLUMN = "clinical_present"  # 0: no clinical value at all (the patient misses clinical data)
FORMAT_VERSION = 1

FEATURE_SETS: dict[str, dict[str, str]] = {
    "paper": {
        "Age(years)": "numeric",
        "Tumour Size(cm)": "numeric",
        "ER": "binary",
        "PR": "binary",
        "HER2": "binary",
    },
}
FEATURE_SETS["extended"] = {
    **FEATURE_SETS["paper"],
    "Ki67": "numeric",
    "HER2 Expression": "ordinal",
    "Histological grading": "ordinal",
    "Tumour Type": "categorical",
    "Molecular subtype": "categorical",
}


LEAKY_COLUMNS: dict[str, str] = {
    "Number of lymph node metastases": "it counts the metastatic axillary nodes, which defines the label",
    "Surgical": "the axillary surgery (sentinel biopsy or dissection) was chosen from the nodal status",
}


# --------------------------------------------------------------------------------------------
# Reading the table


# --------------------------------------------------------------------------------------------
# Features: which columns, and how each kind is parsed, fitted and encoded


def feature_spec(params: ClinicalParams) -> dict[str, str]:
    """Feature column -> kind from the config, with the leakage guard applied."""
    if params.feature_set == "custom":
        if not params.features:
            raise ConfigError("clinical.features: empty, but feature_set is 'custom'; name column: kind pairs")
        spec = dict(params.features)
    else:
        if params.features:
            raise ConfigError(
                f"clinical.features is only read when feature_set is 'custom' (it is {params.feature_set!r}); "
                "set feature_set: custom or remove the features"
            )
        spec = dict(FEATURE_SETS[params.feature_set])
    for column, kind in spec.items():
        if kind not in ENCODERS:
            raise ConfigError(f"clinical.features.{column}: unknown kind {kind!r}; use one of {sorted(ENCODERS)}")
        check_not_leaky(column, params)
    return spec


def check_not_leaky(column: str, params: ClinicalParams) -> None:
    """Refuse a feature column that reveals the label or identifies the patient."""
    reasons = {
        **LEAKY_COLUMNS,
        params.label_column: "it is the label itself",
        params.id_column: "it is the patient id, not a clinical measurement",
    }
    for name, why in reasons.items():
        if V.category_key(column) == V.category_key(name):
            raise ConfigError(f"clinical feature {column!r} cannot be a model input: {why} (label leakage)")


# --------------------------------------------------------------------------------------------
# The fitted transform


@dataclass
class ClinicalTransform:
    """Raw clinical values -> the model-input vector, with every statistic fitted on training rows."""

    features: list[dict[str, Any]]  # per feature: column, kind, and the encoder's fitted state
    missing_indicator: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """Names of the output columns, in order."""
        out: list[str] = []
        for feat in self.features:
            out += ENCODERS[feat["kind"]].columns(feat["column"], feat)
            if self.missing_indicator:
                out.append(f"{feat['column']}_missing")
        return out

    def encode_parsed(self, parsed: Mapping[str, Any]) -> np.ndarray:
        """One patient's parsed values (column -> value or None) as the model-input vector."""
        out: list[float] = []
        for feat in self.features:
            value = parsed.get(feat["column"])
            try:
                out += ENCODERS[feat["kind"]].encode(value, feat)
            except V.ValueParseError as exc:
                raise V.ValueParseError(f"column {feat['column']!r}: {exc}") from exc
            if self.missing_indicator:
                out.append(1.0 if value is None else 0.0)
        return np.asarray(out, dtype=np.float64)

    def parse_row(self, raw: Mapping[str, Any], source: str = "input") -> dict[str, Any]:
        """A new patient's raw values parsed (column -> value or None), with the training ranges:
        out of range is an error naming the column, or missing when the run was trained with
        ``out_of_range: missing``."""
        by_key = {V.category_key(str(k)): v for k, v in raw.items()}
        parsed: dict[str, Any] = {}
        for feat in self.features:
            column = feat["column"]
            value = raw[column] if column in raw else by_key.get(V.category_key(column))
            value = _parse_value(ENCODERS[feat["kind"]].parse, value, source, column)
            bounds = feat.get("range")
            if "out_of_range" not in self.meta and feat["kind"] == "numeric":  # a scaler from before ranges
                bounds = ClinicalParams().range_of(column)
            if not check_range(value, bounds):
                if self.meta.get("out_of_range", "error") == "error":
                    raise TableError(f"{source}: column {column!r}: {value:g} is outside the valid range "
                                     f"{range_text(bounds)} of the training table (clinical.ranges)")
                log.warning("%s: column %r: %g is outside %s: treated as missing", source, column, value,
                            range_text(bounds))
                value = None
            parsed[column] = value
        return parsed

    def transform_row(self, raw: Mapping[str, Any], source: str = "input") -> np.ndarray:
        """A new patient's raw values (table column -> cell; an absent column counts as missing)."""
        parsed = self.parse_row(raw, source)
        try:
            return self.encode_parsed(parsed)
        except V.ValueParseError as exc:
            raise TableError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "missing_indicator": self.missing_indicator,
            "columns": self.columns,
            "features": self.features,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scaler.json") -> ClinicalTransform:
        if data.get("format_version") != FORMAT_VERSION:
            raise TableError(f"{source}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        transform = cls(list(data["features"]), bool(data["missing_indicator"]), dict(data.get("meta", {})))
        if transform.columns != list(data["columns"]):
            raise TableError(f"{source}: the stored column list does not match its features; rerun bd clinical")
        return transform


def _parse_value(parse: Callable[[Any], Any], value: Any, source: str, column: str) -> Any:
    try:
        return parse(value)
    except V.ValueParseError as exc:
        raise TableError(f"{source}: column {column!r}: {exc}") from exc


def load_transform(path: str | os.PathLike[str]) -> ClinicalTransform:
    """The transform ``bd clinical`` saved as scaler.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise TableError(f"{path} does not exist; run bd clinical first") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: not valid JSON ({exc}); rerun bd clinical") from exc
    return ClinicalTransform.from_dict(data, str(path))


# --------------------------------------------------------------------------------------------
# Fitting on a table and a split


@dataclass
class ParsedValues:
    """Every row's parsed value per feature column, with what parsing found wrong."""

    values: dict[str, list[Any]]
    errors: list[str]  # cells that fit no accepted form, or out of range under out_of_range: error
    out_of_range: list[tuple[int, str, float]]  # (row, column, value) of values outside their range
    no_values: list[str]  # patient ids with no feature value at all (missing clinical data)


def check_range(value: Any, bounds: Sequence[float] | None) -> bool:
    """Whether a parsed value lies in its valid range (no range, or a missing value: it does)."""
    return value is None or bounds is None or float(bounds[0]) <= float(value) <= float(bounds[1])


def range_text(bounds: Sequence[float]) -> str:
    return f"{float(bounds[0]):g} to {float(bounds[1]):g}"


def parse_all(table: ClinicalTable, kinds: Mapping[str, str], params: ClinicalParams) -> ParsedValues:
    """Parse every feature cell, never raising: bad cells and out-of-range values are listed
    (out of range becomes missing under ``out_of_range: missing``). `bd clinical` and `bd check`
    both parse through here."""
    values: dict[str, list[Any]] = {}
    errors: list[str] = []
    outside: list[tuple[int, str, float]] = []
    for column, kind in kinds.items():
        bounds = params.range_of(column) if kind == "numeric" else None
        out: list[Any] = []
        for row, raw in table.frame[column].items():
            try:
                value = ENCODERS[kind].parse(raw)
            except V.ValueParseError as exc:
                errors.append(f"{table.path}: row {row}, column {column!r}: {exc}")
                value = None
            if not check_range(value, bounds):
                where = f"row {row}, column {column!r}: {value:g}"
                outside.append((int(row), column, float(value)))
                if params.out_of_range == "error":
                    errors.append(f"{table.path}: {where} is outside the valid range {range_text(bounds)} "
                                  f"(clinical.ranges; or set clinical.out_of_range: missing)")
                value = None
            out.append(value)
        values[column] = out
    no_values = [pid for i, pid in enumerate(table.ids) if all(values[c][i] is None for c in kinds)]
    return ParsedValues(values, errors, outside, no_values)


def parse_features(table: ClinicalTable, kinds: Mapping[str, str],
                   params: ClinicalParams | None = None) -> dict[str, list[Any]]:
    """Every row's parsed value per feature column; every bad cell is named in one error."""
    parsed = parse_all(table, kinds, params or ClinicalParams(ranges={}))
    if parsed.errors:
        more = f" (and {len(parsed.errors) - 20} more)" if len(parsed.errors) > 20 else ""
        raise TableError("; ".join(parsed.errors[:20]) + more)
    return parsed.values


def feature_columns(table: ClinicalTable, params: ClinicalParams) -> dict[str, str]:
    """The table's feature columns (as the table spells them) -> kind."""
    return {find_column(table.frame, n, table.path, "feature column"): k for n, k in feature_spec(params).items()}


def fit_transform(
    table: ClinicalTable, split: pd.DataFrame, params: ClinicalParams
) -> tuple[ClinicalTransform, pd.DataFrame, dict[str, list[Any]]]:
    """Fit on the split's training patients; return the transform, the output table (one row per
    patient of ``split``, in its order) and the parsed values of those patients."""
    kinds = feature_columns(table, params)
    parsed_all = parse_features(table, kinds, params)
    positions = _split_positions(table, split)
    parsed = {c: [values[i] for i in positions] for c, values in parsed_all.items()}
    is_train = (split["split"] == "train").to_numpy()
    if not is_train.any():
        raise TableError("the split has no training patients; nothing to fit the scaler on")
    train = [i for i, t in zip(positions, is_train, strict=True) if t]
    transform = fit_training(table, kinds, train, {c: [parsed_all[c][i] for i in train] for c in kinds}, params)
    rows = [_encode_row(transform, {c: parsed[c][j] for c in kinds}, table, pos) for j, pos in enumerate(positions)]
    # A patient without any clinical value counts as missing clinical data (not as imputed values).
    present = [int(any(parsed[c][j] is not None for c in kinds)) for j in range(len(positions))]
    out = pd.concat(
        [split[ID_COLUMNS].reset_index(drop=True), pd.DataFrame({PRESENT_COLUMN: present}),
         pd.DataFrame(np.vstack(rows), columns=transform.columns)], axis=1
    )
    return transform, out, parsed


def fit_training(
    table: ClinicalTable, kinds: Mapping[str, str], train: Sequence[int], parsed: Mapping[str, list[Any]],
    params: ClinicalParams,
) -> ClinicalTransform:
    """Fit every feature's encoder on the training rows only (table positions ``train``)."""
    features = []
    for column, kind in kinds.items():
        if all(v is None for v in parsed[column]):
            raise TableError(
                f"{table.path}: column {column!r} is blank for all {len(train)} training patients; "
                "fill it in or remove it from the features"
            )
        raw = [table.frame[column].iloc[i] for i in train]
        state = {"column": column, "kind": kind, **ENCODERS[kind].fit(column, raw, parsed[column], params.impute)}
        bounds = params.range_of(column) if kind == "numeric" else None
        features.append({**state, "range": bounds} if bounds else state)
    meta = {
        "out_of_range": params.out_of_range,
        "impute": params.impute,
        "fitted_on": {"split": "train", "patients": len(train)},
        "table": str(table.path),
        "id_column": table.id_column,
        "label_column": table.label_column,
    }
    return ClinicalTransform(features, params.missing_indicator, meta)


def _encode_row(transform: ClinicalTransform, parsed: Mapping[str, Any], table: ClinicalTable, pos: int) -> np.ndarray:
    try:
        return transform.encode_parsed(parsed)
    except V.ValueParseError as exc:
        raise TableError(f"{table.path}: row {table.frame.index[pos]}, {exc}") from exc


def _split_positions(table: ClinicalTable, split: pd.DataFrame) -> list[int]:
    """Table positions of the split's patients; each must exist with the same label."""
    where = {pid: i for i, pid in enumerate(table.ids)}
    positions = []
    for pid, label in zip(split["patient_id"], split["label"], strict=True):
        if pid not in where:
            raise TableError(f"split: patient {pid!r} is not in {table.path}; rerun bd split")
        i = where[pid]
        if table.labels[i] != int(label):
            raise TableError(
                f"split: patient {pid!r} has label {label} but {table.path} row {table.frame.index[i]} says "
                f"{table.labels[i]}; the split is stale, rerun bd split"
            )
        positions.append(i)
    return positions


# --------------------------------------------------------------------------------------------
# Summary (a report item)


def summarise(
    table: ClinicalTable, split: pd.DataFrame, parsed: Mapping[str, list[Any]], kinds: Mapping[str, str],
    out_of_range: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Long table ``section, split, column, statistic, value``: patients per split and class (and
    those without any clinical value), values outside their valid range (treated as missing),
    then missingness and value ranges (raw, parsed units) per feature and split."""
    rows: list[tuple[str, str, str, str, Any]] = []
    groups = {s: (split["split"] == s).to_numpy() for s in SPLITS}
    groups["all"] = np.ones(len(split), dtype=bool)
    labels = split["label"].to_numpy()
    for name, mask in groups.items():
        for label in (0, 1):
            rows.append(("patients", name, f"label={label}", "count", int((mask & (labels == label)).sum())))
        rows.append(("patients", name, "total", "count", int(mask.sum())))
    rows.append(("patients", "excluded", "total", "count", len(table.ids) - len(split)))
    present = [any(parsed[c][j] is not None for c in parsed) for j in range(len(split))]
    rows.append(("patients", "all", "no clinical value", "count", int(len(split) - sum(present))))
    for column, n in (out_of_range or {}).items():
        rows.append(("out_of_range", "all", column, "count", n))
    for column, values in parsed.items():
        for name, mask in groups.items():
            rows += _column_stats(column, kinds[column], [v for v, m in zip(values, mask, strict=True) if m], name)
    return pd.DataFrame(rows, columns=["section", "split", "column", "statistic", "value"], dtype=object)


def _column_stats(column: str, kind: str, values: list[Any], split: str) -> list[tuple[str, str, str, str, Any]]:
    n_missing = sum(v is None for v in values)
    rows = [
        ("missing", split, column, "count", n_missing),
        ("missing", split, column, "fraction", round(n_missing / len(values), 4) if values else 0.0),
    ]
    observed = [v for v in values if v is not None]
    if kind == "categorical":
        names: dict[str, str] = {}
        counts: dict[str, int] = {}
        for v in observed:
            key = V.category_key(v)
            names.setdefault(key, v)
            counts[key] = counts.get(key, 0) + 1
        rows += [("categories", split, f"{column}={names[k]}", "count", counts[k]) for k in sorted(counts)]
    elif observed:
        arr = np.asarray(observed, dtype=float)
        rows += [
            ("range", split, column, stat, round(float(fn(arr)), 4))
            for stat, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("median", np.median))
        ]
    return rows


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help="clinical table (CSV, TSV or XLSX)")
    parser.add_argument("--split", required=True, help="split.tsv from bd split")
    parser.add_argument("--out-dir", required=True, help="folder for clinical.tsv, scaler.json, summary.csv")
    parser.add_argument("--params", help="the config's clinical section (JSON or a YAML/JSON file)")


def run(args: argparse.Namespace) -> int:
    from bd.io import write_json, write_text
    from bd.params import build
    from bd.cohort.split import read_split

    params = build(ClinicalParams, args.params)
    spec = feature_spec(params)
    table = load_table(args.table, params)
    split = read_split(args.split)
    transform, out, parsed = fit_transform(table, split, params)
    kinds = {f["column"]: f["kind"] for f in transform.features}
    out_dir = Path(args.out_dir)
    write_text(out_dir / "clinical.tsv", out.to_csv(sep="\t", index=False))
    write_json(out_dir / "scaler.json", transform.to_dict())
    outside = parse_all(table, kinds, params).out_of_range
    counts = {c: sum(col == c for _, col, _ in outside) for c in kinds}
    write_text(out_dir / "summary.csv", summarise(table, split, parsed, kinds, counts).to_csv(index=False))
    if outside:
        log.warning("%d value(s) outside their valid range treated as missing, e.g. row %d, column %r: %g",
                    len(outside), *outside[0])
    log.info("features %s -> %d columns", list(spec), len(transform.columns))
    print(
        f"{len(out)} patients ({', '.join(f'{s} {int((out.split == s).sum())}' for s in SPLITS)}), "
        f"{len(spec)} features -> {len(transform.columns)} columns in {out_dir / 'clinical.tsv'}"
    )
    return 0
