"""The paper's figures from the evaluations (and, for Fig. 5 and heatmaps, from trained runs).

``bd figures NAME ...`` with NAME one of:

- ``fig1``: AUC against the clinical missing rate (image only, Filling, BD, modality dropout), mean line and a
  band of one standard deviation over masks and seeds.
- ``fig4ab``: AUC (a) and F1 (b) against the rate of missing slides (Section III-E).
- ``fig4c``: ROC curves at 100 % clinical data missing, one per prompt length, with AUC and CI.
- ``roc``: ROC curves of every method, one panel per clinical missing rate.
- ``fig5``: t-SNE of the slide features of a single-modal model (a) and of multi-modal Filling
  models whose clinical feature is 20x and 40x the clinical input's width (b, c), as the paper.
- ``s2m``: what BD's distillation directions do: linear CKA between the multi-modal branch's
  slide feature ``f_wm`` and the single-modal one's ``f_ws`` per direction setting (S->M should
  raise it), S->M's share of L_mul per epoch, and the single-modal branch's test probabilities
  with and without M->S.
- ``heatmaps``: attention over slide thumbnails for a few test patients.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.evaluation import metrics as M
from bd.methods import colour_of as color_of, label_of, list_methods
from bd.paper.heatmaps import choose_patients, write_heatmaps
from bd.paper.plot import plt, save
from bd.paper.s2m import s2m_figure
from bd.paper.tables import read_metrics, summaries_of
from bd.errors import BDError, TableError
from bd.io import atomic_path

log = logging.getLogger(__name__)


def read_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate predictions.csv files of `bd evaluate`."""
    need = ["experiment", "method", "seed", "kind", "rate", "repeat", "patient_id", "label", "prob"]
    frames = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise TableError(f"{path}: predictions file does not exist (run `bd evaluate` first)")
        frame = pd.read_csv(path, dtype={"patient_id": str})
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}; is it a `bd evaluate` predictions.csv?")
        frames.append(frame)
    if not frames:
        raise BDError("no predictions files given (--predictions)")
    out = pd.concat(frames, ignore_index=True)
    out["rate"] = out["rate"].astype(float)
    return out


# ---------------------------------------------------------------- curves over missing rates

def rate_curve(metrics: pd.DataFrame, kind: str, method: str, metric: str) -> pd.DataFrame:
    """Mean and sd of ``metric`` per rate over masks and seeds, for one method and missing kind."""
    m = metrics[(metrics["kind"] == kind) & (metrics["method"] == method)]
    return m.groupby("rate")[metric].agg(mean="mean", sd=lambda s: s.std(ddof=0)).reset_index()


def plot_rate_curves(ax: plt.Axes, metrics: pd.DataFrame, kind: str, methods: Sequence[str], metric: str) -> None:
    """One line per method with a +-1 sd band; methods without runs of ``kind`` are skipped."""
    for i, method in enumerate(methods):
        c = rate_curve(metrics, kind, method, metric)
        if c.empty:
            log.warning("no %s-missing evaluations of %s: left out of the figure", kind, method)
            continue
        color = color_of(method, i)
        ax.plot(c["rate"], c["mean"], "o-", color=color, label=label_of(method), ms=3.5, lw=1.6)
        ax.fill_between(c["rate"], np.clip(c["mean"] - c["sd"], 0, 1), np.clip(c["mean"] + c["sd"], 0, 1),
                        color=color, alpha=0.18, lw=0)
    what = "clinical data" if kind == "clinical" else "slides"
    ax.set_xlabel(f"missing rate of {what} (%)")
    ax.set_ylabel(metric.upper() if metric == "auc" else "F1 (macro)")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)


def fig1(metrics: pd.DataFrame, methods: Sequence[str], out: Path) -> Path:
    """Fig. 1: AUC against the clinical-data missing rate."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    plot_rate_curves(ax, metrics, "clinical", methods, "auc")
    n_seeds = metrics.groupby("method")["seed"].nunique().max()
    ax.set_title(f"AUC vs clinical missing rate (mean ± sd, {n_seeds} seed(s) x masks)", fontsize=9)
    return save(fig, out)


def fig4ab(metrics: pd.DataFrame, methods: Sequence[str], out: Path) -> Path:
    """Fig. 4 a/b: AUC and F1 against the rate of missing slides."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, tag in zip(axes, ("auc", "f1"), "ab"):
        plot_rate_curves(ax, metrics, "slide", methods, metric)
        ax.set_title(f"({tag}) {metric.upper()} with slides missing", fontsize=9)
    return save(fig, out)


# ---------------------------------------------------------------- ROC figures

def run_rocs(preds: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ROC per (seed, repeat) of a prediction table, for averaging."""
    return [M.roc(g["label"], g["prob"]) for _, g in preds.groupby(["seed", "repeat"]) if g["label"].nunique() == 2]


def plot_mean_roc(ax: plt.Axes, preds: pd.DataFrame, label: str, color: str, band: bool = True) -> float:
    """Mean ROC over seeds and masks with a +-1 sd band; returns the mean AUC."""
    curves = run_rocs(preds)
    if not curves:
        return float("nan")
    aucs = [M.auc(g["label"], g["prob"]) for _, g in preds.groupby(["seed", "repeat"])]
    grid, mean, sd = M.mean_roc(curves)
    ax.plot(grid, mean, color=color, lw=1.6, label=label.format(auc=np.nanmean(aucs), sd=np.nanstd(aucs)))
    if band:
        ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=color, alpha=0.12, lw=0)
    return float(np.nanmean(aucs))


def _roc_axes(ax: plt.Axes, title: str) -> None:
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=7, loc="lower right")


def roc_figure(preds: pd.DataFrame, rates: Sequence[float], out: Path) -> Path:
    """ROC curves of every method (clinical kind), one panel per missing rate."""
    p = preds[preds["kind"] == "clinical"]
    methods = list(dict.fromkeys(p["method"]))
    fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for i, method in enumerate(methods):
            sub = p[(p["method"] == method) & (p["rate"] == float(rate))]
            if len(sub):
                plot_mean_roc(ax, sub, f"{label_of(method)} (AUC {{auc:.3f}} ± {{sd:.3f}})", color_of(method, i), band=False)
        _roc_axes(ax, f"clinical data missing: {rate:g} %")
    return save(fig, out)


def prompt_length_of(frame: pd.DataFrame) -> pd.Series:
    """Prompt length per row: the run's recorded value, else from the experiment name."""
    from_name = pd.to_numeric(frame["experiment"].str.extract(r"^bd-prompt-(\d+)$")[0], errors="coerce")
    if "prompt_length" in frame.columns:
        return pd.to_numeric(frame["prompt_length"], errors="coerce").fillna(from_name)
    return from_name


def fig4c(preds: pd.DataFrame, summaries: pd.DataFrame, rate: float, out: Path) -> Path:
    """Fig. 4c: ROC, AUC and bootstrap 95 % CI per prompt length, clinical data missing at ``rate``."""
    p = preds[(preds["kind"] == "clinical") & (preds["rate"] == float(rate))]
    p = p.assign(length=prompt_length_of(p))
    p = p[p["experiment"].str.startswith("bd-prompt-") & p["length"].notna()]
    if p.empty:
        raise TableError(f"no prompt-length runs (experiments bd-prompt-*) evaluated at {rate:g} % missing")
    s = summaries[(summaries["kind"] == "clinical") & (summaries["rate"] == float(rate))] if len(summaries) else summaries
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for i, (length, sub) in enumerate(sorted(p.groupby("length"), key=lambda kv: kv[0])):
        ci = s[s["experiment"].isin(sub["experiment"].unique())] if len(s) else s
        lo, hi = (ci["auc_ci_low"].mean(), ci["auc_ci_high"].mean()) if len(ci) else (np.nan, np.nan)
        ci_text = f", 95 % CI {lo:.3f}-{hi:.3f}" if np.isfinite(lo) else ""
        plot_mean_roc(ax, sub, f"length {int(length)}: AUC {{auc:.3f}}{ci_text}", f"C{i}", band=False)
    _roc_axes(ax, f"prompt length, clinical data missing: {rate:g} %")
    return save(fig, out)


# ---------------------------------------------------------------- Fig. 5: t-SNE

def tsne_2d(features: np.ndarray, perplexity: float, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn) with the perplexity capped below the number of points."""
    from sklearn.manifold import TSNE

    n = features.shape[0]
    if n < 3:
        raise BDError(f"t-SNE needs at least 3 patients, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(
        np.asarray(features, np.float64))


def plot_embedding(ax: plt.Axes, xy: np.ndarray, labels: np.ndarray, title: str) -> None:
    """Points by class ('0' N0, '1' N+) and the class centres as stars, as in the paper."""
    for cls, color in ((0, "tab:blue"), (1, "tab:red")):
        pts = xy[labels == cls]
        if not len(pts):
            continue
        ax.scatter(pts[:, 0], pts[:, 1], s=10, color=color, alpha=0.6, label=f"{cls} ({'N0' if cls == 0 else 'N+'})")
        centre = pts.mean(axis=0)
        ax.scatter(*centre, marker="*", s=260, color=color, edgecolor="black", linewidth=0.8, zorder=5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(frameon=False, fontsize=7)


def fig5_titles(runs: Sequence[Any]) -> list[str]:
    """Panel titles from the runs: the method, and the clinical feature's width where it is wider."""
    titles = []
    for run in runs:
        params = dict(getattr(run, "params", {}) or {})
        method = label_of(getattr(run, "method", params.get("method", "?")))
        factor = params.get("clinical_expansion")
        if factor:
            titles.append(f"{method}, clinical feature {factor}x input width")
        else:
            titles.append(f"{'single' if run.method == 'image_only' else 'multi'}-modal model ({method})")
    return titles


def fig5(embeddings: Sequence[tuple[str, np.ndarray]], labels: np.ndarray, perplexity: float, out: Path) -> Path:
    """Fig. 5: t-SNE of slide features of each model, side by side."""
    fig, axes = plt.subplots(1, len(embeddings), figsize=(4.4 * len(embeddings), 4.2), squeeze=False)
    for ax, (title, feats), tag in zip(axes[0], embeddings, "abcdefgh"):
        plot_embedding(ax, tsne_2d(feats, perplexity), labels, f"({tag}) {title}")
    return save(fig, out)


# ---------------------------------------------------------------- attention heatmaps


# ---------------------------------------------------------------- commands

def _cmd_fig1(args: argparse.Namespace) -> Path:
    return fig1(read_metrics(args.metrics), args.methods, Path(args.out))


def _cmd_fig4ab(args: argparse.Namespace) -> Path:
    return fig4ab(read_metrics(args.metrics), args.methods, Path(args.out))


def _cmd_fig4c(args: argparse.Namespace) -> Path:
    return fig4c(read_predictions(args.predictions), summaries_of(args, args.predictions), args.rate, Path(args.out))


def _cmd_roc(args: argparse.Namespace) -> Path:
    rates = json.loads(args.rates) if isinstance(args.rates, str) else args.rates
    return roc_figure(read_predictions(args.predictions), [float(r) for r in rates], Path(args.out))


def _load(args: argparse.Namespace) -> Any:
    from bd.mil.bags import load_cohort

    return load_cohort(args.feature_index, args.samples, args.clinical, progress=False)


def _cmd_fig5(args: argparse.Namespace) -> Path:
    from bd.mil.runs import load_run

    runs = [load_run(path) for path in args.run]
    titles = args.titles or fig5_titles(runs)
    if len(args.run) != len(titles):
        raise BDError(f"give one --titles entry per --run ({len(args.run)} runs)")
    cohort = _load(args)
    cohort = cohort.select(np.flatnonzero(cohort.has_slide & np.isin(cohort.split, args.splits)))
    embeddings = [(title, np.asarray(run.slide_embeddings(cohort))) for run, title in zip(runs, titles)]
    return fig5(embeddings, np.asarray(cohort.labels), args.perplexity, Path(args.out))


# ---------------------------------------------------------------- S->M and M->S at work


def _cmd_s2m(args: argparse.Namespace) -> Path:
    from bd.mil.runs import load_run

    if len(args.curves) != len(args.run):
        raise BDError(f"give one --curves file per --run ({len(args.run)} runs)")
    runs = [load_run(path) for path in args.run]
    bad = [str(p) for p, r in zip(args.run, runs) if r.method != "bd"]
    if bad:
        raise BDError(f"the s2m figure takes BD runs; {bad[0]} is not one")
    cohort = _load(args)
    cohort = cohort.select(np.flatnonzero(cohort.has_slide & (cohort.split == "test")))
    curves = [pd.read_csv(p) for p in args.curves]
    path, table = s2m_figure(runs, curves, cohort, Path(args.out))
    with atomic_path(Path(args.out).with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    for row in table.itertuples():
        print(f"directions {row.directions} seed {row.seed}: CKA(f_wm, f_ws) {row.cka:.3f}, cosine {row.cosine:.3f}")
    return path


def _cmd_heatmaps(args: argparse.Namespace) -> Path:
    from bd.cohort.samples import read_samples
    from bd.mil.runs import load_run

    from bd.evaluation.evaluate import load_split_cohort

    run = load_run(args.run)
    cohort = load_split_cohort(args.feature_index, args.samples, args.clinical, "test", None)
    test = np.flatnonzero(cohort.has_slide)
    if not len(test):
        raise BDError(f"{args.clinical}: no test patient with a slide")
    chosen = choose_patients([cohort.patient_ids[i] for i in test], cohort.labels[test], args.patients)
    samples = read_samples(args.samples).set_index("slide_id")
    out_dir = Path(args.out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for pid in chosen:
            write_heatmaps(run, cohort, pid, samples, Path(args.feature_index), tmp, args.fallback_mpp)
    return out_dir


def _add_fig1(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.csv files of `bd evaluate`")
    p.add_argument("--methods", nargs="+", default=list_methods(figure="fig1"),
                   help="methods to draw, in legend order (default: the registry's for Fig. 1)")
    p.add_argument("--out", required=True, help="PNG to write")


def _add_fig4ab(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.csv files of `bd evaluate`")
    p.add_argument("--methods", nargs="+", default=list_methods(figure="wsi_missing"),
                   help="methods to draw, in legend order (default: the registry's for Fig. 4 a/b)")
    p.add_argument("--out", required=True, help="PNG to write")


def _add_fig4c(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", nargs="+", required=True, help="predictions.csv files of the bd-prompt-* runs")
    p.add_argument("--summaries", nargs="+", default=None,
                   help="their summary.csv files (AUC CIs; default: those beside the predictions files)")
    p.add_argument("--rate", type=float, default=100.0, help="clinical missing rate (%%)")
    p.add_argument("--out", required=True, help="PNG to write")


def _add_roc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", nargs="+", required=True, help="predictions.csv files of `bd evaluate`")
    p.add_argument("--rates", default="[0, 100]", help="clinical missing rates, one panel each (JSON list)")
    p.add_argument("--out", required=True, help="PNG to write")


def _add_cohort(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature-index", required=True, help="the feature index (index.tsv: slide_id, store) or a folder of {slide}.zarr stores")
    p.add_argument("--samples", required=True, help="sample sheet TSV (slide_id, patient_id, path)")
    p.add_argument("--clinical", required=True, help="normalised clinical table (clinical.tsv)")


def _add_fig5(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", nargs="+", required=True, help="trained runs (checkpoint.pt) to compare, single-modal first")
    p.add_argument("--titles", nargs="+", default=None, help="panel titles (default: from the runs)")
    _add_cohort(p)
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="patients to embed")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--out", required=True, help="PNG to write")


def _add_s2m(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", nargs="+", required=True, help="trained BD runs (checkpoint.pt; directions none, m2s, s2m, both)")
    p.add_argument("--curves", nargs="+", required=True, help="their curve.csv files, in the same order")
    _add_cohort(p)
    p.add_argument("--out", required=True, help="PNG to write (and the CKA table beside it as .csv)")


def _add_heatmaps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="trained run (checkpoint.pt) whose attention is drawn")
    _add_cohort(p)
    p.add_argument("--patients", type=int, default=4, help="test patients to draw (half N+, half N0)")
    p.add_argument("--fallback-mpp", type=float, default=None, help="microns per pixel of slides without any")
    p.add_argument("--out-dir", required=True, help="folder of <patient>_<slide>.png")


FIGURES: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Path], str]] = {
    "fig1": (_add_fig1, _cmd_fig1, "AUC vs clinical missing rate (image only, Filling, BD)"),
    "fig4ab": (_add_fig4ab, _cmd_fig4ab, "AUC and F1 vs slide missing rate"),
    "fig4c": (_add_fig4c, _cmd_fig4c, "ROC per prompt length at 100 %% clinical missing"),
    "roc": (_add_roc, _cmd_roc, "ROC curves of every method per missing rate"),
    "fig5": (_add_fig5, _cmd_fig5, "t-SNE of slide features: single- vs multi-modal models"),
    "s2m": (_add_s2m, _cmd_s2m, "BD: CKA(f_wm, f_ws) per distillation direction, S->M share, M->S effect"),
    "heatmaps": (_add_heatmaps, _cmd_heatmaps, "attention heatmaps over slide thumbnails"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    for name, (adder, _, summary) in FIGURES.items():
        adder(sub.add_parser(name, help=summary, description=summary))


def run(args: argparse.Namespace) -> int:
    out = FIGURES[args.figure][1](args)
    print(f"{args.figure} -> {out}")
    return 0
