"""Clinical table normalisation: BCNB's odd values, the leakage guard, training-only fitting, the
saved transform, and the command's outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bd.cohort import values as V
from bd.cli import main
from bd.cohort.clinical import (
    ClinicalParams,
    feature_spec,
    fit_transform,
    load_table,
    load_transform,
)
from bd.errors import ConfigError, TableError
from bd.cohort.split import read_split

# --------------------------------------------------------------------------------------------
# Value parsers


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("0.3", 0.3),
        (0.3, 0.3),
        (58, 58.0),
        ("  2.5 ", 2.5),
        ("30%", 0.30),
        ("30 %", 0.30),
        ("30-40%", 0.35),
        ("30%-40%", 0.35),
        ("30%–40%", 0.35),  # en dash
        ("0.3~0.4", 0.35),
        ("30～40%", 0.35),  # full-width tilde
        ("３０－４０％", 0.35),  # full-width digits, hyphen and percent
        ("＜5%", 0.05),  # full-width less-than: the bound
        ("<1%", 0.01),
        (">90%", 0.90),
        ("＞９０％", 0.90),
        ("<=1", 1.0),
        ("≥2", 2.0),
        ("-1.5", -1.5),
        (".5", 0.5),
    ],
)
def test_parse_number_accepts_bcnb_forms(raw, expected):
    assert V.parse_number(raw) == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["", "   ", None, float("nan"), "NA", "n/a", "NaN", "null"])
def test_blank_cells_are_missing_for_every_kind(raw):
    for parse in (V.parse_number, V.parse_binary, V.parse_ordinal, V.parse_category):
        assert parse(raw) is None


@pytest.mark.parametrize("raw", ["abc", "30-", "1,5", "<", "30%%", "5 cm", "--3", "3+"])
def test_parse_number_rejects_what_fits_no_rule(raw):
    with pytest.raises(V.ValueParseError, match="not a number"):
        V.parse_number(raw)


@pytest.mark.parametrize(
    "raw, expected",
    [("Positive", 1.0), (" negative ", 0.0), ("POSITIVE", 1.0), ("ｐｏｓｉｔｉｖｅ", 1.0), ("Neg", 0.0),
     ("+", 1.0), ("-", 0.0), (1, 1.0), (0.0, 0.0), ("  Negative\t", 0.0)],
)
def test_parse_binary(raw, expected):
    assert V.parse_binary(raw) == expected


@pytest.mark.parametrize("raw", ["maybe", "positive?", "2", "++"])
def test_parse_binary_rejects_other_text(raw):
    with pytest.raises(V.ValueParseError, match="not binary"):
        V.parse_binary(raw)


@pytest.mark.parametrize(
    "raw, expected",
    [("0", 0.0), ("1+", 1.0), ("2+", 2.0), ("3+", 3.0), (" 3 + ", 3.0), ("３＋", 3.0), (0, 0.0), (2.0, 2.0),
     ("2", 2.0), ("II", 2.0), ("iii", 3.0), ("Grade 3", 3.0), ("G1", 1.0)],
)
def test_parse_ordinal_her2_expression_and_grades(raw, expected):
    assert V.parse_ordinal(raw) == expected


@pytest.mark.parametrize("raw", ["high", "2.5", "4++", "+"])
def test_parse_ordinal_rejects_other_text(raw):
    with pytest.raises(V.ValueParseError, match="not an ordinal"):
        V.parse_ordinal(raw)


def test_categories_match_ignoring_case_and_whitespace():
    assert V.parse_category("  Invasive  ductal carcinoma ") == "Invasive ductal carcinoma"
    assert V.category_key("Luminal A") == V.category_key("luminal  a")
    assert V.normalise_id(12.0) == "12" and V.normalise_id(" 7 ") == "7" and V.normalise_id(None) == ""


# --------------------------------------------------------------------------------------------
# A small BCNB-like table

COLUMNS = ["Patient ID", "Age(years)", "Tumour Size(cm)", "Tumour Type", "ER", "PR", "HER2",
           "HER2 Expression", "Histological grading", "Surgical", "Ki67", "Molecular subtype",
           "Number of lymph node metastases", "ALN status"]

ROWS = [
    [1, 45, 2.1, "Invasive ductal carcinoma", "Positive", "Positive", "Negative", "1+", 2, "SLNB", 0.3, "Luminal B", 0, "N0"],
    [2, 60, 3.0, "Invasive lobular carcinoma", "Negative", "negative", "Positive", "3+", "", "ALND", "30-40%", "HER2(+)", 3, "N+(>2)"],
    [3, 52, 1.5, "invasive ductal carcinoma", " positive ", "Positive", "Negative", "0", 3, "SLNB", "＜5%", "Luminal A", 0, "N0"],
    [4, 71, 2.8, "Other type", "Positive", "Negative", "Negative", "2+", 1, "ALND", "<1%", "Luminal A", 1, "N+(1-2)"],
    [5, 38, "", "Invasive ductal carcinoma", "Negative", "Negative", "Negative", "1+", "", "SLNB", ">90%", "Triple negative", 0, "N0"],
    [6, 66, 4.2, "Invasive ductal carcinoma", "Positive", "Positive", "Positive", "3+", 2, "ALND", "３０％", "Luminal B", 2, "N+(1-2)"],
    [7, 49, 1.2, "Invasive lobular carcinoma", "Positive", "Positive", "Negative", "1+", 2, "SLNB", 0.1, "Luminal A", 0, "N0"],
    [8, 57, 2.2, "Invasive ductal carcinoma", "Negative", "Positive", "Negative", "2+", 3, "SLNB", "20%", "Luminal B", 0, ""],
    [9, 63, 3.3, "Invasive ductal carcinoma", "Positive", "Negative", "Positive", "3+", "", "ALND", 0.5, "HER2(+)", 5, "N+(>2)"],
    [10, 55, 2.0, "Other type", "Positive", "Positive", "Negative", "0", 2, "SLNB", 0.15, "Luminal A", 0, "N0"],
]
SPLIT = {"1": "train", "2": "train", "3": "train", "4": "train", "5": "train", "6": "train",
         "7": "val", "9": "test", "10": "test"}  # patient 8 has no label


def write_table(path, rows=ROWS, columns=COLUMNS):
    frame = pd.DataFrame(rows, columns=columns)
    if path.suffix == ".xlsx":
        frame.to_excel(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def split_frame(table, assignment=SPLIT):
    labels = dict(zip(table.ids, table.labels, strict=True))
    rows = [(pid, s, labels[pid]) for pid, s in assignment.items()]
    return pd.DataFrame(rows, columns=["patient_id", "split", "label"])


def extended(**kw):
    return ClinicalParams(feature_set="extended", **kw)


def test_xlsx_and_csv_read_alike_with_ids_and_labels(tmp_path):
    a = load_table(write_table(tmp_path / "t.xlsx"), extended())
    b = load_table(write_table(tmp_path / "t.csv"), extended())
    assert a.ids == b.ids == [str(i) for i in range(1, 11)]
    assert a.labels == b.labels == [0, 1, 0, 1, 0, 1, 0, None, 1, 0]
    assert list(a.frame.index) == list(range(2, 12))  # spreadsheet rows


def test_extended_features_parse_and_encode(tmp_path):
    table = load_table(write_table(tmp_path / "t.xlsx"), extended())
    transform, out, parsed = fit_transform(table, split_frame(table), extended())
    assert parsed["Ki67"][:6] == pytest.approx([0.3, 0.35, 0.05, 0.01, 0.9, 0.3])
    assert parsed["Histological grading"][1] is None
    assert list(out.columns[:3]) == ["patient_id", "split", "label"]
    assert "Tumour Type=Invasive ductal carcinoma" in out.columns  # case variants merged
    assert sum(c.startswith("Tumour Type=") for c in out.columns) == 3
    assert "Histological grading_missing" in out.columns
    assert out.loc[out.patient_id == "2", "Histological grading_missing"].item() == 1.0
    assert out.loc[out.patient_id == "1", "Histological grading_missing"].item() == 0.0
    grade = next(f for f in transform.features if f["column"] == "Histological grading")
    assert grade["levels"] == {"1": 1.0, "2": 2.0, "3": 3.0}
    her2 = next(f for f in transform.features if f["column"] == "HER2 Expression")
    assert her2["levels"] == {"0": 0.0, "1+": 1.0, "2+": 2.0, "3+": 3.0}
    features = out.drop(columns=["patient_id", "split", "label", "clinical_present"])
    assert features.dtypes.map(lambda d: d.kind == "f").all()
    assert not features.isna().any().any()


def test_paper_features_are_the_default(tmp_path):
    assert feature_spec(ClinicalParams()) == {
        "Age(years)": "numeric", "Tumour Size(cm)": "numeric", "ER": "binary", "PR": "binary", "HER2": "binary"
    }
    table = load_table(write_table(tmp_path / "t.xlsx"), ClinicalParams(missing_indicator=False))
    transform, out, _ = fit_transform(table, split_frame(table), ClinicalParams(missing_indicator=False))
    assert transform.columns == ["Age(years)", "Tumour Size(cm)", "ER", "PR", "HER2"]


def test_a_bad_number_names_file_row_and_column(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[3][10] = "about 30"  # patient 4: spreadsheet row 5, column Ki67
    path = write_table(tmp_path / "t.xlsx", rows)
    table = load_table(path, extended())
    with pytest.raises(TableError, match=r"t\.xlsx: row 5, column 'Ki67': 'about 30' is not a number"):
        fit_transform(table, split_frame(table), extended())


def test_a_bad_binary_and_an_unknown_label_are_named(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[6][4] = "unclear"
    table = load_table(write_table(tmp_path / "t.csv", rows), ClinicalParams())
    with pytest.raises(TableError, match=r"row 8, column 'ER': 'unclear' is not binary"):
        fit_transform(table, split_frame(table), ClinicalParams())
    rows[6][4], rows[6][13] = "Positive", "N2"
    with pytest.raises(TableError, match=r"row 8, column 'ALN status': 'N2' is not a known label"):
        load_table(write_table(tmp_path / "t.csv", rows), ClinicalParams())


def test_unknown_category_outside_training_is_an_error(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[8][3] = "Medullary carcinoma"  # patient 9 (test), row 10
    table = load_table(write_table(tmp_path / "t.xlsx", rows), extended())
    with pytest.raises(TableError, match=r"t\.xlsx: row 10, column 'Tumour Type': unknown category 'Medullary carcinoma'"):
        fit_transform(table, split_frame(table), extended())


def test_duplicate_and_empty_ids_are_errors(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[4][0] = 3
    with pytest.raises(TableError, match=r"rows 4 and 6, column 'Patient ID': duplicate patient id '3'"):
        load_table(write_table(tmp_path / "t.csv", rows), ClinicalParams())
    rows[4][0] = ""
    with pytest.raises(TableError, match=r"row 6, column 'Patient ID': the patient id is empty"):
        load_table(write_table(tmp_path / "t.csv", rows), ClinicalParams())


def test_missing_column_is_named(tmp_path):
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(TableError, match=r"no id column \(clinical.id_column\) 'ID'"):
        load_table(path, ClinicalParams(id_column="ID"))
    params = ClinicalParams(feature_set="custom", features={"BMI": "numeric"})
    table = load_table(path, params)
    with pytest.raises(TableError, match=r"no feature column 'BMI'"):
        fit_transform(table, split_frame(table), params)


@pytest.mark.parametrize("column", ["Number of lymph node metastases", "Surgical", "ALN status", "aln  STATUS",
                                    "Patient ID"])
def test_leaky_columns_cannot_be_features(column):
    with pytest.raises(ConfigError, match="cannot be a model input: .*label leakage"):
        feature_spec(ClinicalParams(feature_set="custom", features={"Age(years)": "numeric", column: "numeric"}))


def test_feature_config_errors():
    with pytest.raises(ConfigError, match="unknown kind 'text'"):
        feature_spec(ClinicalParams(feature_set="custom", features={"Age(years)": "text"}))
    with pytest.raises(ConfigError, match="only read when feature_set is 'custom'"):
        feature_spec(ClinicalParams(features={"Age(years)": "numeric"}))
    with pytest.raises(ConfigError, match="empty"):
        feature_spec(ClinicalParams(feature_set="custom"))


def test_scaler_and_imputer_never_see_validation_or_test_rows(tmp_path):
    """Extreme val/test values must not move any fitted statistic or any training row's output.
    Fitting on all rows would shift the age mean by about 300 years and fail this test (the
    valid ranges are off here, so that the implausible ages reach the scaler)."""
    params = extended(ranges={})
    table = load_table(write_table(tmp_path / "a.xlsx"), params)
    _, base_out, _ = fit_transform(table, split_frame(table), params)
    rows = [list(r) for r in ROWS]
    for r in rows:
        if SPLIT.get(str(r[0])) in ("val", "test"):
            r[1], r[2], r[10] = 1000, "", "99%"  # age, size (now missing), Ki67
            r[3] = r[11] = ""  # categoricals missing there
    table = load_table(write_table(tmp_path / "b.xlsx", rows), params)
    transform, out, _ = fit_transform(table, split_frame(table), params)
    train_ages = [r[1] for r in ROWS if SPLIT.get(str(r[0])) == "train"]
    age = next(f for f in transform.features if f["column"] == "Age(years)")
    assert age["mean"] == pytest.approx(np.mean(train_ages))
    assert age["std"] == pytest.approx(np.std(train_ages))
    assert age["median"] == pytest.approx(np.median(train_ages))
    size = next(f for f in transform.features if f["column"] == "Tumour Size(cm)")
    train_sizes = [r[2] for r in ROWS if SPLIT.get(str(r[0])) == "train" and r[2] != ""]
    assert size["median"] == pytest.approx(np.median(train_sizes))
    ttype = next(f for f in transform.features if f["column"] == "Tumour Type")
    assert ttype["fill"] == "Invasive ductal carcinoma"
    is_train = out.split == "train"
    pd.testing.assert_frame_equal(out[is_train], base_out[is_train])
    # the val/test rows go through the training statistics unchanged
    val_age = out.loc[out.patient_id == "7", "Age(years)"].item()
    assert val_age == pytest.approx((1000 - np.mean(train_ages)) / np.std(train_ages))
    val_size = out.loc[out.patient_id == "7", "Tumour Size(cm)"].item()
    assert val_size == pytest.approx((np.median(train_sizes) - size["mean"]) / size["std"])


def test_impute_zero_gives_zero_and_no_category(tmp_path):
    params = extended(impute="zero")
    rows = [list(r) for r in ROWS]
    rows[0][3] = ""
    table = load_table(write_table(tmp_path / "t.csv", rows), params)
    _, out, _ = fit_transform(table, split_frame(table), params)
    row = out[out.patient_id == "1"]
    assert all(row[c].item() == 0.0 for c in out.columns if c.startswith("Tumour Type="))
    assert row["Tumour Type_missing"].item() == 1.0
    assert out.loc[out.patient_id == "5", "Tumour Size(cm)"].item() == pytest.approx(0.0)


def test_transform_row_reproduces_the_table_and_rejects_unknowns(tmp_path):
    params = extended()
    path = write_table(tmp_path / "t.xlsx")
    table = load_table(path, params)
    transform, out, _ = fit_transform(table, split_frame(table), params)
    (tmp_path / "scaler.json").write_text(json.dumps(transform.to_dict()))
    loaded = load_transform(tmp_path / "scaler.json")
    assert loaded.columns == list(out.columns[4:])
    raw = pd.read_excel(path, dtype=object)
    for record in raw.to_dict("records"):
        pid = str(record["Patient ID"])
        if pid in SPLIT:
            expected = out.loc[out.patient_id == pid].iloc[0, 4:].to_numpy(dtype=float)
            np.testing.assert_allclose(loaded.transform_row(record), expected, rtol=0, atol=1e-12)
    partial = loaded.transform_row({"age(years)": "50", "Ki67": "＜5%"})  # absent columns are missing
    assert partial[loaded.columns.index("ER_missing")] == 1.0
    assert partial[loaded.columns.index("Age(years)_missing")] == 0.0
    with pytest.raises(TableError, match="patient X: column 'Tumour Type': unknown category 'Mucinous'"):
        loaded.transform_row({"Tumour Type": "Mucinous"}, source="patient X")
    with pytest.raises(TableError, match="patient X: column 'HER2 Expression': 'strong' is not an ordinal"):
        loaded.transform_row({"HER2 Expression": "strong"}, source="patient X")


def test_no_training_value_is_an_error(tmp_path):
    rows = [list(r) for r in ROWS]
    for r in rows:
        r[2] = "" if SPLIT.get(str(r[0])) == "train" else r[2]
    table = load_table(write_table(tmp_path / "t.csv", rows), ClinicalParams())
    with pytest.raises(TableError, match="'Tumour Size\\(cm\\)' is blank for all 6 training patients"):
        fit_transform(table, split_frame(table), ClinicalParams())


def test_stale_split_is_an_error(tmp_path):
    table = load_table(write_table(tmp_path / "t.csv"), ClinicalParams())
    split = split_frame(table)
    split.loc[0, "label"] = 1
    with pytest.raises(TableError, match="patient '1' has label 1 .* the split is stale"):
        fit_transform(table, split, ClinicalParams())
    with pytest.raises(TableError, match="patient '99' is not in"):
        fit_transform(table, pd.DataFrame([("99", "train", 0)], columns=["patient_id", "split", "label"]),
                      ClinicalParams())


def test_split_and_clinical_commands_write_their_outputs(tmp_path, capsys):
    table = write_table(tmp_path / "t.xlsx")
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for name in ("train", "val", "test"):
        ids = [p for p, s in SPLIT.items() if s == name]
        (split_dir / f"{name}_id.txt").write_text("\n".join(ids) + "\n\n")
    clinical = json.dumps({"feature_set": "extended"})
    assert main(["split", "--table", str(table), "--split-dir", str(split_dir), "--out",
                 str(tmp_path / "split" / "split.tsv"), "--params", '{"mode": "official"}',
                 "--clinical", clinical]) == 0
    assert "1 unlabelled" in capsys.readouterr().out
    split = read_split(tmp_path / "split" / "split.tsv")
    assert dict(zip(split.patient_id, split.split, strict=True)) == {p: s for p, s in SPLIT.items() if p != "8"}
    out_dir = tmp_path / "clinical"
    assert main(["clinical", "--table", str(table), "--split", str(tmp_path / "split" / "split.tsv"),
                 "--out-dir", str(out_dir), "--params", clinical]) == 0
    out = pd.read_csv(out_dir / "clinical.tsv", sep="\t", dtype={"patient_id": str})
    assert list(out.patient_id) == list(split.patient_id)
    assert list(out.columns[4:]) == json.loads((out_dir / "scaler.json").read_text())["columns"]
    summary = pd.read_csv(out_dir / "summary.csv")
    get = summary.set_index(["section", "split", "column", "statistic"])["value"]
    assert get[("patients", "train", "label=1", "count")] == 3
    assert get[("patients", "test", "total", "count")] == 2
    assert get[("patients", "excluded", "total", "count")] == 1
    assert get[("missing", "train", "Histological grading", "count")] == 2
    assert math.isclose(get[("range", "train", "Age(years)", "max")], 71)
    assert get[("categories", "all", "Tumour Type=Invasive ductal carcinoma", "count")] == 5
    bad = main(["clinical", "--table", str(table), "--split", str(tmp_path / "split" / "split.tsv"),
                "--out-dir", str(out_dir), "--params", '{"feature_set": "custom", "features": {"Surgical": "binary"}}'])
    assert bad == 2
    assert "label leakage" in capsys.readouterr().err


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 1000), st.sampled_from(["-", "–", "~", "～", "－", " - "]))
def test_percent_ranges_parse_to_the_midpoint_fraction(a, b, dash):
    lo, hi = a / 10, b / 10
    assert V.parse_number(f"{lo:g}{dash}{hi:g}%") == pytest.approx((lo + hi) / 200)
    assert V.parse_number(f"{lo:g}%") == pytest.approx(lo / 100)


def test_demo_table_gives_the_clinical_only_auc_of_demo_auc(tmp_path, capsys):
    """The foundation's `bd demo-auc` fits StandardScaler + LogisticRegression(max_iter=1000) on
    age, size, ER, PR, HER2 of the official train ids (blanks: training median). Our normalised
    columns are that same standardised matrix, so the same regression on them must reproduce its
    test AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    demo = tmp_path / "demo"
    assert main(["demo", "--params", '{"patients": 300, "seed": 0}', "--out-dir", str(demo), "--tables-only"]) == 0
    assert main(["demo-auc", "--out-dir", str(demo), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table, split_tsv, out_dir = demo / "patient-clinical-data.xlsx", tmp_path / "split.tsv", tmp_path / "clinical"
    assert main(["split", "--table", str(table), "--split-dir", str(demo / "dataset-splitting"),
                 "--out", str(split_tsv), "--params", '{"mode": "official"}', "--clinical", "{}"]) == 0
    assert main(["clinical", "--table", str(table), "--split", str(split_tsv), "--out-dir", str(out_dir),
                 "--params", "{}"]) == 0
    data = pd.read_csv(out_dir / "clinical.tsv", sep="\t", dtype={"patient_id": str})
    x_cols = list(feature_spec(ClinicalParams()))
    train, test = data[data.split == "train"], data[data.split == "test"]
    assert (len(train), len(test), int(test.label.sum())) == (
        expected["n_train"], expected["n_test"], expected["test_positives"])
    model = LogisticRegression(max_iter=1000).fit(train[x_cols].to_numpy(), train.label.to_numpy())
    auc = roc_auc_score(test.label, model.predict_proba(test[x_cols].to_numpy())[:, 1])
    assert auc == pytest.approx(expected["clinical_auc"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# Ids, valid ranges and patients without any clinical value


@pytest.mark.parametrize("spelling", ["1", "001", "1.0", " 1 ", 1, 1.0, "＋1"])
def test_one_id_normalisation_for_every_spelling(spelling):
    assert V.normalise_id(spelling) == "1"
    assert V.normalise_id("A-001") == "A-001" and V.normalise_id("1.5") == "1.5"


def test_out_of_range_value_is_an_error_naming_row_and_column(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[2][1] = 540  # Age(years) of patient 3, row 4 of the sheet
    rows[4][2] = -3  # Tumour Size(cm) of patient 5, row 6
    table = load_table(write_table(tmp_path / "t.xlsx", rows), ClinicalParams())
    with pytest.raises(TableError) as info:
        fit_transform(table, split_frame(table), ClinicalParams())
    assert "row 4, column 'Age(years)': 540 is outside the valid range 18 to 100" in str(info.value)
    assert "row 6, column 'Tumour Size(cm)': -3 is outside the valid range 0.1 to 20" in str(info.value)


def test_out_of_range_as_missing_and_blank_patients_are_counted(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[2][1] = 999  # patient 3: age out of range -> missing
    rows[6][1:3] = ["", ""]  # patient 7 (val): every paper feature blank ...
    rows[6][4:7] = ["", "", ""]
    table_path = write_table(tmp_path / "t.xlsx", rows)
    split = tmp_path / "split.tsv"
    split_frame(load_table(table_path, ClinicalParams())).to_csv(split, sep="\t", index=False)
    params = json.dumps({"out_of_range": "missing"})
    assert main(["clinical", "--table", str(table_path), "--split", str(split), "--out-dir", str(tmp_path / "o"),
                 "--params", params]) == 0
    out = pd.read_csv(tmp_path / "o" / "clinical.tsv", sep="\t", dtype={"patient_id": str}).set_index("patient_id")
    assert out.loc["3", "Age(years)_missing"] == 1.0 and out.loc["3", "clinical_present"] == 1
    assert out.loc["7", "clinical_present"] == 0  # ... so 7 counts as missing clinical data
    assert (out.drop(index="7")["clinical_present"] == 1).all()
    summary = pd.read_csv(tmp_path / "o" / "summary.csv")
    row = summary[(summary.section == "out_of_range") & (summary.column == "Age(years)")]
    assert row["value"].astype(int).tolist() == [1]
    blank = summary[(summary.section == "patients") & (summary.column == "no clinical value")]
    assert blank["value"].astype(int).tolist() == [1]


def test_bags_treat_a_patient_without_clinical_values_as_missing_clinical_data(tmp_path):
    from bd.mil.bags import read_clinical

    path = tmp_path / "c.tsv"
    pd.DataFrame({"patient_id": ["1", "2"], "split": "test", "label": [0, 1], "clinical_present": [1, 0],
                  "Age(years)": [0.1, 0.0]}).to_csv(path, sep="\t", index=False)
    table, columns = read_clinical(path)
    assert columns == ["Age(years)"] and table["clinical_present"].tolist() == [True, False]


def test_predict_applies_the_training_ranges(tmp_path):
    """bd predict's clinical path (clinical_vector): Age 540 or a size of -3 are refused, naming
    the column; no value at all means no clinical data, not imputed values."""
    from types import SimpleNamespace

    from bd.predict import clinical_vector

    table = load_table(write_table(tmp_path / "t.xlsx"), ClinicalParams())
    transform, _, _ = fit_transform(table, split_frame(table), ClinicalParams())
    (tmp_path / "scaler.json").write_text(json.dumps(transform.to_dict()))
    run = SimpleNamespace(scaler={"path": str(tmp_path / "scaler.json")}, clinical_columns=transform.columns)
    good = {"Age(years)": "54", "Tumour Size(cm)": "2.1", "ER": "Positive"}
    assert clinical_vector(run, good, None).shape == (len(transform.columns),)
    with pytest.raises(TableError, match="column 'Age\\(years\\)': 540 is outside the valid range 18 to 100"):
        clinical_vector(run, {**good, "Age(years)": "540"}, None)
    with pytest.raises(TableError, match="column 'Tumour Size\\(cm\\)': -3 is outside"):
        clinical_vector(run, {**good, "Tumour Size(cm)": "-3"}, None)
    assert clinical_vector(run, {"Age(years)": "", "ER": "NA"}, None) is None
