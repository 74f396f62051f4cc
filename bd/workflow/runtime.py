"""``bd runtime-summary``: per-rule runtime and memory of a workflow run, from Snakemake's benchmark files.

``bd runtime-summary --benchmarks DIR --out-csv F --out-png F`` summarises the benchmark files
(wall time ``s``, peak memory ``max_rss`` in MB, ...) per rule; each workflow target's report
holds its summary (rule runtime_summary).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bd.errors import BDError
from bd.io import atomic_path

log = logging.getLogger(__name__)

BENCHMARK_NUMBERS = ["s", "max_rss", "max_vms", "io_in", "io_out", "mean_load", "cpu_time"]


def read_benchmarks(folder: str | Path) -> pd.DataFrame:
    """Every Snakemake benchmark TSV under ``folder``: one row per job, with its rule (the first
    path component) and job (the rest of the path)."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        rel = path.relative_to(folder).with_suffix("")
        try:
            frame = pd.read_csv(path, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            log.warning("%s: skipped, not a benchmark table (%s)", path, exc)
            continue
        if "s" not in frame.columns or frame.empty:
            log.warning("%s: skipped, no 's' column", path)
            continue
        rec = {c: pd.to_numeric(frame[c], errors="coerce").mean() for c in BENCHMARK_NUMBERS if c in frame}
        rows.append({"rule": rel.parts[0], "job": "/".join(rel.parts[1:]) or rel.parts[0], **rec})
    if not rows:
        raise BDError(f"{folder}: no Snakemake benchmark files (*.tsv) found")
    return pd.DataFrame(rows)


def runtime_summary(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, total / mean / max wall seconds, peak and mean memory (MB), CPU seconds."""
    g = jobs.groupby("rule")
    out = pd.DataFrame({
        "jobs": g.size(),
        "total_s": g["s"].sum(), "mean_s": g["s"].mean(), "max_s": g["s"].max(),
        "max_rss_mb": g["max_rss"].max() if "max_rss" in jobs else np.nan,
        "mean_rss_mb": g["max_rss"].mean() if "max_rss" in jobs else np.nan,
        "cpu_s": g["cpu_time"].sum() if "cpu_time" in jobs else np.nan,
    }).reset_index()
    return out.sort_values("total_s", ascending=False).reset_index(drop=True)


def plot_runtime(summary: pd.DataFrame, path: Path) -> None:
    """Two bar charts: total wall time and peak memory per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary.iloc[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(s) + 1.5), sharey=True)
    axes[0].barh(s["rule"], s["total_s"], color="tab:blue")
    axes[0].set_xlabel("total wall time (s)")
    for y, (t, n) in enumerate(zip(s["total_s"], s["jobs"])):
        axes[0].text(t, y, f" {t:.0f} s / {n} job{'s' if n != 1 else ''}", va="center", fontsize=7)
    axes[0].set_xlim(0, max(float(s["total_s"].max()), 1e-9) * 1.4)
    axes[1].barh(s["rule"], s["max_rss_mb"].fillna(0), color="tab:orange")
    axes[1].set_xlabel("peak resident memory (MB)")
    axes[0].set_title("Runtime per rule")
    axes[1].set_title("Memory per rule")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def add_arguments_runtime_summary(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmarks", required=True, help="folder of Snakemake benchmark TSVs (results/benchmarks)")
    parser.add_argument("--out-csv", required=True, help="per-rule summary table")
    parser.add_argument("--out-png", required=True, help="per-rule bar charts")
    parser.add_argument("--jobs-csv", default=None, help="optional: one row per job")


def run_runtime_summary(args: argparse.Namespace) -> int:
    jobs = read_benchmarks(args.benchmarks)
    summary = runtime_summary(jobs)
    with atomic_path(args.out_csv) as tmp:
        summary.round(3).to_csv(tmp, index=False)
    if args.jobs_csv:
        with atomic_path(args.jobs_csv) as tmp:
            jobs.round(3).to_csv(tmp, index=False)
    plot_runtime(summary, Path(args.out_png))
    print(summary.round(2).to_string(index=False))
    return 0
