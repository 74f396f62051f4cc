"""The paper's tables from the evaluations of all runs.

``bd aggregate table1|table2|table3 --metrics .../metrics.csv ... --out-dir DIR`` writes
``DIR/<table>.csv`` and ``DIR/<table>.md``. Values are percentages, as in the paper: the mean and
standard deviation over every mask (repeat) and training seed; the CI columns are the mean over
seeds of each run's bootstrap 95 % interval (from the ``summary.csv`` beside each metrics file).
The Markdown puts the paper's published numbers beside ours.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bd.errors import BDError, TableError
from bd.io import atomic_path, write_text
from bd.methods import DIRECTIONS, label_of, list_methods

log = logging.getLogger(__name__)

# Single-modality references: Table I shows them at 0 % only, as the paper does; the change
# columns are against the baseline (both from the registry of methods).
REFERENCE_METHODS = tuple(list_methods(role="reference"))
BASELINE = list_methods(role="baseline")[0]

# The paper's published numbers (percent), shown beside ours in the Markdown tables.
PAPER_TABLE1 = {  # (rate, method) -> (AUC, F1)
    (0, "image_only"): (82.3, 72.2), (0, "clinical_only"): (71.6, 62.2),
    (0, "filling"): (84.1, 73.6), (0, "ae"): (84.1, 73.6), (0, "ensemble"): (85.1, 74.0),
    (0, "smil"): (82.6, 72.7), (0, "bd"): (86.1, 75.8),
    (50, "filling"): (81.8, 71.5), (50, "ae"): (81.3, 71.5), (50, "ensemble"): (83.7, 73.0),
    (50, "smil"): (82.2, 73.2), (50, "bd"): (85.0, 74.1),
    (80, "filling"): (79.1, 70.7), (80, "ae"): (79.9, 70.6), (80, "ensemble"): (82.8, 71.7),
    (80, "smil"): (80.0, 71.5), (80, "bd"): (84.2, 74.9),
    (100, "filling"): (78.9, 68.7), (100, "ae"): (79.6, 69.4), (100, "ensemble"): (82.3, 72.2),
    (100, "smil"): (78.8, 69.7), (100, "bd"): (82.7, 72.7),
}
PAPER_TABLE2 = {(0, "none"): 74.2, (0, "s2m"): 75.8, (0, "m2s"): 74.2,
                (80, "none"): 72.0, (80, "s2m"): 72.1, (80, "m2s"): 73.8,
                (0, "both"): 75.8, (80, "both"): 74.9}  # F1; "both" is the full BD of Table I
PAPER_TABLE3 = {(0.2, 0.5): (71.7, 30), (0.4, 0.5): (70.3, 26), (0.6, 0.5): (72.7, 31),
                (0.8, 0.5): (72.2, 28), (0.6, 0.2): (71.0, 33), (0.6, 0.4): (72.3, 31),
                (0.6, 0.6): (71.3, 29), (0.6, 0.8): (70.8, 17)}  # F1, epoch

METRIC_COLUMNS = ["experiment", "method", "seed", "kind", "rate", "repeat", "auc", "f1"]
CI_COLUMNS = ["auc_ci_low", "auc_ci_high", "f1_ci_low", "f1_ci_high"]


# ---------------------------------------------------------------- reading evaluations

def read_evaluations(paths: Sequence[str | Path], need: Sequence[str], what: str, flag: str) -> pd.DataFrame:
    """Concatenate per-run tables of ``bd evaluate`` (``what``: metrics.csv, operating_point.csv, ...),
    each with a ``source`` column; a missing file or column names the file."""
    if not paths:
        raise BDError(f"no {what} files given ({flag})")
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise TableError(f"{path}: {what} file does not exist (run `bd evaluate` first)")
        frame = pd.read_csv(path)
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}; is it a `bd evaluate` {what}?")
        frames.append(frame.assign(source=str(path)))
    out = pd.concat(frames, ignore_index=True)
    out["rate"] = out["rate"].astype(float)
    return out


def read_metrics(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate metrics.csv files; each must have the evaluation's columns."""
    return read_evaluations(paths, METRIC_COLUMNS, "metrics.csv", "--metrics")


def read_summaries(metric_paths: Sequence[str | Path]) -> pd.DataFrame:
    """The summary.csv files beside the metrics files (bootstrap CIs); empty if none exist."""
    beside = [Path(p).with_name("summary.csv") for p in metric_paths]
    return read_summary_files([p for p in beside if p.is_file()])


def summaries_of(args: argparse.Namespace, beside: Sequence[str | Path]) -> pd.DataFrame:
    """A command's ``--summaries`` files (the workflow declares them), else those beside ``beside``."""
    return read_summary_files(args.summaries) if args.summaries else read_summaries(beside)


def read_summary_files(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate summary.csv files of `bd evaluate` (bootstrap CIs); each must exist."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise TableError(f"{missing[0]}: summary file does not exist (run `bd evaluate` first)")
    frames = [pd.read_csv(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=["experiment", "seed", "kind", "rate", *CI_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    out["rate"] = out["rate"].astype(float)
    return out


def pooled(metrics: pd.DataFrame, keys: list[str], summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean and sd (percent) of AUC and F1 over masks and seeds per ``keys``, plus mean CIs."""
    g = metrics.groupby(keys, sort=False)
    out = pd.DataFrame({
        "auc_pct": g["auc"].mean() * 100, "auc_pct_sd": g["auc"].std(ddof=0) * 100,
        "f1_pct": g["f1"].mean() * 100, "f1_pct_sd": g["f1"].std(ddof=0) * 100,
        "seeds": g["seed"].nunique(), "masks": g.size(),
    }).reset_index()
    if summaries is not None and len(summaries):
        ci_keys = [k for k in keys if k in summaries.columns]
        ci = summaries.groupby(ci_keys, sort=False)[CI_COLUMNS].mean() * 100
        ci.columns = [c.replace("_ci", "_pct_ci") for c in CI_COLUMNS]
        out = out.merge(ci.reset_index(), on=ci_keys, how="left")
    return out


def _pm(mean: float, sd: float, bold: bool = False) -> str:
    if not np.isfinite(mean):
        return "n/a"
    text = f"{mean:.1f} ± {sd:.1f}"
    return f"**{text}**" if bold else text


def _num(x: float, signed: bool = False, integer: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    if integer:
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def markdown(header: list[str], rows: list[list[str]], note: str = "") -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


# ---------------------------------------------------------------- Table I

def table1(metrics: pd.DataFrame, rates: Sequence[float], summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """Methods x clinical missing rates, with the change against Filling (percentage points)."""
    m = metrics[(metrics["kind"] == "clinical") & metrics["rate"].isin([float(r) for r in rates])]
    if m.empty:
        raise TableError(f"no clinical-missing evaluations at rates {list(rates)} in the metrics files")
    order = list(dict.fromkeys(m["method"]))
    m = m[~m["method"].isin(REFERENCE_METHODS) | (m["rate"] == 0)]
    t = pooled(m, ["rate", "method"], summaries)
    base = t[t["method"] == BASELINE].set_index("rate")[["auc_pct", "f1_pct"]]
    if base.empty:
        log.warning("no '%s' runs: the change columns are left empty", BASELINE)
    t["delta_auc_pct"] = t["auc_pct"] - t["rate"].map(base["auc_pct"])
    t["delta_f1_pct"] = t["f1_pct"] - t["rate"].map(base["f1_pct"])
    t.loc[t["method"].isin([*REFERENCE_METHODS, BASELINE]), ["delta_auc_pct", "delta_f1_pct"]] = np.nan
    t["label"] = t["method"].map(label_of)
    t["paper_auc_pct"] = [PAPER_TABLE1.get((int(r), x), (np.nan,))[0] for r, x in zip(t["rate"], t["method"])]
    t["paper_f1_pct"] = [PAPER_TABLE1.get((int(r), x), (np.nan, np.nan))[1] for r, x in zip(t["rate"], t["method"])]
    t["_order"] = t["method"].map({x: i for i, x in enumerate(order)})
    t = t.sort_values(["rate", "_order"]).drop(columns="_order").reset_index(drop=True)
    lead = ["rate", "method", "label", "auc_pct", "auc_pct_sd", "delta_auc_pct", "f1_pct", "f1_pct_sd", "delta_f1_pct"]
    return t[lead + [c for c in t.columns if c not in lead]]


def table1_markdown(t: pd.DataFrame) -> str:
    rows = []
    for rate, part in t.groupby("rate", sort=False):
        comp = part[~part["method"].isin(REFERENCE_METHODS)]
        best_auc = comp["auc_pct"].max() if len(comp) else np.nan
        best_f1 = comp["f1_pct"].max() if len(comp) else np.nan
        for r in part.itertuples():
            ref = r.method in REFERENCE_METHODS
            rows.append([
                f"{rate:g}", r.label,
                _pm(r.auc_pct, r.auc_pct_sd, bold=not ref and r.auc_pct == best_auc),
                _num(r.delta_auc_pct, signed=True),
                _pm(r.f1_pct, r.f1_pct_sd, bold=not ref and r.f1_pct == best_f1),
                _num(r.delta_f1_pct, signed=True),
                f"{_num(r.paper_auc_pct)} / {_num(r.paper_f1_pct)}",
            ])
    note = ("Percent; mean ± sd over missing-data masks and training seeds "
            f"({int(t['seeds'].max())} seed(s), {int(t['masks'].max())} masks per cell at most); "
            "Δ against Filling at the same rate; best of the missing-data methods in bold. "
            "Last column: the paper's Table I (BCNB).")
    return markdown(["Missing rate (%)", "Method", "AUC", "Δ AUC", "F1", "Δ F1", "Paper AUC / F1"], rows, note)


# ---------------------------------------------------------------- Table II

DIRECTION_ORDER = ["none", "s2m", "m2s", "both"]  # Table II's row order (the settings: bd.methods.DIRECTIONS)


def _directions(metrics: pd.DataFrame) -> pd.Series:
    """The distillation directions of each row: the run's ``directions`` or the experiment name."""
    from_name = metrics["experiment"].str.extract(r"^bd-dir-(\w+)$")[0]
    col = metrics["directions"] if "directions" in metrics.columns else pd.Series(np.nan, index=metrics.index)
    return col.where(col.notna() & (col.astype(str) != ""), from_name)


def table2(metrics: pd.DataFrame, rates: Sequence[float], summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """Distillation directions (S->M, M->S) at the given clinical missing rates."""
    m = metrics.assign(directions=_directions(metrics))
    m = m[(m["kind"] == "clinical") & m["rate"].isin([float(r) for r in rates]) & m["directions"].notna()
          & (m["method"] == "bd")]
    if m.empty:
        raise TableError("no BD runs with distillation directions (experiments bd-dir-*) in the metrics files")
    t = pooled(m, ["rate", "directions"], summaries.assign(directions=_directions(summaries))
               if summaries is not None and len(summaries) else None)
    t["m_to_s"] = t["directions"].map(lambda d: DIRECTIONS[d][0])  # (M->S, S->M) switches of each setting
    t["s_to_m"] = t["directions"].map(lambda d: DIRECTIONS[d][1])
    t["paper_f1_pct"] = [PAPER_TABLE2.get((int(r), d), np.nan) for r, d in zip(t["rate"], t["directions"])]
    rank = {d: i for i, d in enumerate(DIRECTION_ORDER)}
    t = t.sort_values(["rate", "directions"], key=lambda s: s.map(rank) if s.name == "directions" else s)
    lead = ["rate", "directions", "s_to_m", "m_to_s", "f1_pct", "f1_pct_sd", "auc_pct", "auc_pct_sd"]
    return t[lead + [c for c in t.columns if c not in lead]].reset_index(drop=True)


def table2_markdown(t: pd.DataFrame) -> str:
    tick = lambda b: "✓" if b else ""
    rows = [[f"{r.rate:g}", tick(r.s_to_m), tick(r.m_to_s), _pm(r.f1_pct, r.f1_pct_sd),
             _pm(r.auc_pct, r.auc_pct_sd), _num(r.paper_f1_pct)] for r in t.itertuples()]
    note = ("Percent; mean ± sd over masks and seeds. S→M: the multi-modal branch learns from the "
            "single-modal one; M→S: the reverse. Last column: the paper's Table II (BCNB; both "
            "directions: the full BD of its Table I).")
    return markdown(["Missing rate (%)", "S→M", "M→S", "F1", "AUC", "Paper F1"], rows, note)


# ---------------------------------------------------------------- Table III

def table3(metrics: pd.DataFrame, rates: Sequence[float], summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """The lambda_m / lambda_s grid at the given clinical missing rate(s), with the chosen epoch."""
    need = ["lambda_m", "lambda_s"]
    missing = [c for c in need if c not in metrics.columns]
    if missing:
        raise TableError(f"metrics files lack column(s) {missing}: re-run `bd evaluate`")
    m = metrics[(metrics["kind"] == "clinical") & metrics["rate"].isin([float(r) for r in rates])]
    m = m[(m["method"] == "bd") & m["lambda_m"].notna() & m["lambda_s"].notna()]
    if m.empty:
        raise TableError("no BD runs with lambda_m/lambda_s (experiments bd-lm-*) in the metrics files")
    order = list(dict.fromkeys(zip(m["lambda_m"], m["lambda_s"])))
    t = pooled(m, ["rate", "lambda_m", "lambda_s"], summaries)
    if "epoch" in m.columns:
        per_run = m.groupby(["rate", "lambda_m", "lambda_s", "seed"])["epoch"].first()
        t = t.merge(per_run.groupby(level=[0, 1, 2]).mean().rename("epoch").reset_index(),
                    on=["rate", "lambda_m", "lambda_s"], how="left")
    else:
        t["epoch"] = np.nan
    t["paper_f1_pct"] = [PAPER_TABLE3.get((round(a, 3), round(b, 3)), (np.nan, np.nan))[0]
                         for a, b in zip(t["lambda_m"], t["lambda_s"])]
    t["paper_epoch"] = [PAPER_TABLE3.get((round(a, 3), round(b, 3)), (np.nan, np.nan))[1]
                        for a, b in zip(t["lambda_m"], t["lambda_s"])]
    t["_order"] = [order.index(k) for k in zip(t["lambda_m"], t["lambda_s"])]
    t = t.sort_values(["rate", "_order"]).drop(columns="_order").reset_index(drop=True)
    lead = ["rate", "lambda_m", "lambda_s", "f1_pct", "f1_pct_sd", "epoch", "auc_pct", "auc_pct_sd"]
    return t[lead + [c for c in t.columns if c not in lead]]


def table3_markdown(t: pd.DataFrame) -> str:
    rows = [[f"{r.rate:g}", f"{r.lambda_m:g}", f"{r.lambda_s:g}", _pm(r.f1_pct, r.f1_pct_sd),
             _num(r.epoch, integer=True), _pm(r.auc_pct, r.auc_pct_sd),
             f"{_num(r.paper_f1_pct)} / {_num(r.paper_epoch, integer=True)}"] for r in t.itertuples()]
    note = ("Percent; mean ± sd over masks and seeds. Epoch: the early-stopping epoch of the saved "
            "model (mean over seeds). Last column: the paper's Table III (BCNB).")
    return markdown(["Missing rate (%)", "λm", "λs", "F1", "Epoch", "AUC", "Paper F1 / epoch"], rows, note)


TABLES: dict[str, tuple[Callable[..., pd.DataFrame], Callable[[pd.DataFrame], str], list[float]]] = {
    "table1": (table1, table1_markdown, [0, 50, 80, 100]),
    "table2": (table2, table2_markdown, [0, 80]),
    "table3": (table3, table3_markdown, [100]),
}


def write_table(frame: pd.DataFrame, md: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """``name.csv`` (numbers rounded to 0.01) and ``name.md`` in ``out_dir``."""
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    with atomic_path(csv_path) as tmp:
        frame.round(2).to_csv(tmp, index=False)
    write_text(md_path, md)
    return csv_path, md_path


def add_arguments_aggregate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", choices=sorted(TABLES), help="which of the paper's tables")
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.csv files of `bd evaluate`")
    parser.add_argument("--summaries", nargs="+", default=None,
                        help="their summary.csv files (bootstrap CIs; default: those beside the metrics files)")
    parser.add_argument("--rates", default=None, help="clinical missing rates as a JSON list (default: the paper's)")
    parser.add_argument("--out-dir", required=True, help="output folder for <table>.csv and <table>.md")


def run_aggregate(args: argparse.Namespace) -> int:
    build, to_md, default_rates = TABLES[args.table]
    rates = json.loads(args.rates) if args.rates else default_rates
    if not isinstance(rates, list) or not rates:
        raise BDError(f"--rates: expected a non-empty JSON list of percentages, got {args.rates!r}")
    table = build(read_metrics(args.metrics), rates, summaries_of(args, args.metrics))
    md = to_md(table)
    csv_path, md_path = write_table(table, md, Path(args.out_dir), args.table)
    print(md)
    print(f"-> {csv_path}, {md_path}")
    return 0
