"""Clinical reporting of a trained run, and its tables and figures over all runs.

Per run (:func:`run_tables`, called by ``bd evaluate``), under each of the run's missing kinds at
rate 0 % (the modality present for every patient) and 100 % (absent for every patient), from the
test predictions and, for the operating point, the validation predictions under the same
condition (:mod:`bd.evaluation.decision` holds the maths):

* ``calibration.csv``: the reliability table, ``bins`` equal-width bins of [0, 1];
* ``decision_curve.csv``: net benefit against the threshold probability (1-99 %), with the
  treat-all and treat-none references;
* ``operating_point.csv``: Brier score and ECE, then the threshold chosen on the *validation*
  split as the largest giving sensitivity >= ``target_sensitivity`` there, and the test
  split's sensitivity, specificity, PPV and NPV at it (with the counts);
* ``subgroups.csv``: test AUC by subgroup (age < 50 / >= 50, ER and HER2 positive / negative),
  with patients and N+ per subgroup; NaN and a reason where a subgroup has one class, where the
  feature is not among the run's clinical columns, or where no scaler is given. A patient whose
  value was missing (imputed; its ``<feature>_missing`` indicator is 1, or it has no clinical
  value at all) is in neither group (``n_unknown``).

Over all runs, ``bd clinical-report tables`` writes the operating-point and subgroup tables
(mean ± sd over seeds) and ``bd clinical-report figures`` a reliability diagram and a decision
curve per method (clinical data present and absent), the runs' bins and curves pooled over seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.evaluation import decision as D
from bd.errors import TableError
from bd.io import atomic_path, write_text

log = logging.getLogger(__name__)

REPORT_RATES = (0.0, 100.0)  # the conditions reported: modality present for all, absent for all
RUN_COLUMNS = ("experiment", "method", "seed")
OUTPUTS = ("calibration", "decision_curve", "operating_point", "subgroups")

# Subgroup name -> (clinical feature, test on the raw value). Binary features are 1 = positive.
SUBGROUPS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "age < 50": ("Age(years)", lambda v: v < 50),
    "age >= 50": ("Age(years)", lambda v: v >= 50),
    "ER positive": ("ER", lambda v: v > 0.5),
    "ER negative": ("ER", lambda v: v <= 0.5),
    "HER2 positive": ("HER2", lambda v: v > 0.5),
    "HER2 negative": ("HER2", lambda v: v <= 0.5),
}


# ---------------------------------------------------------------- per run

def condition_frame(predict: Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]], patient_ids: Sequence[str],
                    labels: np.ndarray, kinds: Sequence[str],
                    scored: Callable[[str, np.ndarray], np.ndarray]) -> pd.DataFrame:
    """Predictions of the scored patients under each kind at 0 % and 100 % missing: kind, rate,
    patient_id, label, prob, branch (``predict`` and ``scored`` as in :mod:`bd.evaluate`)."""
    frames = []
    n = len(patient_ids)
    for kind in kinds:
        for rate in REPORT_RATES:
            present = np.full(n, rate == 0.0)
            probs, branches = predict(kind, present)
            keep = scored(kind, present[None, :])[0]
            frames.append(pd.DataFrame({
                "kind": kind, "rate": rate, "patient_id": np.asarray(patient_ids, dtype=object)[keep],
                "label": np.asarray(labels, int)[keep], "prob": probs[keep], "branch": branches[keep],
            }))
    return pd.concat(frames, ignore_index=True)


def _branch(part: pd.DataFrame) -> str:
    return "+".join(sorted(set(part["branch"].astype(str))))


def calibration_table(test: pd.DataFrame, bins: int) -> pd.DataFrame:
    rows = []
    for (kind, rate), part in test.groupby(["kind", "rate"], sort=False):
        table = D.calibration_bins(part["label"].to_numpy(), part["prob"].to_numpy(), bins)
        rows.append(pd.DataFrame({"kind": kind, "rate": rate, "branch": _branch(part), **table}))
    return pd.concat(rows, ignore_index=True)


def decision_curve_table(test: pd.DataFrame, step: float = 0.01) -> pd.DataFrame:
    t = D.decision_thresholds(step)
    rows = []
    for (kind, rate), part in test.groupby(["kind", "rate"], sort=False):
        y, p = part["label"].to_numpy(), part["prob"].to_numpy()
        rows.append(pd.DataFrame({"kind": kind, "rate": rate, "branch": _branch(part), "threshold": t,
                                  "net_benefit": D.net_benefit(y, p, t), "treat_all": D.treat_all_net_benefit(y, t),
                                  "treat_none": 0.0}))
    return pd.concat(rows, ignore_index=True)


def operating_point_table(test: pd.DataFrame, val: pd.DataFrame, target: float, bins: int) -> pd.DataFrame:
    """Calibration summary and the validation-chosen operating point applied to test, per condition."""
    rows = []
    for (kind, rate), part in test.groupby(["kind", "rate"], sort=False):
        y, p = part["label"].to_numpy(), part["prob"].to_numpy()
        v = val[(val["kind"] == kind) & (val["rate"] == rate)]
        vy, vp = v["label"].to_numpy(), v["prob"].to_numpy()
        threshold = D.threshold_for_sensitivity(vy, vp, target)
        on_val = D.confusion_metrics(vy, vp, threshold)
        rows.append({
            "kind": kind, "rate": rate, "branch": _branch(part), "n": len(y), "n_positive": int(y.sum()),
            "brier": D.brier_score(y, p), "ece": D.ece(y, p, bins), "ece_bins": bins,
            "target_sensitivity": target, "threshold": threshold, "val_n": len(vy), "val_n_positive": int(vy.sum()),
            "val_sensitivity": on_val["sensitivity"], "val_specificity": on_val["specificity"],
            **D.confusion_metrics(y, p, threshold),
        })
    return pd.DataFrame(rows)


def raw_values(table: pd.DataFrame, scaler: Mapping[str, Any] | None, feature: str) -> tuple[np.ndarray | None, str]:
    """A feature's raw values (scaling undone) for the rows of ``table``, NaN where the value was
    missing; or None and the reason."""
    if scaler is None:
        return None, "no scaler.json given"
    state = next((f for f in scaler.get("features", []) if f.get("column") == feature), None)
    if state is None or feature not in table.columns:
        return None, f"{feature} is not a clinical feature of this run"
    if "mean" not in state or "std" not in state:
        return None, f"{feature} is not a numeric or binary feature"
    values = pd.to_numeric(table[feature], errors="coerce").to_numpy(float) * float(state["std"]) + float(state["mean"])
    missing = ~table["clinical_present"].astype(bool).to_numpy() if "clinical_present" in table.columns else np.zeros(len(table), bool)
    if f"{feature}_missing" in table.columns:
        missing |= pd.to_numeric(table[f"{feature}_missing"], errors="coerce").fillna(1).to_numpy() > 0.5
    return np.where(missing, np.nan, values), ""


def subgroup_table(test: pd.DataFrame, clinical: pd.DataFrame, scaler: Mapping[str, Any] | None) -> pd.DataFrame:
    """AUC per subgroup and condition (see the module docstring); ``clinical`` holds the
    normalised rows (``clinical.tsv``) of at least the test patients."""
    rows = clinical.set_index(clinical["patient_id"].astype(str))
    out = []
    for (kind, rate), part in test.groupby(["kind", "rate"], sort=False):
        y, p = part["label"].to_numpy(), part["prob"].to_numpy()
        sub = rows.reindex(part["patient_id"].astype(str))
        for name, (feature, test_fn) in SUBGROUPS.items():
            values, reason = raw_values(sub, scaler, feature)
            if values is None:
                out.append({"kind": kind, "rate": rate, "subgroup": name, "feature": feature, "n": 0,
                            "n_positive": 0, "n_unknown": len(y), "auc": math.nan, "reason": reason})
                continue
            known = np.isfinite(values)
            member = known & test_fn(np.where(known, values, 0.0))
            value, n, n_pos, why = D.subgroup_auc(y, p, member)
            out.append({"kind": kind, "rate": rate, "subgroup": name, "feature": feature, "n": n,
                        "n_positive": n_pos, "n_unknown": int((~known).sum()), "auc": value, "reason": why})
    return pd.DataFrame(out)


def run_tables(test: pd.DataFrame, val: pd.DataFrame, clinical: pd.DataFrame | None, scaler: Mapping[str, Any] | None,
               target: float, bins: int, info: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The four per-run tables (:data:`OUTPUTS`), each led by the run's identity columns."""
    lead = {k: info.get(k) for k in RUN_COLUMNS}
    tables = {
        "calibration": calibration_table(test, bins),
        "decision_curve": decision_curve_table(test),
        "operating_point": operating_point_table(test, val, target, bins),
        "subgroups": subgroup_table(test, clinical if clinical is not None else pd.DataFrame({"patient_id": []}), scaler),
    }
    return {name: frame.assign(**lead)[[*lead, *frame.columns]] for name, frame in tables.items()}


# ---------------------------------------------------------------- over all runs

def read_tables(paths: Sequence[str | Path], need: Sequence[str]) -> pd.DataFrame:
    """Concatenate per-run clinical-report tables of ``bd evaluate``; each must have the ``need`` columns."""
    from bd.paper.tables import read_evaluations

    return read_evaluations(paths, need, "clinical-report table", "--operating-points/--subgroups/...")


OP_METRICS = ("brier", "ece", "threshold", "sensitivity", "specificity", "ppv", "npv")


def _mean_sd(frame: pd.DataFrame, keys: list[str], columns: Sequence[str]) -> pd.DataFrame:
    g = frame.groupby(keys, sort=False)
    out = {"seeds": g["seed"].nunique()}
    for c in columns:
        out[c] = g[c].mean()
        out[f"{c}_sd"] = g[c].std(ddof=0)
    return pd.DataFrame(out).reset_index()


def _pm(mean: float, sd: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def operating_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of the calibration and operating-point metrics per method and condition."""
    out = _mean_sd(frame, ["method", "kind", "rate"], OP_METRICS)
    counts = frame.groupby(["method", "kind", "rate"], sort=False)[["n", "n_positive", "target_sensitivity", "ece_bins"]].first()
    return out.merge(counts.reset_index(), on=["method", "kind", "rate"])


def operating_markdown(t: pd.DataFrame) -> str:
    from bd.methods import label_of
    from bd.paper.tables import markdown

    rows = [[label_of(r.method), r.kind, f"{r.rate:g}", f"{int(r.n)} ({int(r.n_positive)})",
             _pm(r.brier, r.brier_sd, 3), _pm(r.ece, r.ece_sd, 3), _pm(r.threshold, r.threshold_sd),
             _pm(r.sensitivity, r.sensitivity_sd), _pm(r.specificity, r.specificity_sd),
             _pm(r.ppv, r.ppv_sd), _pm(r.npv, r.npv_sd)] for r in t.itertuples()]
    target = t["target_sensitivity"].iloc[0] if len(t) else 0.9
    bins = int(t["ece_bins"].iloc[0]) if len(t) else 10
    note = (f"Test split; mean ± sd over {int(t['seeds'].max()) if len(t) else 0} seed(s). Missing rate 0 %: the "
            "modality present for every patient, 100 %: absent for every patient. Brier score; ECE over "
            f"{bins} equal-width bins. Threshold: the largest giving sensitivity >= {target:g} on the "
            "validation split under the same condition, applied to test (N+ where p >= threshold).")
    return markdown(["Method", "Missing", "Rate (%)", "Test n (N+)", "Brier", "ECE", "Threshold",
                     "Sensitivity", "Specificity", "PPV", "NPV"], rows, note)


def subgroup_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of each subgroup's AUC, its counts, and why it is NaN where it is."""
    keys = ["method", "kind", "rate", "subgroup"]
    out = _mean_sd(frame, keys, ["auc"])
    g = frame.groupby(keys, sort=False)
    extra = pd.DataFrame({"n": g["n"].first(), "n_positive": g["n_positive"].first(), "n_unknown": g["n_unknown"].first(),
                          "reason": g["reason"].agg(lambda s: "; ".join(sorted({str(x) for x in s.dropna() if str(x)})))})
    return out.merge(extra.reset_index(), on=keys)


def subgroup_markdown(t: pd.DataFrame) -> str:
    from bd.methods import label_of
    from bd.paper.tables import markdown

    rows = [[label_of(r.method), r.kind, f"{r.rate:g}", r.subgroup,
             f"{int(r.n)} ({int(r.n_positive)})", _pm(r.auc, r.auc_sd), r.reason or ""] for r in t.itertuples()]
    note = ("Test AUC within each subgroup, mean ± sd over seeds; n (N+) patients in the subgroup; patients "
            "whose value was missing are in neither group. '-': AUC undefined, for the reason given.")
    return markdown(["Method", "Missing", "Rate (%)", "Subgroup", "n (N+)", "AUC", "Omitted because"], rows, note)


def write_table(out_dir: Path, name: str, frame: pd.DataFrame, md: str) -> None:
    with atomic_path(out_dir / f"{name}.csv") as tmp:
        frame.to_csv(tmp, index=False)
    write_text(out_dir / f"{name}.md", md)


def pooled_calibration(frame: pd.DataFrame) -> pd.DataFrame:
    """Reliability bins pooled over seeds: counts summed, mean probability weighted by them."""
    f = frame.assign(sum_p=frame["mean_prob"].fillna(0) * frame["n"])
    g = f.groupby(["method", "kind", "rate", "bin"], sort=False)
    out = pd.DataFrame({"n": g["n"].sum(), "n_positive": g["n_positive"].sum(), "sum_p": g["sum_p"].sum()}).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean_prob"] = np.where(out["n"] > 0, out["sum_p"] / out["n"], np.nan)
        out["observed"] = np.where(out["n"] > 0, out["n_positive"] / out["n"], np.nan)
    return out.drop(columns="sum_p")


RATE_STYLES = {0.0: ("tab:blue", "clinical data present"), 100.0: ("tab:red", "clinical data absent")}


def _panels(n: int) -> tuple[Any, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def calibration_figure(frame: pd.DataFrame, methods: Sequence[str], out: Path) -> Path:
    """A reliability diagram per method: observed N+ fraction against mean probability per bin."""
    from bd.methods import label_of
    from bd.paper.plot import save

    bins = pooled_calibration(frame[frame["kind"] == "clinical"])
    fig, axes = _panels(len(methods))
    for ax, method in zip(axes, methods):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
        for rate, (color, label) in RATE_STYLES.items():
            b = bins[(bins["method"] == method) & (bins["rate"] == rate) & (bins["n"] > 0)]
            if len(b):
                ax.plot(b["mean_prob"], b["observed"], "o-", color=color, ms=3, lw=1.3, label=label)
        ax.set_title(label_of(method), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed N+ fraction", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=7)
    n_bins = int(frame["bin"].max()) + 1 if len(frame) else 0
    fig.suptitle(f"Reliability on the test split ({n_bins} equal-width bins, seeds pooled)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save(fig, out)


def decision_figure(frame: pd.DataFrame, methods: Sequence[str], out: Path) -> Path:
    """A decision curve per method: net benefit against threshold probability, mean over seeds."""
    from bd.methods import label_of
    from bd.paper.plot import save

    f = frame[frame["kind"] == "clinical"]
    fig, axes = _panels(len(methods))
    for ax, method in zip(axes, methods):
        m = f[f["method"] == method]
        curves = m.groupby(["rate", "threshold"])[["net_benefit", "treat_all"]].mean().reset_index()
        top = 0.0
        for rate, (color, label) in RATE_STYLES.items():
            c = curves[curves["rate"] == rate]
            if len(c):
                ax.plot(c["threshold"], c["net_benefit"], color=color, lw=1.5, label=label)
                top = max(top, float(np.nanmax(c["net_benefit"])), float(np.nanmax(c["treat_all"])))
        c = curves[curves["rate"] == curves["rate"].min()] if len(curves) else curves
        ax.plot(c["threshold"], c["treat_all"], color="0.3", lw=1, ls="--", label="treat all")
        ax.axhline(0.0, color="0.3", lw=1, ls=":", label="treat none")
        ax.set_ylim(-0.05, max(top * 1.1, 0.05))
        ax.set_xlim(0, 1)
        ax.set_title(label_of(method), fontsize=9)
        ax.set_xlabel("threshold probability", fontsize=8)
        ax.set_ylabel("net benefit", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=7)
    fig.suptitle("Decision curves on the test split (mean over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save(fig, out)


def _methods(frame: pd.DataFrame, wanted: Sequence[str] | None) -> list[str]:
    have = list(dict.fromkeys(frame["method"]))
    return [m for m in wanted if m in have] if wanted else have


def _cmd_tables(args: argparse.Namespace) -> Path:
    out = Path(args.out_dir)
    ops = read_tables(args.operating_points, ["method", "seed", "kind", "rate", *OP_METRICS])
    subs = read_tables(args.subgroups, ["method", "seed", "kind", "rate", "subgroup", "auc", "reason"])
    t = operating_summary(ops)
    write_table(out, "operating_point", t, operating_markdown(t))
    s = subgroup_summary(subs)
    write_table(out, "subgroup_auc", s, subgroup_markdown(s))
    return out


def _cmd_figures(args: argparse.Namespace) -> Path:
    cal = read_tables(args.calibration, ["method", "seed", "kind", "rate", "bin", "n", "n_positive", "mean_prob"])
    dca = read_tables(args.decision_curves, ["method", "seed", "kind", "rate", "threshold", "net_benefit", "treat_all"])
    calibration_figure(cal, _methods(cal, args.methods), Path(args.calibration_out))
    decision_figure(dca, _methods(dca, args.methods), Path(args.decision_out))
    return Path(args.calibration_out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    t = sub.add_parser("tables", help="operating-point and subgroup-AUC tables over all runs")
    t.add_argument("--operating-points", nargs="+", required=True, help="operating_point.csv of each run")
    t.add_argument("--subgroups", nargs="+", required=True, help="subgroups.csv of each run")
    t.add_argument("--out-dir", required=True, help="folder for operating_point.csv|md and subgroup_auc.csv|md")
    t.set_defaults(command_fn=_cmd_tables)
    f = sub.add_parser("figures", help="reliability diagrams and decision curves, one panel per method")
    f.add_argument("--calibration", nargs="+", required=True, help="calibration.csv of each run")
    f.add_argument("--decision-curves", nargs="+", required=True, help="decision_curve.csv of each run")
    f.add_argument("--methods", nargs="*", default=None, help="methods in panel order (default: as read)")
    f.add_argument("--calibration-out", required=True, help="reliability diagram PNG")
    f.add_argument("--decision-out", required=True, help="decision curve PNG")
    f.set_defaults(command_fn=_cmd_figures)


def run(args: argparse.Namespace) -> int:
    out = args.command_fn(args)
    print(f"clinical-report {args.what} -> {out}")
    return 0


def read_scaler(path: str | Path | None) -> dict[str, Any] | None:
    """The ``scaler.json`` of ``bd clinical`` (None without a path)."""
    if path is None:
        return None
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: cannot read the scaler ({exc})") from exc
