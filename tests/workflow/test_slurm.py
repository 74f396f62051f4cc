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

A watchdog fails the test early, with the cluster's own account (squeue, scontrol, the daemons'
logs, the jobs' SLURM logs), when no job of the run has changed state for far longer than any job
of this tiny workflow takes, and cancels what the test submitted, so that a stuck cluster costs
minutes of CI and says why instead of hitting the overall timeout silently.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_runs import PROFILES, ROOT, tiny_config, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
OVERALL_S = 1200  # the whole run; about 5 min on 2 cores
STUCK_S = 420  # nothing moving this long (the longest job takes about 1.5 min here)


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
    queue = subprocess.run(["squeue", "-h", "-o", "%i %j %T %M"], capture_output=True, text=True, timeout=30)
    if queue.stdout.strip():  # other jobs hold the one node's "GPU": the run would wait behind them
        return f"the SLURM queue is not empty (squeue: {queue.stdout.strip()}); cancel those jobs (scancel)"
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
    log = run_watched(tmp_path, "--profile", str(PROFILES / "slurm"),
                      "--slurm-init-seconds-before-status-checks", "3", "--verbose")
    check_outputs(tmp_path / "results", config)
    check_submissions(tmp_path, log, config["demo"]["patients"])


def run_watched(work: Path, *args: str) -> str:
    """Snakemake in `work` under the watchdog; its log (stdout and stderr) when it succeeds."""
    log_path = work / "snakemake.log"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start, last = time.monotonic(), {}
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=work)
        try:
            while proc.poll() is None:
                time.sleep(5)
                text = log_path.read_text()
                mine = {slurm_id for _, slurm_id, _ in SUBMITTED.findall(text)}
                stuck = stalled(mine, text.count("Finished job"), last)
                if stuck is not None or time.monotonic() - start > OVERALL_S:
                    why = (f"nothing moved for {STUCK_S} s (queued SLURM jobs of the run: {', '.join(stuck) or 'none'})"
                           if stuck is not None else f"the run took over {OVERALL_S} s")
                    proc.kill()
                    proc.wait()
                    pytest.fail(f"{why}\n{cluster_report(stuck or [], log_path.read_text())}")
        finally:
            if proc.poll() is None:
                proc.kill()
            cancel(log_path)
    text = log_path.read_text()
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{text[-6000:]}"
    return text


def stalled(mine: set[str], finished: int, last: dict) -> list[str] | None:
    """This run's queued SLURM jobs when nothing has moved for STUCK_S (no job submitted, started
    or finished in SLURM, none finished for Snakemake); else None. `last` keeps what was seen."""
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=30).stdout
    states = {i: state for i, state in (line.split()[:2] for line in queue.splitlines()) if i in mine}
    now, seen = time.monotonic(), (states, frozenset(mine), finished)
    if seen != last.get("seen"):
        last.update(seen=seen, since=now)
    return sorted(states) if now - last["since"] > STUCK_S else None


def cluster_report(stuck: list[str], log: str) -> str:
    """What the cluster says: the queue, the stuck jobs, node states, the daemons' and jobs' logs."""
    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"

    parts = [run("squeue", "-o", "%i %j %T %M %R"), run("sinfo", "-R"), run("sinfo", "-N", "-l")]
    parts += [run("scontrol", "show", "job", slurm_id) for slurm_id in stuck]
    for path in (Path("/var/log/slurmctld.log"), Path("/var/log/slurmd.log")):
        if path.is_file():
            parts.append(f"--- last lines of {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    for _, slurm_id, slurm_log in SUBMITTED.findall(log):
        if slurm_id in stuck and Path(slurm_log).is_file():
            parts.append(f"--- {slurm_log}\n{Path(slurm_log).read_text(errors='replace')[-3000:]}")
    parts.append(f"--- last of the Snakemake log\n{log[-5000:]}")
    return "\n".join(parts)


def cancel(log_path: Path) -> None:
    """Cancel whatever this run submitted and SLURM still holds (a no-op after a clean finish)."""
    ids = [slurm_id for _, slurm_id, _ in SUBMITTED.findall(log_path.read_text())]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


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
