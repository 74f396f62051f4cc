"""Helpers for the tests that run the project's Snakemake workflow in a temporary folder.

The workflow folder holds only ``config/config.yaml`` (the Snakefile is the project's, run with
``--directory``), so Snakemake's bookkeeping (``.snakemake/``) and every output stay in the
temporary folder. Used by test_rerun.py, test_cache.py and test_slurm.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"
# Rules of the report stage (tables, figures, runtime summary) and the target rules.
REPORT_RULES = {"table1", "table2", "table3", "fig1", "roc", "fig4ab", "fig4c", "fig5", "s2m", "heatmaps",
                "runtime_summary", "clinical_tables", "clinical_figures"}
TARGET_RULES = {"all", "ablations", "wsi_missing", "analysis"}


def base_config() -> dict[str, Any]:
    """The shipped config/config.yaml."""
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def tiny_config(results: str = "results") -> dict[str, Any]:
    """The demo config shrunk to a few minutes of CPU: 8 patients (the smallest demo whose official
    test split has both classes), 2,048 px slides, a truncated ResNet-18 on 32 px inputs, two
    methods, one seed, two epochs, few evaluation repeats."""
    config = base_config()
    config["results"] = results
    config["segment_slides_per_job"] = 1  # rules segment, tile, extract, train, evaluate: one job per
    config["extract_slides_per_job"] = 1  # slide or run (what
    config["train_runs_per_job"] = 1  # these tests count; tests/test_batch_rules.py checks the batches)
    config["demo"].update(out_dir=f"{results}/demo", patients=8, slide_size=2048, test_patients=None)
    config["cohort"].update(clinical_table=f"{results}/demo/patient-clinical-data.xlsx",
                            split_dir=f"{results}/demo/dataset-splitting")
    config["features"].update(encoder="resnet18", out_stage="layer1", input_size=32, batch_size=16,
                              num_workers=0)
    config["training"].update(methods=["clinical_only", "bd"], seeds=[0], max_epochs=2, min_epochs=1, patience=2)
    config["evaluation"].update(repeats=2, bootstrap=0)
    return config


def write_config(work: Path, config: dict[str, Any], name: str = "config.yaml") -> Path:
    path = work / "config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(work: Path, *args: str, env: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """``snakemake --directory work`` with the project's Snakefile; the workflow profile
    profiles/default (rerun triggers) applies as in a user's run."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(work), *args]
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=work)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def scheduled(proc: subprocess.CompletedProcess) -> Counter:
    """Jobs per rule from a dry run's "Job stats" table (empty when nothing is to be done)."""
    text = proc.stdout + proc.stderr
    counts: Counter = Counter()
    if "Job stats:" not in text:
        assert "Nothing to be done" in text, text[-3000:]
        return counts
    table = text[text.index("Job stats:"):].splitlines()[3:]
    for line in table:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def dag_outputs(work: Path, *targets: str) -> list[tuple[Path, str]]:
    """(output path, rule) of every job of the DAG, from ``snakemake --summary``."""
    proc = check(snakemake(work, "--cores", "1", "--summary", *targets))
    text = proc.stdout[proc.stdout.index("output_file"):]
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    return [(work / r["output_file"] if not Path(r["output_file"]).is_absolute() else Path(r["output_file"]),
             r["rule"]) for r in rows]


def fake_finished_run(work: Path, *targets: str) -> list[tuple[Path, str]]:
    """Make the DAG look finished by Snakemake itself: the demo's real tables and split files (read
    when the workflow is parsed), every other output created empty (folders for the `directory()`
    outputs: feature stores and the suffix-less ones), then ``--touch --forceall`` records each job's params, code and input metadata in
    .snakemake/ as a real run would, with outputs newer than their inputs."""
    outputs = dag_outputs(work, *targets)
    demo = yaml.safe_load((work / "config" / "config.yaml").read_text()).get("demo") or {}
    if demo.get("enabled"):  # real tables and split files: the workflow reads them at parse time
        subprocess.run([sys.executable, "-m", "bd", "demo", "--tables-only", "--params", json.dumps(demo),
                        "--out-dir", str(work / demo["out_dir"])], check=True, capture_output=True, timeout=120)
    for path, _ in outputs:
        if path.exists():
            continue
        if path.suffix in (".zarr", ""):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    check(snakemake(work, "--cores", "1", "--touch", "--forceall", *targets))
    return outputs
