"""Demo cohort: generation time of `bd demo` and the cohort's calibration (clinical-only and oracle AUC).

1. ``bd demo`` with the config's demo section (default: 60 patients, 4096 px slides) into a
   temporary folder with ``--workers`` processes: wall time, target at most 60 s on 2 cores.
   Reference, in the same run: one process writing one already-rendered slide as a pyramidal
   JPEG TIFF (encode + file I/O only), times the number of slides over the workers. The ratio
   says what drawing the slides costs on top of merely writing them.
2. That folder's ``bd demo-auc`` figures: clinical-only logistic-regression and oracle test AUC.
3. BCNB-sized cohorts (1,058 patients, tables only): the clinical-only test AUC for seed 0 and
   its mean and in-range share over ``--seeds`` seeds, and the mean oracle AUC.

4. (first, unless ``--no-pipeline``) ``make demo`` from a fresh clone of this repository's HEAD in
   a temporary folder, venv included: wall minutes (target <= 10; issue 18 allows 12), the CPU
   seconds of every process it ran (``RUSAGE_CHILDREN``), the sum of the jobs' ``cpu_time`` in
   Snakemake's benchmark files, the job count, the load average before and after, the report's
   size (target <= 15 MB), and the learning checks of the run: image-only test AUC (mean over
   seeds, target >= 0.80), the smallest test-probability sd of any slide-using run with complete
   data and with all clinical data missing (target >= 0.05), the number of test patients
   (target >= 30), every table and figure present. ``--results DIR`` checks an existing run's
   results folder instead of running (``--report FILE`` its report).

Prints one JSON object per line: {"metric", "value", "unit", "target", "better"}, and a first
line naming the CPU. AUCs that must lie in a range (the real cohort's 0.55-0.72) have that range
as target and better "in range".
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bd.demo import DemoParams, available_cpus, generate_cohort  # noqa: E402
from bd.demo.auc import cohort_auc, simulated_auc  # noqa: E402
from bd.demo.render import render_slide  # noqa: E402
from bd.demo.slidefile import write_pyramid_tiff  # noqa: E402
from bd.params import build  # noqa: E402
from record import cpu_name  # noqa: E402  (benchmarks/record.py)

ROOT = Path(__file__).resolve().parents[1]
AUC_RANGE = [0.55, 0.72]


def emit(metric: str, value: float, unit: str, target: object = None, better: str | None = None) -> None:
    print(json.dumps({"metric": metric, "value": round(float(value), 4), "unit": unit,
                      "target": target, "better": better}), flush=True)


def write_only_seconds(params: DemoParams, folder: Path, repeats: int = 3) -> float:
    """Median time for one process to write one rendered slide as a pyramidal TIFF."""
    rgb = render_slide(params.slide_size, params.mpp, 0.3, np.random.default_rng(0)).rgb
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        write_pyramid_tiff(folder / f"ref{i}.tif", rgb, params.mpp, params.jpeg_quality)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# What `make demo` must produce (issue 18): Tables I-III, Figs. 1, 4a-c, 5, ROC, S->M, heatmaps, report.
DEMO_OUTPUTS = ["tables/table1.md", "tables/table2.md", "tables/table3.md", "figures/fig1.png",
                "figures/fig4ab.png", "figures/fig4c.png", "figures/fig5.png", "figures/roc.png",
                "figures/s2m.png", "figures/heatmaps", "report.html"]




def run_make_demo(folder: Path) -> dict[str, float]:
    """``make demo`` in a fresh clone of this repository's HEAD: wall s, children's CPU s, loads."""
    clone = folder / "bd"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    before = os.getloadavg()[0]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"make demo failed ({proc.returncode})")
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": before, "load_after": os.getloadavg()[0],
            "results": str(clone / "results")}


def benchmark_totals(results: Path) -> tuple[int, float]:
    """(jobs, sum of cpu_time) over the Snakemake benchmark files of a run."""
    jobs, cpu = 0, 0.0
    for path in glob.glob(str(results / "benchmarks" / "**" / "*.tsv"), recursive=True):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                jobs += 1
                cpu += float(row.get("cpu_time") or 0)
    return jobs, cpu


def learning_checks(results: Path) -> dict[str, float]:
    """Image-only test AUC (mean over seeds), the smallest test-probability sd of the slide-using
    runs with complete data and with every clinical value missing, and the test split's size."""
    import pandas as pd

    image_only, sd_full, sd_missing, patients = [], [], [], 0
    for path in sorted(results.glob("evaluate/*/seed*/predictions.csv")):
        pred = pd.read_csv(path)
        if pred["method"].iloc[0] == "clinical_only":
            continue
        first = pred[(pred["repeat"] == 0)]
        full = first[(first["rate"] == 0) & (first["kind"] == first["kind"].iloc[0])]
        sd_full.append(float(full["prob"].std(ddof=0)))
        patients = max(patients, int(full["patient_id"].nunique()))
        gone = first[(first["kind"] == "clinical") & (first["rate"] == 100)]
        if len(gone):
            sd_missing.append(float(gone["prob"].std(ddof=0)))
    for path in sorted(results.glob("evaluate/image_only/seed*/summary.csv")):
        summary = pd.read_csv(path)
        image_only.append(float(summary[(summary["kind"] == "clinical") & (summary["rate"] == 0)]["auc_mean"].iloc[0]))
    return {"image_only_auc": statistics.mean(image_only) if image_only else float("nan"),
            "image_only_seeds": len(image_only), "min_sd_full": min(sd_full, default=float("nan")),
            "min_sd_missing": min(sd_missing, default=float("nan")), "runs": len(sd_full),
            "test_patients": patients}


def pipeline_figures(results: Path, report: Path, timing: dict[str, float] | None) -> None:
    """The JSON lines of a finished demo run (timed when ``timing`` is given)."""
    if timing:
        emit("make_demo_fresh_clone_minutes", timing["wall_s"] / 60, "min", 10, "lower")
        emit("make_demo_cpu_seconds", timing["cpu_s"], "s", None, "lower")
        emit("load_average_before", timing["load_before"], "load", None, None)
        emit("load_average_after", timing["load_after"], "load", None, None)
    jobs, job_cpu = benchmark_totals(results)
    emit("demo_jobs", jobs, "jobs", None, "lower")
    emit("demo_jobs_cpu_time_sum", job_cpu, "s", None, "lower")
    missing = [name for name in DEMO_OUTPUTS if not (report if name == "report.html" else results / name).exists()]
    emit("demo_outputs_missing", len(missing), "files", 0, "lower")
    if report.exists():
        emit("demo_report_mb", report.stat().st_size / 1e6, "MB", 15, "lower")
    checks = learning_checks(results)
    emit(f"demo_image_only_test_auc_mean_{checks['image_only_seeds']}_seeds", checks["image_only_auc"], "AUC", 0.80,
         "higher")
    emit(f"demo_min_test_prob_sd_complete_{checks['runs']}_runs", checks["min_sd_full"], "sd", 0.05, "higher")
    emit("demo_min_test_prob_sd_clinical_missing", checks["min_sd_missing"], "sd", 0.05, "higher")
    emit("demo_test_patients", checks["test_patients"], "patients", 30, "higher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=available_cpus())
    parser.add_argument("--seeds", type=int, default=20, help="BCNB-sized cohorts to average over")
    parser.add_argument("--patients", type=int, default=None, help="override the config's demo.patients")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the timed `make demo` from a fresh clone")
    parser.add_argument("--results", type=Path, default=None,
                        help="check this finished run's results folder instead of running make demo")
    parser.add_argument("--report", type=Path, default=None, help="its report (default: RESULTS/report.html)")
    args = parser.parse_args()
    print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count()}), flush=True)
    if args.results:
        pipeline_figures(args.results, args.report or args.results / "report.html", None)
    elif not args.no_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            timing = run_make_demo(Path(tmp))
            results = Path(timing["results"])
            pipeline_figures(results, results / "report.html", timing)

    section = yaml.safe_load((ROOT / "config/config.yaml").read_text())["demo"]
    if args.patients:
        section["patients"] = args.patients
    params = build(DemoParams, section)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        generate_cohort(params, folder / "demo", workers=args.workers)
        seconds = time.perf_counter() - start
        reference = write_only_seconds(params, folder) * params.patients / max(1, min(args.workers, params.patients))
        emit(f"demo_{params.patients}_patients_{params.slide_size}px_seconds", seconds, "s", 60, "lower")
        emit("demo_vs_write_only_ratio", seconds / reference, "x", None, "lower")
        demo = cohort_auc(folder / "demo")
    emit(f"demo_{params.patients}_clinical_auc", demo.clinical_auc, "AUC", AUC_RANGE, "in range")
    emit(f"demo_{params.patients}_oracle_auc", demo.oracle_auc, "AUC", None, "higher")

    results = [simulated_auc(1058, seed, params.slide_signal) for seed in range(args.seeds)]
    clinical = [r.clinical_auc for r in results]
    emit("bcnb1058_clinical_auc_seed0", clinical[0], "AUC", AUC_RANGE, "in range")
    emit(f"bcnb1058_clinical_auc_mean_{args.seeds}_seeds", statistics.mean(clinical), "AUC", [0.60, 0.66], "in range")
    emit("bcnb1058_clinical_auc_in_range_share", np.mean([AUC_RANGE[0] <= a <= AUC_RANGE[1] for a in clinical]),
         "fraction", 0.9, "higher")
    emit(f"bcnb1058_oracle_auc_mean_{args.seeds}_seeds", statistics.mean(r.oracle_auc for r in results), "AUC",
         None, "higher")


if __name__ == "__main__":
    main()
