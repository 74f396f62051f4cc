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
- a stage's ``versions`` entry -> that stage onwards (a deliberate rerun after a code change).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from workflow_runs import REPORT_RULES, TARGET_RULES, check, fake_finished_run, scheduled, snakemake, tiny_config, write_config

PER_SLIDE = {"segment", "tile", "extract"}
COHORT = {"demo", "samples", "split", "clinical"}
FROM_FEATURES = {"feature_index", "train", "evaluate"}


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
