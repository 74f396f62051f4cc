"""`snakemake --report` holds every table, figure, QC thumbnail and runtime summary.

A tiny demo config is pointed at a temporary results tree in which every job up to `evaluate` is
"finished" with synthetic files (evaluations in the exact format `bd evaluate` writes; small real
PNGs for the QC thumbnails and training curves; Fig. 5 and heatmaps drawn from synthetic
features). Snakemake then runs the real table, figure and runtime-summary rules of all four
targets and builds the report, which must name every item.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bd.evaluation.clinical_report import OUTPUTS as CLINICAL_OUTPUTS
from synthetic_results import write_run

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["all", "ablations", "wsi_missing", "analysis"]
# Rules whose outputs this test leaves to Snakemake (the rules under test).
RUN_BY_SNAKEMAKE = {"table1", "table2", "table3", "fig1", "roc", "fig4ab", "fig4c", "runtime_summary",
                    "clinical_tables", "clinical_figures", "report_qc_images"}
pytestmark = pytest.mark.slow


def tiny_config(work: Path) -> dict:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    results = str(work / "results")
    config["results"] = results
    config["train_runs_per_job"] = 1  # rule evaluate per run (finish_upstream writes its outputs)
    config["segment_slides_per_job"] = 1  # rules segment and tile per slide, as finish_upstream expects
    config["demo"].update(out_dir=f"{results}/demo", patients=4, test_patients=None)
    config["cohort"].update(clinical_table=f"{results}/demo/patient-clinical-data.xlsx",
                            split_dir=f"{results}/demo/dataset-splitting")
    config["training"]["seeds"] = [0, 1]
    config["evaluation"].update(repeats=3, bootstrap=100)
    config["ablations"] = {"directions": ["none", "s2m", "m2s", "both"], "prompt_lengths": [10, 50],
                           "lambda_grid": [[0.2, 0.5], [0.6, 0.5]], "seeds": [0]}
    return config


def snakemake(work: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def png(path: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.text(0.1, 0.5, text, fontsize=6)
    ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def analysis_figures(results: Path) -> None:
    """Fig. 5 and heatmaps drawn by the real plotting code from synthetic features."""
    from bd.paper.figures import fig5
    from bd.paper.heatmaps import render_slide_heatmap

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 10)
    feats = rng.normal(size=(20, 6)) + labels[:, None]
    fig5([("single", feats), ("multi", feats * 0.5)], labels, 30, results / "figures" / "fig5.png")
    coords = np.array([[x, y] for x in range(0, 1500, 256) for y in range(0, 1500, 256)])
    for pid in ("1", "2"):
        render_slide_heatmap(ROOT / "tests" / "data" / "cmu-1-small-region.svs", coords, 256.0,
                             rng.random(len(coords)), f"patient {pid}",
                             results / "figures" / "heatmaps" / f"{pid}_{pid}.png", max_thumbnail=200)


def finish_upstream(work: Path, outputs: list[tuple[str, str]]) -> None:
    """Create every output of the DAG that the rules under test do not write."""
    results = work / "results"
    done = set()
    for path, rule in outputs:
        p = Path(path) if Path(path).is_absolute() else work / path
        if rule in RUN_BY_SNAKEMAKE or p in done:
            continue
        if rule == "evaluate":
            exp, seed = p.parent.parent.name, int(p.parent.name.removeprefix("seed"))
            write_run(results, exp, seed)
            done.update(p.parent / n for n in ("metrics.csv", "predictions.csv", "summary.csv",
                                                *(f"{t}.csv" for t in CLINICAL_OUTPUTS)))
        elif rule in ("fig5", "heatmaps"):
            if not (results / "figures" / "fig5.png").exists():
                analysis_figures(results)
        elif p.suffix == ".zarr" or p.name == "annotations":
            p.mkdir(parents=True, exist_ok=True)
        elif p.suffix == ".png":
            png(p, f"{rule}: {p.name}")
        elif p.suffix == ".csv" and rule == "clinical":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("section,split,column,statistic,value\npatients,all,label=0,count,2\n")
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        done.add(p)
    # the sample sheet (read by rule report_qc_images): one row per slide with a segmentation QC image
    slides = sorted(p.parent.name for p in done if p.name == "qc.png" and p.parent.parent.name == "segment")
    (results / "samples.tsv").write_text("slide_id\tpatient_id\tpath\n" + "".join(f"{s}\t{s}\tx\n" for s in slides))
    done.add(results / "samples.tsv")
    # benchmark files of the finished jobs, for the runtime summaries
    for rule, jobs in {"segment": 4, "extract": 4, "train": 3, "evaluate": 3}.items():
        for j in range(jobs):
            b = results / "benchmarks" / rule / f"{j}.tsv"
            b.parent.mkdir(parents=True, exist_ok=True)
            b.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                         f"{1.5 + j}\t0:00:01\t{200 + 10 * j}\t1\t1\t1\t0\t0\t0\t1\n")
    stamp = 1_700_000_000
    for p in done:
        os.utime(p, (stamp, stamp))


def test_report_contains_every_item(tmp_path):
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(tiny_config(work)))
    summary = snakemake(work, *TARGETS, "--summary")
    assert summary.returncode == 0, summary.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(summary.stdout[summary.stdout.index("output_file"):]), delimiter="\t"))
    outputs = [(r["output_file"], r["rule"]) for r in rows]
    assert {rule for _, rule in outputs} >= RUN_BY_SNAKEMAKE | {"evaluate", "segment", "tile", "train"}
    finish_upstream(work, outputs)

    run = snakemake(work, *TARGETS)
    assert run.returncode == 0, run.stderr[-5000:]
    ran = {line.split("rule ")[1].rstrip(":").strip() for line in run.stderr.splitlines() if line.startswith("rule ")}
    assert ran <= RUN_BY_SNAKEMAKE | set(TARGETS), f"upstream jobs were re-run: {ran - RUN_BY_SNAKEMAKE}"
    results = work / "results"
    for name in ("table1", "table2", "table3"):
        assert (results / "tables" / f"{name}.md").read_text().startswith("| Missing rate (%)")
    assert (results / "tables" / "operating_point.md").read_text().startswith("| Method | Missing |")
    assert (results / "figures" / "decision_curve.png").stat().st_size > 10_000
    runtime = (results / "runtime" / "all.csv").read_text()
    assert "segment" in runtime and "evaluate" in runtime

    report = work / "report.html"
    built = snakemake(work, *TARGETS, "--report", str(report))
    assert built.returncode == 0, built.stderr[-5000:]
    html = report.read_text(errors="replace")
    items = ["table1.html", "table2.html", "table3.html", "fig1.png", "roc.png", "fig4ab.png", "fig4c.png",
             "fig5.png", "1_1.png", "2_2.png", "all.html", "all.png", "ablations.png", "wsi_missing.png",
             "analysis.png", "1.jpg", "curve.png", "summary.html", "slide_errors.html", "cohort_checks.html",
             "operating_point.html", "subgroup_auc.html", "calibration.png", "decision_curve.png"]
    missing = [item for item in items if item not in html]
    assert not missing, f"report lacks {missing}"
    for category in ("Tables", "Figures", "Runtime", "Quality control", "Attention heatmaps", "Clinical report"):
        assert category in html
    # Every table is shown as a table: an HTML page holding a <table>, never a CSV/TSV download.
    embedded = report_items(html)
    assert not [n for n, (mime, _) in embedded.items() if mime in ("text/csv", "text/tab-separated-values")]
    for name in ("table1.html", "table2.html", "table3.html", "all.html", "ablations.html"):  # made here
        mime, data = embedded[name]
        assert mime == "text/html" and b"<table>" in data and b"<td" in data, name
    for name in ("summary.html", "cohort_checks.html", "slide_errors.html"):  # upstream (made by a real run)
        assert embedded[name][0] == "text/html", name
    # The QC thumbnails are compact JPEGs (the full-size PNGs stay out of the report).
    qc = [(mime, data) for n, (mime, data) in embedded.items() if n.endswith(".jpg")]
    assert qc and all(m == "image/jpeg" for m, _ in qc)
    assert not [n for n in embedded if n.endswith("qc.png")]
    assert b"Missing rate (%)" in embedded["table1.html"][1]


def report_items(html: str) -> dict[str, tuple[str, bytes]]:
    """name -> (MIME type, decoded content) of every result embedded in a Snakemake report."""
    import base64
    import json
    import re

    start = html.index("var results = {") + len("var results = ")
    results, _ = json.JSONDecoder().raw_decode(html[start:])
    out = {}
    for path, entry in results.items():
        uri = entry["data_uri"]
        payload = uri.split(",", 1)[1]
        data = base64.b64decode(payload) if ";base64" in uri.split(",", 1)[0] else payload.encode()
        out[Path(path).name] = (entry["mime_type"], data)
        assert re.match(r"data:[\w/+.-]+", uri), path
    return out
