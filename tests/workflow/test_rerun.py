"""Rerun policy: after a finished run, a config change reschedules exactly the stages it affects.

A workflow folder with the tiny demo config is made to look finished by Snakemake itself (empty
outputs, then ``--touch --forceall``, which records every job's params, code and inputs as a real
run does). Each test then dry-runs with a changed copy of the config and lists the rules Snakemake
schedules, under the project's rerun triggers (profiles/default: mtime, params, input,
software-env, code):

- no change -> nothing;
- a training parameter -> train, evaluate and the report rules only;
- a tiling parameter -> tile, extract and everything after (not the demo, segmentation, split);
- the encoder -> extract onwards (not segmentation or tiling);
- a stage's ``versions`` entry -> that stage onwards (a deliberate rerun after a code change);
- a lost feature store, grid or mask (moved away after the run) -> that slide's stage onwards and
  everything that reads the stores, with or without another change;
- a new encoder weights file -> extraction onwards, even with the old file's timestamp kept.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from workflow_runs import REPORT_RULES, TARGET_RULES, check, fake_finished_run, scheduled, snakemake, tiny_config, write_config

PER_SLIDE = {"segment", "tile", "extract"}
COHORT = {"demo", "samples", "split", "clinical"}
FROM_FEATURES = {"feature_index", "train", "evaluate", "slide_qc"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], int]:
    """A workflow folder whose whole default target is finished; its config and slide count."""
    work = tmp_path_factory.mktemp("rerun")
    config = tiny_config()
    write_config(work, config)
    fake_finished_run(work)
    return work, config, config["demo"]["patients"]


def dry_run_with(work: Path, config: dict[str, Any], name: str) -> dict[str, int]:
    """Rules (with job counts) a dry run schedules when the workflow runs with ``config``."""
    path = write_config(work, config, f"{name}.yaml")
    return dict(scheduled(check(snakemake(work, "-n", "--configfile", str(path)))))


def changed(config: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    new = copy.deepcopy(config)
    new.setdefault(section, {}).update(values)
    return new


def test_no_change_schedules_nothing(finished):
    work, config, _ = finished
    assert dry_run_with(work, config, "same") == {}


def test_training_parameter_reruns_training_evaluation_and_report(finished):
    work, config, _ = finished
    jobs = dry_run_with(work, changed(config, "training", lr=config["training"]["lr"] * 2), "lr")
    runs = len(config["training"]["methods"]) * len(config["training"]["seeds"])
    assert jobs["train"] == runs and jobs["evaluate"] == runs
    assert {"table1", "fig1"} <= set(jobs)
    assert set(jobs) <= {"train", "evaluate"} | REPORT_RULES | TARGET_RULES, jobs


def test_tiling_parameter_reruns_tiling_extraction_and_after(finished):
    work, config, slides = finished
    jobs = dry_run_with(work, changed(config, "tiling", patch_size=config["tiling"]["patch_size"] // 2), "tiling")
    assert jobs["tile"] == slides and jobs["extract"] == slides
    assert FROM_FEATURES | {"table1"} <= set(jobs)
    assert not set(jobs) & (COHORT | {"segment"}), jobs


def test_encoder_change_reruns_extraction_onwards(finished):
    work, config, slides = finished
    jobs = dry_run_with(work, changed(config, "features", encoder="resnet34"), "encoder")
    assert jobs["extract"] == slides
    assert FROM_FEATURES | {"table1"} <= set(jobs)
    assert not set(jobs) & (COHORT | {"segment", "tile"}), jobs


@pytest.mark.parametrize(("stage", "first", "not_rerun"), [
    ("segment", "segment", COHORT),
    ("extract", "extract", COHORT | {"segment", "tile"}),
    ("train", "train", COHORT | PER_SLIDE | {"feature_index"}),
])
def test_stage_version_forces_that_stage_onwards(finished, stage, first, not_rerun):
    work, config, _ = finished
    versions = {**(config.get("versions") or {}), stage: (config.get("versions") or {}).get(stage, 1) + 1}
    jobs = dry_run_with(work, {**config, "versions": versions}, f"version-{stage}")
    assert first in jobs and "table1" in jobs
    assert not set(jobs) & not_rerun, jobs


def test_unknown_version_key_is_rejected(finished):
    work, config, _ = finished
    path = write_config(work, {**config, "versions": {"tiles": 2}}, "typo.yaml")
    proc = snakemake(work, "-n", "--configfile", str(path))
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "tiles" in message and "versions" in message, message[-2000:]


def runs_of(config: dict[str, Any]) -> int:
    return len(config["training"]["methods"]) * len(config["training"]["seeds"])


@pytest.mark.parametrize("lost", ["features/3.zarr", "tiles/3.npz", "segment/3/mask.json"])
def test_a_lost_store_grid_or_mask_is_rebuilt_with_everything_after_it(finished, lost):
    """As when a scratch-purging cluster deletes one slide's output: the dry run lists that slide's
    stage, its later stages, and everything that reads the stores (every training and evaluation)."""
    work, config, _ = finished
    path = work / "results" / lost
    kept = path.with_name(path.name + ".kept")
    path.rename(kept)
    try:
        jobs = dry_run_with(work, config, "lost")
    finally:
        kept.rename(path)
    first = {"features/3.zarr": "extract", "tiles/3.npz": "tile", "segment/3/mask.json": "segment"}[lost]
    chain = ["segment", "tile", "extract"]
    for rule in chain[chain.index(first):]:
        assert jobs[rule] == 1, jobs  # that slide only
    assert jobs["train"] == runs_of(config) and jobs["evaluate"] == runs_of(config), jobs
    assert {"slide_qc", "table1", "fig1"} <= set(jobs)
    assert not set(jobs) & COHORT, jobs


def test_a_lost_store_is_rebuilt_before_a_changed_evaluation(finished):
    """The issue's case: a store moved away, then evaluation.bootstrap changed: the store is
    extracted again and every run retrained on it, not evaluated without the slide."""
    work, config, _ = finished
    store = work / "results" / "features" / "5.zarr"
    kept = store.with_name("5.zarr.kept")
    store.rename(kept)
    try:
        jobs = dry_run_with(work, changed(config, "evaluation", bootstrap=7), "lost-bootstrap")
    finally:
        kept.rename(store)
    assert jobs["extract"] == 1 and jobs["train"] == runs_of(config) and jobs["evaluate"] == runs_of(config), jobs


def test_new_weights_file_reruns_extraction_even_with_its_old_timestamp(tmp_path):
    """The encoder's weights file is an input of extraction: a new file reruns it. Copied over the
    old one with its timestamp kept (cp -p), it is not seen (documented in the README)."""
    work = tmp_path / "w"
    config = tiny_config()
    weights = work / "weights.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"old weights")
    config["features"].update(weights=str(weights), random_weights=False)
    write_config(work, config)
    fake_finished_run(work)
    assert dry_run_with(work, config, "same") == {}
    stamp = os.stat(weights).st_mtime
    weights.write_bytes(b"new weights, same timestamp")
    os.utime(weights, (stamp, stamp))
    assert dry_run_with(work, config, "same-stamp") == {}  # not seen: the documented limit
    weights.write_bytes(b"new weights")
    jobs = dry_run_with(work, config, "new")
    slides = config["demo"]["patients"]
    assert jobs["extract"] == slides and jobs["train"] == runs_of(config), jobs
    assert not set(jobs) & (COHORT | {"segment", "tile"}), jobs


def test_changed_sample_sheet_is_seen_whatever_its_timestamp(tmp_path):
    """The sample sheet's content hash is a parameter of rule samples: an edited sheet (here: one
    slide moved to another patient) reruns it, even with the old timestamp kept (rsync -a)."""
    from test_check import make_cohort

    config_path = make_cohort(tmp_path / "c", {"S1": "P1", "S2": "P2", "S4": "P4"},
                              {"P1": "N0", "P2": "N+(>2)", "P4": "N0"})
    work = config_path.parent
    config = yaml.safe_load(config_path.read_text())
    write_config(work, config)
    target = f"{config['results']}/samples.tsv"
    check(snakemake(work, "--cores", "1", target))
    assert scheduled(check(snakemake(work, "-n", target))) == {}
    sheet = Path(config["cohort"]["sample_sheet"])
    stamp = os.stat(sheet).st_mtime
    sheet.write_text(sheet.read_text().replace("S4\tP4", "S4\tP1"))
    os.utime(sheet, (stamp, stamp))
    assert scheduled(check(snakemake(work, "-n", target))) == {"samples": 1}
    check(snakemake(work, "--cores", "1", target))
    assert "S4\tP1" in Path(target).read_text()


@pytest.mark.slow
def test_results_folder_with_a_space_and_no_venv_on_path(tmp_path):
    """The README's `.venv/bin/snakemake ...` with nothing of the venv on PATH (rules run `bd` from
    the Python Snakemake runs in), into a results folder whose name has a space: every stage to an
    evaluation runs (slides, features, split, clinical, training, evaluation)."""
    import subprocess
    import sys

    from workflow_runs import ROOT

    work = tmp_path / "my project"
    results = "out dir/results"
    config = tiny_config(results)
    config["training"]["methods"] = ["clinical_only"]
    write_config(work, config)
    target = f"{results}/evaluate/clinical_only/seed0/metrics.csv"
    snakemake_bin = Path(sys.executable).parent / "snakemake"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    proc = subprocess.run([str(snakemake_bin), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
                           "--cores", "2", target], capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert (work / target).stat().st_size > 0
    assert (work / results / "features" / "1.zarr").is_dir() and (work / results / "segment" / "1" / "qc.png").exists()
