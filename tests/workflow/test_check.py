"""Pre-run checks (bd/workflow/check.py): the config against its schema, the sample sheet against the disk
and the clinical table, through ``bd check --config`` and through the workflow's parse step
(``snakemake -n``), which must stop before any job on an error and only warn otherwise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bd import cli
from bd.workflow.check import CHECKS, check_cohort, check_config, prerun, validate_config
from bd.cohort.samples import build_sample_sheet
from bd.errors import ConfigError, SlideError, TableError

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}


def make_cohort(root: Path, slides: dict[str, str], table: dict[str, str | None],
                missing: tuple[str, ...] = (), policy: str = "fail") -> Path:
    """A user's cohort in ``root``: slide files (except ``missing``), sample sheet (slide -> patient),
    clinical table (patient -> label, None for blank), split folder, and a config file for it."""
    (root / "slides").mkdir(parents=True)
    rows = []
    for sid, pid in slides.items():
        path = root / "slides" / f"{sid}.svs"
        if sid not in missing:
            path.write_bytes(b"slide")
        rows.append((sid, pid, str(path)))
    pd.DataFrame(rows, columns=["slide_id", "patient_id", "path"]).to_csv(root / "samples.tsv", sep="\t", index=False)
    pd.DataFrame({"Patient ID": list(table), "Age(years)": 50, "Tumour Size(cm)": 2.5, "ER": "Positive",
                  "PR": "Negative", "HER2": "Negative", "ALN status": [v or "" for v in table.values()]}).to_csv(
        root / "clinical.csv", index=False)
    (root / "split").mkdir()
    labelled = [p for p, label in table.items() if label]  # one labelled patient per split, in turn
    for i, name in enumerate(("train", "val", "test")):
        (root / "split" / f"{name}_id.txt").write_text("".join(f"{p}\n" for p in labelled[i::3]))
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(results=str(root / "results"), on_slide_error=policy)
    config["demo"]["enabled"] = False
    config["cohort"].update(sample_sheet=str(root / "samples.tsv"), clinical_table=str(root / "clinical.csv"),
                            split_dir=str(root / "split"), annotations_dir=None)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# A cohort with one of each finding: S3's patient P9 has no clinical row, P4 has no slide, P5 has
# no label; P2 owns two slides.
SLIDES = {"S1": "P1", "S2": "P2", "S2b": "P2", "S3": "P9", "S5": "P5"}
TABLE = {"P1": "N0", "P2": "N+(>2)", "P4": "N0", "P5": None}


def test_counts_every_finding(tmp_path):
    result = check_cohort(load(make_cohort(tmp_path, SLIDES, TABLE)))
    assert (result.slides, result.patients, result.table_patients) == (5, 4, 4)
    assert result.items("slide_without_clinical_row") == ["S3"]
    assert result.items("patient_without_slide") == ["P4"]
    assert result.items("patient_without_label") == ["P5"]
    assert result.items("patient_not_in_table") == ["P9"]  # the mismatched id itself, not only its slide
    assert not result.errors() and "missing_slide_file" not in result.findings
    table = result.table().set_index("check")
    assert list(table.index[3:]) == list(CHECKS)  # every check has a row, found or not
    assert table.loc["patient_without_slide", "count"] == 1 and table.loc["patient_without_slide", "examples"] == "P4"
    assert table.loc["duplicate_path", "count"] == 0


def test_missing_file_is_an_error_naming_it_under_fail(tmp_path):
    config = load(make_cohort(tmp_path, SLIDES, TABLE, missing=("S2b",)))
    warnings: list[str] = []
    with pytest.raises(SlideError, match="1 slide files that do not exist") as info:
        prerun(config, pd.read_csv(tmp_path / "samples.tsv", sep="\t", dtype=str), warnings.append)
    assert str(tmp_path / "slides" / "S2b.svs") in str(info.value) and "set on_slide_error: skip" in str(info.value)


def test_missing_file_is_recorded_under_skip(tmp_path):
    config = load(make_cohort(tmp_path, SLIDES, TABLE, missing=("S1", "S2b"), policy="skip"))
    warnings: list[str] = []
    result = prerun(config, pd.read_csv(tmp_path / "samples.tsv", sep="\t", dtype=str), warnings.append)
    assert result.missing_slides == ["S1", "S2b"]
    assert result.findings["missing_slide_file"].level == "warning"
    assert result.items("patient_without_usable_slide") == ["P1"]  # P2 still has S2
    assert any(str(tmp_path / "slides" / "S1.svs") in w for w in warnings)
    assert result.table().set_index("check").loc["missing_slide_file", "level"] == "warning"


def test_duplicate_ids_and_paths(tmp_path):
    config = load(make_cohort(tmp_path, SLIDES, TABLE))
    sheet = pd.read_csv(tmp_path / "samples.tsv", sep="\t", dtype=str)
    sheet.loc[len(sheet)] = ["S1", "P1", sheet.path[0]]
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    with pytest.raises(TableError, match=r"duplicate slide_id 'S1' in rows \[2, 7\]"):
        check_cohort(config)

    sheet.loc[5, "slide_id"] = "S1-again"  # the same file under another id: a warning
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    assert check_cohort(config).items("duplicate_path") == ["S1", "S1-again"]

    table = pd.read_csv(tmp_path / "clinical.csv", dtype=str, keep_default_na=False)
    pd.concat([table, table.iloc[[1]]]).to_csv(tmp_path / "clinical.csv", index=False)
    with pytest.raises(TableError, match=r"rows 3 and 6, column 'Patient ID': duplicate patient id 'P2'"):
        check_cohort(config)


def test_validate_config_names_the_key():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate_config(config)
    with pytest.raises(ConfigError, match=r"unknown key 'tiling.patchsize' \(known keys of tiling: .*patch_size"):
        validate_config({**config, "tiling": {**config["tiling"], "patchsize": 64}})
    with pytest.raises(ConfigError, match="key 'split.seed': 'one' is not of type 'integer'"):
        validate_config({**config, "split": {**config["split"], "seed": "one"}})
    with pytest.raises(ConfigError, match="'cohort' is a required property"):
        validate_config({k: v for k, v in config.items() if k != "cohort"})


def test_demo_config_skips_path_checks(tmp_path, monkeypatch):
    """At parse time the demo's slides and table do not exist yet: nothing is read or missing."""
    monkeypatch.chdir(tmp_path)
    result = check_cohort(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    assert result.slides == 80 and result.table_patients is None and not result.findings


def test_bd_check_command(tmp_path, capsys):
    config = make_cohort(tmp_path, SLIDES, TABLE)
    assert cli.main(["check", "--config", str(config), "--out", str(tmp_path / "checks.tsv")]) == 0
    out = capsys.readouterr().out
    assert "5 slides, 4 patients, 4 clinical rows: 4 warning(s), no error" in out
    assert "1 patient ids of the sample sheet that the clinical table does not have" in out and "P9" in out
    assert "1 patients without a label" in out and "P5" in out
    assert pd.read_csv(tmp_path / "checks.tsv", sep="\t").set_index("check").loc["patient_without_label", "count"] == 1

    (tmp_path / "slides" / "S1.svs").unlink()
    assert cli.main(["check", "--config", str(config)]) == 2
    assert f"{tmp_path / 'slides' / 'S1.svs'}" in capsys.readouterr().err

    bad = load(config)
    bad["training"]["epochs"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert cli.main(["check", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key 'training.epochs'" in capsys.readouterr().err


def dry_run(config: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(config.parent), "--configfile", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=config.parent, timeout=300)


def test_workflow_stops_on_a_missing_slide_before_any_job(tmp_path):
    proc = dry_run(make_cohort(tmp_path, SLIDES, TABLE, missing=("S5",)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and str(tmp_path / "slides" / "S5.svs") in text, text[-3000:]
    assert "Job stats" not in text


def test_workflow_warns_and_leaves_missing_slides_out_under_skip(tmp_path):
    proc = dry_run(make_cohort(tmp_path, SLIDES, TABLE, missing=("S5",), policy="skip"))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    for line in ("cohort check: 1 slide files that do not exist", "cohort check: 1 patients of the clinical table "
                 "with no slide", "cohort check: 1 patients without a label"):
        assert line in text
    assert "results/segment/S1/mask.png" in text and "results/segment/S5/" not in text  # no job for S5
    assert "slide_qc" in text


def test_check_merges_config_files_like_snakemake(tmp_path, capsys):
    """``bd check --config base overlay``: the overlay's sections merge over the base's (as with
    snakemake's --configfile), so a partial config such as config/bcnb.yaml can be checked."""
    from bd.workflow.check import merge_configs

    assert merge_configs({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}, "c": 4}) == {
        "a": {"x": 1, "y": 3}, "b": 1, "c": 4}
    root = Path(__file__).resolve().parents[2]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"demo: {{enabled: false}}\ncohort: {{name: x, clinical_table: {tmp_path}/none.xlsx}}\n")
    assert cli.main(["check", "--config", str(root / "config" / "config.yaml"), str(overlay)]) == 2
    assert "cohort.clinical_table" in capsys.readouterr().err  # the merged config passed the schema


# ---------------------------------------------------------------- config lists, floats, all errors


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("training", "seeds", [], "key 'training.seeds': the list is empty"),
    ("training", "seeds", [0, 0], "key 'training.seeds': 0 is listed twice"),
    ("training", "methods", [], "key 'training.methods': the list is empty"),
    ("evaluation", "missing_rates", [], "key 'evaluation.missing_rates': the list is empty"),
    ("ablations", "lambda_grid", [[0.2, 0.5], [0.2, 0.5]], "key 'ablations.lambda_grid': [0.2, 0.5] is listed twice"),
])
def test_empty_and_repeated_lists_fail_at_parse_time(section, key, value, message):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


def test_yaml_1_1_float_text_is_a_number():
    """Snakemake and PyYAML load YAML 1.1, where ``1e-4`` (no dot) is text: the checks coerce it
    where the schema wants a number, and nowhere else."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text().replace("lr: 3.0e-2", "lr: 3e-2"))
    assert config["training"]["lr"] == "3e-2"
    validate_config(config)
    assert config["training"]["lr"] == 0.03
    config["cohort"]["name"] = "1e5"  # text where the schema wants text stays text
    validate_config(config)
    assert config["cohort"]["name"] == "1e5"


def test_bd_check_reports_every_error_in_one_run(tmp_path, capsys):
    config = load(make_cohort(tmp_path, SLIDES, TABLE))
    config["training"]["seeds"] = []
    config["training"]["lr"] = "fast"
    config["tiling"]["patchsize"] = 64
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["check", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    for part in ("training.seeds", "training.lr", "unknown key 'tiling.patchsize'"):
        assert part in err


def test_annotations_folder_only_demanded_when_used(tmp_path):
    config = load(make_cohort(tmp_path, SLIDES, TABLE))
    config["cohort"]["annotations_dir"] = str(tmp_path / "no-such-folder")
    check_config(config)  # use_annotations: false -> not read, not demanded
    config["tiling"]["use_annotations"] = True
    with pytest.raises(ConfigError, match="cohort.annotations_dir: .*no-such-folder is not a folder"):
        check_config(config)


def test_empty_test_split_is_an_error_before_any_job(tmp_path):
    path = make_cohort(tmp_path, SLIDES, TABLE)
    (tmp_path / "split" / "test_id.txt").write_text("\n")
    with pytest.raises(TableError, match="1 splits without any patient: test"):
        prerun(load(path), build_sample_sheet(load(path)))
    proc = dry_run(path)
    assert proc.returncode != 0 and "splits without any patient: test" in proc.stdout + proc.stderr
    assert "Job stats" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------- ids and clinical values


@pytest.mark.parametrize("spelling", ["00{}", "{}.0", " {} "])
def test_numeric_ids_match_in_any_spelling(tmp_path, spelling):
    """Sample-sheet ids 001, 1.0 or ' 1 ' are the clinical table's 1 (and the split files')."""
    slides = {f"S{i}": spelling.format(i) for i in (1, 2, 3)}
    table = {"1": "N0", "2": "N+(>2)", "3": "N0"}
    result = check_cohort(load(make_cohort(tmp_path, slides, table)))
    assert not result.errors() and not result.items("slide_without_clinical_row"), result.findings


def test_no_matching_id_is_an_error_listing_both_sides(tmp_path, capsys):
    config = make_cohort(tmp_path, {"S1": "A1", "S2": "A2"}, {"1": "N0", "2": "N+(>2)", "3": "N0"})
    assert cli.main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no patient of the sample sheet is in the clinical table" in err
    assert "sample sheet: A1, A2; table: 1, 2, 3" in err


def _table_with(tmp_path: Path, column: str, values: list) -> Path:
    path = make_cohort(tmp_path, {"S1": "P1", "S2": "P2", "S4": "P4"}, {"P1": "N0", "P2": "N+(>2)", "P4": "N0"})
    table = pd.read_csv(tmp_path / "clinical.csv", dtype=str, keep_default_na=False)
    table[column] = values
    table.to_csv(tmp_path / "clinical.csv", index=False)
    return path


def test_check_parses_values_as_bd_clinical_does(tmp_path, capsys):
    """A Ki67 cell 'about 30' (extended features) is an error of `bd check`, not only of `bd clinical`."""
    path = _table_with(tmp_path, "Ki67", ["30%", "about 30", "<5%"])
    config = load(path)
    config["clinical"]["feature_set"] = "extended"
    table = pd.read_csv(tmp_path / "clinical.csv", dtype=str, keep_default_na=False)
    for column in ("HER2 Expression", "Histological grading", "Tumour Type", "Molecular subtype"):
        table[column] = ["1+", "2", "IDC"][:1] * 3 if column != "Tumour Type" else "IDC"
    table["HER2 Expression"], table["Histological grading"], table["Molecular subtype"] = "1+", "2", "Luminal A"
    table.to_csv(tmp_path / "clinical.csv", index=False)
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "row 3, column 'Ki67': 'about 30' is not a number" in err


@pytest.mark.parametrize("age", ["-5", "999", "1e6"])
def test_implausible_age_is_an_error_naming_row_and_column(tmp_path, capsys, age):
    path = _table_with(tmp_path, "Age(years)", ["50", age, "61"])
    assert cli.main(["check", "--config", str(path)]) == 2
    assert f"row 3, 'Age(years)': {float(age):g}" in capsys.readouterr().err


def test_out_of_range_as_missing_is_counted(tmp_path, capsys):
    path = _table_with(tmp_path, "Age(years)", ["50", "999", "61"])
    config = load(path)
    config["clinical"]["out_of_range"] = "missing"
    path.write_text(yaml.safe_dump(config))
    result = check_cohort(config)
    assert result.findings["clinical_out_of_range"].level == "warning"
    assert result.items("clinical_out_of_range") == ["row 3, 'Age(years)': 999"]
    assert cli.main(["check", "--config", str(path), "--out", str(tmp_path / "c.tsv")]) == 0
    counts = pd.read_csv(tmp_path / "c.tsv", sep="\t").set_index("check")["count"]
    assert counts["clinical_out_of_range"] == 1


def test_patient_with_no_clinical_value_is_counted(tmp_path):
    path = make_cohort(tmp_path, {"S1": "P1", "S2": "P2", "S4": "P4"}, {"P1": "N0", "P2": "N+(>2)", "P4": "N0"})
    table = pd.read_csv(tmp_path / "clinical.csv", dtype=str, keep_default_na=False)
    for column in ("Age(years)", "Tumour Size(cm)", "ER", "PR", "HER2"):
        table.loc[1, column] = ""
    table.to_csv(tmp_path / "clinical.csv", index=False)
    assert check_cohort(load(path)).items("patient_without_clinical_values") == ["P2"]
