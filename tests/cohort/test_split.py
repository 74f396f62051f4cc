"""Patient splits: official split files, the seeded stratified split, folds, and their errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bd.cli import main
from bd.errors import ConfigError, TableError
from bd.cohort.split import SplitParams, make_split, read_id_file, read_split, stratified_split


def _cohort(n_neg: int, n_pos: int, n_unlabelled: int = 0) -> tuple[list[str], dict[str, int | None]]:
    ids = [f"P{i}" for i in range(n_neg + n_pos + n_unlabelled)]
    labels = [0] * n_neg + [1] * n_pos + [None] * n_unlabelled
    return ids, dict(zip(ids, labels, strict=True))


def _check_ratios(split: pd.DataFrame, labels: dict[str, int | None], test: float, val: float) -> None:
    """Disjoint, every labelled patient once, each class within one patient of its share."""
    labelled = {p for p, y in labels.items() if y is not None}
    assert split.patient_id.is_unique
    assert set(split.patient_id) == labelled
    share = {"test": test, "val": (1 - test) * val, "train": (1 - test) * (1 - val)}
    for label in (0, 1):
        n = sum(1 for y in labels.values() if y == label)
        for name, frac in share.items():
            got = int(((split.split == name) & (split.label == label)).sum())
            assert abs(got - n * frac) <= 1, (name, label, got, n * frac)


@pytest.mark.parametrize("n_neg, n_pos", [(655, 403), (40, 20), (7, 3), (1, 1)])
def test_random_split_is_stratified_disjoint_and_complete(n_neg, n_pos):
    ids, labels = _cohort(n_neg, n_pos, n_unlabelled=3)
    split, excluded = make_split(ids, labels, SplitParams(mode="random", seed=1))
    _check_ratios(split, labels, 0.2, 0.2)
    assert excluded["unlabelled"] == 3
    assert list(split.columns) == ["patient_id", "split", "label"]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 80), st.integers(0, 80), st.floats(0.05, 0.5), st.floats(0.05, 0.5), st.integers(0, 10**6))
def test_random_split_keeps_class_ratios_for_any_cohort(n_neg, n_pos, test, val, seed):
    ids, labels = _cohort(n_neg, n_pos)
    split = pd.DataFrame(
        [(p, s, labels[p]) for p, s in stratified_split(labels, test, val, seed).items()],
        columns=["patient_id", "split", "label"],
    )
    _check_ratios(split, labels, test, val)


def test_random_split_is_seeded():
    ids, labels = _cohort(50, 30)
    a, _ = make_split(ids, labels, SplitParams(mode="random", seed=0))
    b, _ = make_split(ids, labels, SplitParams(mode="random", seed=0))
    c, _ = make_split(ids, labels, SplitParams(mode="random", seed=1))
    assert a.equals(b)
    assert not a.equals(c)
    assert (a.split == "test").sum() == 16 and (a.split == "val").sum() == 13


def test_paper_fractions_on_bcnb_sizes():
    ids, labels = _cohort(655, 403)
    split, _ = make_split(ids, labels, SplitParams(mode="random"))
    counts = split.split.value_counts().to_dict()
    assert counts == {"train": 677, "val": 169, "test": 212}


def test_folds_cover_train_and_val_stratified():
    ids, labels = _cohort(43, 21)
    split, _ = make_split(ids, labels, SplitParams(mode="random", folds=5))
    trainval = split[split.split != "test"]
    assert (split.loc[split.split == "test", "fold"] == -1).all()
    assert set(trainval.fold) == set(range(5))
    sizes = trainval.fold.value_counts()
    assert sizes.max() - sizes.min() <= 1
    for label in (0, 1):
        per_fold = trainval[trainval.label == label].fold.value_counts().reindex(range(5), fill_value=0)
        assert per_fold.max() - per_fold.min() <= 1
    with pytest.raises(ConfigError, match="folds: 100 folds but only"):
        make_split(ids, labels, SplitParams(mode="random", folds=100))


def test_params_are_checked():
    with pytest.raises(ConfigError, match="split.test_fraction"):
        SplitParams(test_fraction=1.0)
    with pytest.raises(ConfigError, match="split.folds"):
        SplitParams(folds=1)
    with pytest.raises(ConfigError, match="split_dir: not set"):
        make_split(*_cohort(3, 3), SplitParams(mode="official"), split_dir=None)


# --------------------------------------------------------------------------------------------
# Official split files


def _write_split_files(folder, train, val, test, suffix="\n"):
    folder.mkdir(exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        (folder / f"{name}_id.txt").write_text("\n".join(ids) + suffix)
    return folder


def test_split_files_tolerate_whitespace_blank_lines_and_bom(tmp_path):
    path = tmp_path / "train_id.txt"
    path.write_bytes("\ufeff1\n 2 \r\n\n3\t\n\n\n".encode())
    assert read_id_file(path) == [(1, "1"), (2, "2"), (4, "3")]


def test_official_split_from_files(tmp_path):
    ids, labels = _cohort(6, 4, n_unlabelled=1)  # P10 has no label
    folder = _write_split_files(
        tmp_path / "s", ["P0", "P1", "P2", " P6", "P7"], ["P3", "P8", "P10"], ["P4", "P9"], suffix="\n  \n\n"
    )
    split, excluded = make_split(ids, labels, SplitParams(mode="official", folds=2), str(folder))
    assert dict(zip(split.patient_id, split.split, strict=True)) == {
        "P0": "train", "P1": "train", "P2": "train", "P3": "val", "P4": "test",
        "P6": "train", "P7": "train", "P8": "val", "P9": "test",
    }
    assert excluded == {"unlabelled": 1, "not_in_split_files": 1}  # P5 is in no file
    assert (split.loc[split.split == "test", "fold"] == -1).all()


def test_official_split_errors_name_file_and_id(tmp_path):
    ids, labels = _cohort(4, 4)
    folder = _write_split_files(tmp_path / "a", ["P0", "P1"], ["P2", "X9"], ["P3"])
    with pytest.raises(TableError, match=r"val_id\.txt: line 2: patient 'X9' is not in the clinical table t\.xlsx"):
        make_split(ids, labels, SplitParams(), str(folder), "t.xlsx")
    folder = _write_split_files(tmp_path / "b", ["P0", "P1"], ["P2"], ["P3", "P1"])
    with pytest.raises(TableError, match=r"test_id\.txt: line 2: patient 'P1' is also listed in .*train_id\.txt line 2"):
        make_split(ids, labels, SplitParams(), str(folder))
    (folder / "val_id.txt").unlink()
    with pytest.raises(TableError, match=r"split file .*val_id\.txt does not exist"):
        make_split(ids, labels, SplitParams(), str(folder))


def test_read_split_checks_its_columns(tmp_path):
    path = tmp_path / "split.tsv"
    path.write_text("patient_id\tsplit\tlabel\n007\ttrain\t1\n8\tvalid\t0\n")
    with pytest.raises(TableError, match=r"row 3, column 'split': 'valid'"):
        read_split(path)
    path.write_text("patient_id\tsplit\tlabel\n007\ttrain\t1\n8\ttest\t0\n")
    assert list(read_split(path).patient_id) == ["007", "8"]


def test_split_command_random_mode_needs_no_split_dir(tmp_path, capsys):
    table = tmp_path / "t.csv"
    rows = [(i, "N0" if i % 3 else "N+(1-2)", 50) for i in range(1, 31)] + [(31, "", 40)]
    pd.DataFrame(rows, columns=["Patient ID", "ALN status", "Age(years)"]).to_csv(table, index=False)
    out = tmp_path / "split.tsv"
    code = main(["split", "--table", str(table), "--split-dir", "", "--out", str(out),
                 "--params", json.dumps({"mode": "random", "seed": 3, "folds": 3}), "--clinical", "{}"])
    assert code == 0
    assert "excluded: 1 unlabelled" in capsys.readouterr().out
    split = read_split(out)
    assert len(split) == 30 and set(split.columns) == {"patient_id", "split", "label", "fold"}
    assert main(["split", "--table", str(table), "--out", str(out), "--params", '{"mode": "official"}']) == 2
    assert "split_dir: not set" in capsys.readouterr().err


def test_split_file_ids_match_the_table_in_any_spelling(tmp_path):
    """001, 1.0 and 1 are one id in the split files as in the table and the sample sheet."""
    folder = _write_split_files(tmp_path / "s", ["001", "2.0"], ["3"], ["0004"])
    ids = ["1", "2", "3", "4"]
    split, _ = make_split(ids, dict(zip(ids, [0, 1, 0, 1])), SplitParams(mode="official"), str(folder))
    assert dict(zip(split.patient_id, split.split)) == {"1": "train", "2": "train", "3": "val", "4": "test"}
