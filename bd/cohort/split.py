"""Patient-level train/val/test split: BCNB's official split files, or a seeded stratified split.

``bd split`` writes ``split.tsv`` with ``patient_id``, ``split`` (train/val/test), ``label`` (0/1)
and, when ``folds`` is set, ``fold`` (0..k-1 over train+val, stratified; -1 for test patients).
Patients without a label are excluded and counted. The random mode follows the paper: 80/20
train/test, then 20 % of the training patients for validation, each stratified by class so that
every split keeps the cohort's class ratio to within one patient per class.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from bd.errors import ConfigError, TableError
from bd.params import check, param
from bd.cohort.values import normalise_id

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FILES = {s: f"{s}_id.txt" for s in SPLITS}


@dataclass
class SplitParams:
    """The patient-level train/val/test split (`bd split`)."""

    mode: Literal["official", "random"] = param(
        "official", description="official: the split files of cohort.split_dir; random: a seeded stratified split")
    seed: int = param(0, description="seed of the random split")
    test_fraction: float = param(0.2, exclusive_minimum=0, exclusive_maximum=1,
                                 description="random split: share of the patients in test")
    val_fraction: float = param(0.2, exclusive_minimum=0, exclusive_maximum=1,
                                description="random split: share of the training patients in validation")
    folds: int | None = param(None, minimum=2, description="cross-validation folds; null: none")

    def __post_init__(self) -> None:
        check(self)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


# --------------------------------------------------------------------------------------------
# Official split files


def read_id_file(path: Path) -> list[tuple[int, str]]:
    """(line number, patient id) of each non-blank line; surrounding whitespace is ignored."""
    if not path.is_file():
        raise TableError(f"split file {path} does not exist (expected {', '.join(SPLIT_FILES.values())})")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise TableError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    return [(n, normalise_id(line)) for n, line in enumerate(lines, start=1) if line.strip()]


def official_split(split_dir: str | os.PathLike[str], table_ids: Sequence[str], table_path: str) -> dict[str, str]:
    """Patient -> split from ``{train,val,test}_id.txt``; every id must be in the table, once."""
    folder = Path(split_dir)
    known = set(table_ids)
    assigned: dict[str, tuple[str, Path, int]] = {}
    for name, file_name in SPLIT_FILES.items():
        path = folder / file_name
        for line, pid in read_id_file(path):
            if pid not in known:
                raise TableError(f"{path}: line {line}: patient {pid!r} is not in the clinical table {table_path}")
            if pid in assigned:
                _, other, other_line = assigned[pid]
                raise TableError(
                    f"{path}: line {line}: patient {pid!r} is also listed in {other} line {other_line}; "
                    "a patient belongs to one split"
                )
            assigned[pid] = (name, path, line)
    return {pid: split for pid, (split, _, _) in assigned.items()}


# --------------------------------------------------------------------------------------------
# Random stratified split and folds


def stratified_split(labels: Mapping[str, int], test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Per class: shuffle (seeded), take round(n * test) for test, then round(rest * val) for val."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for label in sorted(set(labels.values())):
        ids = [pid for pid, y in labels.items() if y == label]
        order = [ids[i] for i in rng.permutation(len(ids))]
        n_test = _round(len(ids) * test_fraction)
        n_val = _round((len(ids) - n_test) * val_fraction)
        for i, pid in enumerate(order):
            out[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return {pid: out[pid] for pid in labels}


def stratified_folds(labels: Mapping[str, int], k: int, seed: int) -> dict[str, int]:
    """Fold 0..k-1 per patient: each class shuffled (seeded) and dealt round-robin, continuing
    across classes so fold sizes differ by at most one."""
    if k > len(labels):
        raise ConfigError(f"split.folds: {k} folds but only {len(labels)} train+val patients")
    rng = np.random.default_rng([seed, k])
    out: dict[str, int] = {}
    dealt = 0
    for label in sorted(set(labels.values())):
        ids = [pid for pid, y in labels.items() if y == label]
        for i in rng.permutation(len(ids)):
            out[ids[i]] = dealt % k
            dealt += 1
    return {pid: out[pid] for pid in labels}


# --------------------------------------------------------------------------------------------
# Building and reading split.tsv


def _official_mode(params: SplitParams, labelled: Mapping[str, int], table_ids: Sequence[str],
                   split_dir: str | None, table_path: str) -> dict[str, str]:
    if not split_dir:
        raise ConfigError("cohort.split_dir: not set, but split.mode is 'official'; set it or use mode: random")
    return official_split(split_dir, table_ids, table_path)


def _random_mode(params: SplitParams, labelled: Mapping[str, int], table_ids: Sequence[str],
                 split_dir: str | None, table_path: str) -> dict[str, str]:
    return stratified_split(labelled, params.test_fraction, params.val_fraction, params.seed)


SPLIT_MODES: dict[str, Callable[..., dict[str, str]]] = {"official": _official_mode, "random": _random_mode}


def make_split(
    table_ids: Sequence[str],
    labels: Mapping[str, int | None],
    params: SplitParams,
    split_dir: str | None = None,
    table_path: str = "clinical table",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The split table (table order) and counts of excluded patients by reason."""
    labelled = {pid: int(y) for pid in table_ids if (y := labels.get(pid)) is not None}
    assigned = SPLIT_MODES[params.mode](params, labelled, table_ids, split_dir, table_path)
    excluded = {
        "unlabelled": sum(1 for pid in table_ids if labels.get(pid) is None),
        "not_in_split_files": sum(1 for pid in labelled if pid not in assigned),
    }
    rows = [(pid, assigned[pid], labelled[pid]) for pid in table_ids if pid in labelled and pid in assigned]
    split = pd.DataFrame(rows, columns=["patient_id", "split", "label"])
    if params.folds:
        trainval = split[split.split != "test"]
        folds = stratified_folds(dict(zip(trainval.patient_id, trainval.label, strict=True)), params.folds, params.seed)
        split["fold"] = [folds.get(pid, -1) for pid in split.patient_id]
    for name in SPLITS:
        present = set(split.label[split.split == name])
        if present != {0, 1}:
            log.warning("split %r has classes %s only: its AUC is undefined", name, sorted(present))
    return split, excluded


def read_split(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and check split.tsv (patient ids as text, labels 0/1, splits train/val/test)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"split table {path} does not exist; run bd split first")
    frame = pd.read_csv(path, sep="\t", dtype={"patient_id": str}, keep_default_na=False)
    missing = [c for c in ("patient_id", "split", "label") if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}")
    for row, rec in enumerate(frame.itertuples(index=False), start=2):
        if rec.split not in SPLITS:
            raise TableError(f"{path}: row {row}, column 'split': {rec.split!r} is not one of {list(SPLITS)}")
        if str(rec.label) not in ("0", "1"):
            raise TableError(f"{path}: row {row}, column 'label': {rec.label!r} is not 0 or 1")
    if frame.patient_id.duplicated().any():
        raise TableError(f"{path}: patient {frame.patient_id[frame.patient_id.duplicated()].iloc[0]!r} appears twice")
    frame["label"] = frame["label"].astype(int)
    return frame


def describe(split: pd.DataFrame, excluded: Mapping[str, int]) -> str:
    """One line: patients per split and class, and the excluded counts."""
    parts = [
        f"{s} {int((split.split == s).sum())} (N0 {int(((split.split == s) & (split.label == 0)).sum())}, "
        f"N+ {int(((split.split == s) & (split.label == 1)).sum())})"
        for s in SPLITS
    ]
    dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in excluded.items() if n)
    return "; ".join(parts) + f"; excluded: {dropped or 'none'}"


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help="clinical table (CSV, TSV or XLSX)")
    parser.add_argument("--split-dir", default="", help="folder with {train,val,test}_id.txt (official mode)")
    parser.add_argument("--out", required=True, help="split.tsv to write")
    parser.add_argument("--params", help="the config's split section (JSON or a YAML/JSON file)")
    parser.add_argument("--clinical", help="the config's clinical section: id and label columns")


def run(args: argparse.Namespace) -> int:
    from bd.cohort.table import ClinicalParams, load_table
    from bd.io import write_text
    from bd.params import build

    params = build(SplitParams, args.params)
    table = load_table(args.table, build(ClinicalParams, args.clinical))
    labels = dict(zip(table.ids, table.labels, strict=True))
    split, excluded = make_split(table.ids, labels, params, args.split_dir or None, str(table.path))
    if not len(split):
        raise TableError(f"{table.path}: no labelled patient is in the split; check clinical.label_column")
    for reason, n in excluded.items():
        if n:
            log.warning("%d patients excluded: %s", n, reason.replace("_", " "))
    write_text(args.out, split.to_csv(sep="\t", index=False))
    print(f"{params.mode} split of {len(split)} patients: {describe(split, excluded)} -> {args.out}")
    return 0
