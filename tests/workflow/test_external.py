"""Workflow dry runs of the target external and of .h5 feature stores (h5_features): which jobs
are scheduled, and the errors that name the config key."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from workflow_runs import check, scheduled, snakemake, tiny_config, write_config

SLIDE = Path(__file__).resolve().parents[1] / "data" / "cmu-1-small-region.svs"


def external_config(work: Path, **external) -> dict:
    config = tiny_config()
    pd.DataFrame({"slide_id": ["X1", "X2"], "patient_id": ["E1", "E2"], "path": [str(SLIDE)] * 2}).to_csv(
        work / "ext.tsv", sep="\t", index=False)
    pd.DataFrame({"Patient ID": ["E1", "E2"], "ALN status": ["N0", "N+(1-2)"], "Age(years)": [50, 60]}).to_csv(
        work / "ext.csv", index=False)
    config["external"].update(run="bd/seed0", sample_sheet=str(work / "ext.tsv"), clinical_table=str(work / "ext.csv"),
                              **external)
    return config


def test_external_target_predicts_then_evaluates(tmp_path):
    write_config(tmp_path, external_config(tmp_path))
    jobs = scheduled(check(snakemake(tmp_path, "-n", "external", "--cores", "1")))
    assert jobs["external_predict"] == 1 and jobs["external_evaluate"] == 1 and jobs["train"] == 1
    write_config(tmp_path, external_config(tmp_path, evaluate=False))
    jobs = scheduled(check(snakemake(tmp_path, "-n", "external", "--cores", "1")))
    assert jobs["external_predict"] == 1 and "external_evaluate" not in jobs


def test_external_target_errors_name_the_key(tmp_path):
    config = external_config(tmp_path)
    config["external"]["run"] = None
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, "-n", "external", "--cores", "1")
    assert proc.returncode != 0 and "set external.run" in proc.stdout + proc.stderr
    config["external"].update(run="bd/seed0", sample_sheet=str(tmp_path / "nowhere.tsv"), colour="red")
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, "-n", "external", "--cores", "1")
    assert proc.returncode != 0 and "external.colour" in proc.stdout + proc.stderr


def test_h5_features_replace_extraction(tmp_path):
    h5py = pytest.importorskip("h5py")
    import numpy as np

    config = tiny_config()
    folder = tmp_path / "clam"
    folder.mkdir()
    for sid in range(1, config["demo"]["patients"] + 1):  # the demo's slide ids
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=np.zeros((2, 4), np.float32))
            f.create_dataset("coords", data=np.zeros((2, 2), np.int32)).attrs["patch_size"] = 256
    config["h5_features"].update(dir=str(folder), encoder="resnet50_trunc", target_mpp=0.5)
    write_config(tmp_path, config)
    jobs = scheduled(check(snakemake(tmp_path, "-n", "all", "--cores", "1")))
    assert jobs["h5_link"] == config["demo"]["patients"] and jobs["h5_identity"] == 1
    assert "extract" not in jobs and jobs["train"] >= 1
