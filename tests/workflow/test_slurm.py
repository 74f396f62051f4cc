"""Cluster execution: the tiny demo pipeline through a real SLURM cluster with the shipped profile.

Needs a SLURM cluster with an idle node that offers one GPU (`--gpus=1`); .ci/run starts such a
one-node cluster on localhost (.ci/start-slurm.sh: munge, slurmctld, slurmd; the "GPU" is a
stand-in and the jobs compute on the CPU). Without one the test is skipped, or fails when
BD_REQUIRE_SLURM=1 (as in CI). The run uses profiles/slurm unchanged (only status checks are
made more frequent, to save minutes) and checks that:

- the workflow finishes and writes Table I, Fig. 1, a non-empty feature store per slide and
  each run's metrics;
- every job went through `sbatch`: each submission has a SLURM job id and its SLURM log file;
- the profile's grouping holds: all slides' segmentation and tiling in one `slide_prep` job (8
  slides per job), feature extraction in `features` jobs of 4 slides, each asking for one GPU;
- GPU rules ask for a GPU and CPUs per GPU, CPU rules do not.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from workflow_runs import PROFILES, check, snakemake, tiny_config, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def cluster_problem() -> str | None:
    """Why this machine cannot run the test (None when it can)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch not on PATH); .ci/start-slurm.sh installs and starts one"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T %G"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    nodes = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if not any(state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for state, *_ in nodes):
        return f"no SLURM node is up (sinfo: {proc.stdout.strip() or 'no nodes'})"
    if not any("gpu" in " ".join(gres) for _, *gres in nodes):
        return f"no SLURM node offers a GPU (gres) for the extract and train jobs (sinfo: {proc.stdout.strip()})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = cluster_problem()
    if problem:
        if os.environ.get("BD_REQUIRE_SLURM") == "1":
            pytest.fail(f"BD_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def sbatch_calls(log: str) -> list[str]:
    return [line.split("sbatch call: ", 1)[1] for line in log.splitlines() if "sbatch call: " in line]


def test_demo_pipeline_runs_through_slurm(cluster, tmp_path):
    config = tiny_config()
    write_config(tmp_path, config)
    proc = check(snakemake(tmp_path, "--profile", str(PROFILES / "slurm"),
                           "--slurm-init-seconds-before-status-checks", "3", "--verbose", timeout=1500))
    check_outputs(tmp_path / "results", config)
    check_submissions(tmp_path, proc.stdout + proc.stderr, config["demo"]["patients"])


def check_outputs(results: Path, config: dict) -> None:
    from bd.features.store import read_store

    assert (results / "tables" / "table1.csv").stat().st_size > 0
    assert (results / "figures" / "fig1.png").stat().st_size > 0
    for method in config["training"]["methods"]:
        assert (results / "evaluate" / method / "seed0" / "metrics.csv").stat().st_size > 0
    stores = sorted((results / "features").glob("*.zarr"))
    assert len(stores) == config["demo"]["patients"]
    assert all(read_store(s, with_features=False).attrs["complete"] for s in stores)
    assert sum(len(read_store(s).coords) > 0 for s in stores) >= len(stores) // 2  # most slides have patches


def check_submissions(work: Path, log: str, slides: int) -> None:
    """Every job has a SLURM job id and log; grouping and resource requests as the profile says."""
    submitted = SUBMITTED.findall(log)
    assert submitted, "no job was submitted to SLURM"
    jobs_by_kind: dict[str, int] = {}
    for _, slurm_id, slurm_log in submitted:
        assert Path(slurm_log).is_file(), f"SLURM log {slurm_log} of job {slurm_id} is missing"
        assert Path(slurm_log).stem == slurm_id
        # .snakemake/slurm_logs/rule_<rule>[/<wildcards>]/<id>.log or group_<group>_<rules>/<id>.log
        kind = Path(slurm_log).relative_to(work / ".snakemake" / "slurm_logs").parts[0]
        jobs_by_kind[kind] = jobs_by_kind.get(kind, 0) + 1
    assert jobs_by_kind.get("group_slide_prep_segment_tile") == math.ceil(slides / 8), jobs_by_kind
    assert jobs_by_kind.get("group_features_extract") == math.ceil(slides / 4), jobs_by_kind
    assert not {"rule_segment", "rule_tile", "rule_extract"} & set(jobs_by_kind), jobs_by_kind
    assert {"rule_demo", "rule_train", "rule_evaluate", "rule_table1"} <= set(jobs_by_kind), jobs_by_kind

    # resource requests: GPU jobs ask for a GPU and CPUs per GPU; CPU jobs for neither
    calls = sbatch_calls(log)
    assert len(calls) == len(submitted)
    gpu = [c for c in calls if "/group_features_extract/" in c or "/rule_train/" in c]
    cpu = [c for c in calls if c not in gpu]
    assert len(gpu) == jobs_by_kind["group_features_extract"] + jobs_by_kind["rule_train"]
    assert all("--gpus=1" in c and "--cpus-per-gpu=" in c for c in gpu), gpu
    assert cpu and not any("--gpus" in c for c in cpu), cpu
    assert all(re.search(r"--mem \d+", c) and re.search(r" -t \d+", c) for c in calls), calls
