"""The sample sheet: demo names, path patterns, TSV sheets and their errors."""

from __future__ import annotations

import pytest

from bd.cohort.samples import build_sample_sheet, check_config_paths, demo_slides
from bd.errors import ConfigError, TableError


def _config(**cohort):
    return {"cohort": {"name": "t", "clinical_table": "x.xlsx", **cohort}, "demo": {"enabled": False}}


def test_demo_slides_are_deterministic_with_some_flat_jpegs():
    a = demo_slides({"patients": 20, "seed": 3, "flat_jpeg_fraction": 0.2, "out_dir": "d"})
    b = demo_slides({"patients": 20, "seed": 3, "flat_jpeg_fraction": 0.2, "out_dir": "d"})
    assert a.equals(b)
    assert list(a["slide_id"]) == [str(i) for i in range(1, 21)]
    assert a["path"].str.endswith(".jpg").sum() == 4
    assert a["path"].iloc[0].startswith("d/WSIs/")


def test_demo_slides_default_to_the_cohort_bd_demo_writes():
    """A demo section that leaves keys out plans the slides of DemoParams' defaults (bd demo's)."""
    from bd.demo import DemoParams

    defaults = DemoParams()
    sheet = demo_slides({"enabled": True})
    assert len(sheet) == defaults.patients
    assert sheet["path"].iloc[0].startswith(f"{defaults.out_dir}/WSIs/")
    with pytest.raises(ConfigError, match="demo.patients"):
        demo_slides({"patients": 2})


def test_pattern_finds_slides(tmp_path):
    for name in ("1.jpg", "2.jpg", "notes.txt"):
        (tmp_path / name).write_text("x")
    sheet = build_sample_sheet(_config(slide_pattern=f"{tmp_path}/{{slide}}.jpg"))
    assert list(sheet.index) == ["1", "2"]
    assert list(sheet["patient_id"]) == ["1", "2"]
    with pytest.raises(ConfigError, match="no file matches"):
        build_sample_sheet(_config(slide_pattern=f"{tmp_path}/{{slide}}.svs"))


def test_sample_sheet_tsv_and_its_errors(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\na\tp1\ta.svs\nb\tp1\t/abs/b.svs\n")
    got = build_sample_sheet(_config(sample_sheet=str(sheet)))
    assert got.loc["a", "path"] == str(tmp_path / "a.svs")
    assert got.loc["b", "path"] == "/abs/b.svs"
    sheet.write_text("slide_id\tpatient_id\tpath\na\tp1\ta.svs\na\tp2\tb.svs\n")
    with pytest.raises(TableError, match=r"duplicate slide_id 'a' in rows \[2, 3\]"):
        build_sample_sheet(_config(sample_sheet=str(sheet)))
    sheet.write_text("slide_id\tpatient_id\tpath\na b\tp1\ta.svs\n")
    with pytest.raises(TableError, match="row 2"):
        build_sample_sheet(_config(sample_sheet=str(sheet)))
    sheet.write_text("slide\tpatient\n")
    with pytest.raises(TableError, match="missing column"):
        build_sample_sheet(_config(sample_sheet=str(sheet)))


def test_config_paths_must_exist(tmp_path):
    cfg = _config(split_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="cohort.clinical_table"):
        check_config_paths(cfg)
    (tmp_path / "x.xlsx").write_text("x")
    cfg["cohort"]["clinical_table"] = str(tmp_path / "x.xlsx")
    check_config_paths(cfg)
    cfg["features"] = {"weights": str(tmp_path / "nope.pth")}
    with pytest.raises(ConfigError, match="features.weights"):
        check_config_paths(cfg)


def test_sample_sheet_mpp_column_is_optional_and_checked(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\tmpp\na\tp1\ta.jpg\t4\nb\tp2\tb.jpg\t\n")
    got = build_sample_sheet(_config(sample_sheet=str(sheet)))
    assert list(got["mpp"]) == ["4", ""]
    sheet.write_text("slide_id\tpatient_id\tpath\tmpp\na\tp1\ta.jpg\t4um\n")
    with pytest.raises(TableError, match=r"row 2: column 'mpp' must be a positive number.*'4um'"):
        build_sample_sheet(_config(sample_sheet=str(sheet)))
    sheet.write_text("slide_id\tpatient_id\tpath\na\tp1\ta.jpg\n")
    assert "mpp" not in build_sample_sheet(_config(sample_sheet=str(sheet))).columns


def _dag_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "dag.py"
    spec = importlib.util.spec_from_file_location("dag_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_samples_rule_runs_on_10000_slides_with_120_character_paths(tmp_path):
    """A real run of rule samples (not a dry run): the old rule passed the sheet as one JSON
    argument, over Linux's 128 KiB cap from about 1,000 such slides ("Argument list too long")."""
    import pandas as pd

    folder = tmp_path / "c"
    folder.mkdir()
    seconds, out = _dag_benchmark().samples_rule_run(folder, 10_000, 120)
    sheet = pd.read_csv(out, sep="\t", dtype=str)
    assert len(sheet) == 10_000 and (sheet["path"].str.len() == 120).all()
    assert len(sheet.to_json(orient="records")) > 128 * 1024  # would not fit one argument
    assert seconds < 300


def test_bd_samples_refuses_a_sheet_that_changed_since_parsing(tmp_path):
    from bd.cli import main

    sheet = tmp_path / "s.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\na\t001\ta.svs\n")
    cohort = '{"name": "t", "clinical_table": "x", "sample_sheet": "%s"}' % sheet
    out = tmp_path / "o.tsv"
    from bd.cohort.samples import build_sample_sheet, sheet_sha256

    sha = sheet_sha256(build_sample_sheet({"cohort": {"name": "t", "clinical_table": "x", "sample_sheet": str(sheet)}}))
    assert main(["samples", "--cohort", cohort, "--sha256", sha, "--out", str(out)]) == 0
    assert out.read_text().splitlines()[1].split("\t")[1] == "1"  # 001 normalised as the table's ids
    sheet.write_text("slide_id\tpatient_id\tpath\na\t2\ta.svs\n")
    assert main(["samples", "--cohort", cohort, "--sha256", sha, "--out", str(out)]) == 2
