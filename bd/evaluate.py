"""Evaluate a trained run on the test split at clinical-data (and slide) missing rates.

For every missing kind the run supports, every rate in ``missing_rates`` and ``curve_rates`` and
every repeat, a seeded mask (:mod:`bd.masks`, the same for every method and run) hides that
modality for some test patients; the run predicts, and AUC and macro F1 at the run's validation
threshold are recorded. A patient's prediction depends only on its own modalities, so the run is
asked twice per kind (all present, all missing) and the masks pick per patient; one mixed mask is
predicted directly to check that, falling back to one prediction per mask if it does not hold.

Writes ``metrics.csv`` (one row per kind, rate, repeat), ``predictions.csv`` (one row per patient
and mask) and ``summary.csv`` (mean, sd and bootstrap 95 % CI per kind and rate).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd import metrics as M
from bd.errors import BDError, ConfigError
from bd.io import atomic_path
from bd.masks import missing_mask
from bd.params import build

log = logging.getLogger(__name__)

# Which modality a missing-rate sweep removes; Section III-E is the "slide" sweep.
MISSING_KINDS = ("clinical", "slide")


@dataclass
class EvaluationParams:
    missing_rates: list[float] = field(default_factory=lambda: [0.0, 50.0, 80.0, 100.0])
    curve_rates: list[float] = field(default_factory=lambda: [float(r) for r in range(0, 101, 10)])
    repeats: int = 10
    seed: int = 0
    bootstrap: int = 1000
    # method -> the modalities to remove; methods not listed are swept over clinical data only.
    missing_kinds: dict[str, list[str]] = field(
        default_factory=lambda: {"bd_wsi": ["slide"], "filling": ["clinical", "slide"],
                                 "clinical_only": ["clinical", "slide"]}
    )
    # Figure settings of the section (read by `bd figures`; accepted so the section passes whole).
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("missing_rates", "curve_rates"):
            bad = [r for r in getattr(self, key) if not 0 <= r <= 100]
            if bad:
                raise ConfigError(f"evaluation.{key}: rate {bad[0]!r} is outside 0-100 (percent)")
        if self.repeats < 1:
            raise ConfigError(f"evaluation.repeats: {self.repeats} must be at least 1")
        for method, kinds in self.missing_kinds.items():
            bad = [k for k in kinds if k not in MISSING_KINDS]
            if bad:
                raise ConfigError(
                    f"evaluation.missing_kinds.{method}: unknown kind {bad[0]!r} (known: {list(MISSING_KINDS)})"
                )

    def rates(self) -> list[float]:
        """Every rate evaluated: the table rates and the curve rates, sorted."""
        return sorted({float(r) for r in [*self.missing_rates, *self.curve_rates]})

    def kinds(self, method: str) -> list[str]:
        return list(self.missing_kinds.get(method, ["clinical"]))


# predict(kind, present) -> probabilities and branches of the test patients, in their order.
PredictFn = Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Sweep:
    """All masks of one kind: probabilities, branches and presence, one row per mask."""

    kind: str
    rates: np.ndarray  # (K,)
    repeats: np.ndarray  # (K,)
    present: np.ndarray  # (K, n) bool
    probs: np.ndarray  # (K, n)
    branches: np.ndarray  # (K, n) str


def masks_for(patient_ids: list[str], kind: str, params: EvaluationParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rates, repeats, present K x n) for every rate and repeat of ``kind``."""
    rows = [(rate, rep) for rate in params.rates() for rep in range(params.repeats)]
    present = np.stack([~missing_mask(patient_ids, rate, rep, params.seed, kind) for rate, rep in rows])
    return np.array([r for r, _ in rows], float), np.array([r for _, r in rows], int), present


def sweep(predict: PredictFn, patient_ids: list[str], kind: str, params: EvaluationParams) -> Sweep:
    """Predictions for every mask of ``kind``, composed from the all-present and all-missing runs."""
    rates, repeats, present = masks_for(patient_ids, kind, params)
    n = len(patient_ids)
    p_on, b_on = predict(kind, np.ones(n, bool))
    p_off, b_off = predict(kind, np.zeros(n, bool))
    probs = np.where(present, p_on[None, :], p_off[None, :])
    branches = np.where(present, b_on[None, :], b_off[None, :])
    mixed = np.flatnonzero(present.any(axis=1) & ~present.all(axis=1))
    if mixed.size:
        k = int(mixed[0])
        p_k, b_k = predict(kind, present[k])
        if not (np.allclose(p_k, probs[k], atol=1e-5) and np.array_equal(b_k, branches[k])):
            log.warning("%s: predictions depend on other patients' modalities; predicting every mask", kind)
            out = [predict(kind, row) for row in present]
            probs = np.stack([p for p, _ in out])
            branches = np.stack([b for _, b in out])
    return Sweep(kind, rates, repeats, present, probs, branches)


def score(sweep_: Sweep, labels: np.ndarray, threshold: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted K x n, auc K, f1 K) for every mask of a sweep."""
    predicted = M.threshold_predictions(sweep_.probs, threshold, sweep_.branches)
    aucs = M.auc_columns(labels, sweep_.probs.T)
    f1s = M.f1_macro_columns(labels, predicted.T)
    return predicted, aucs, f1s


def _bootstrap_seed(seed: int, kind: str, rate: float) -> list[int]:
    """The same resamples for every method and run at a given kind and rate (paired CIs)."""
    return [int(seed), MISSING_KINDS.index(kind), int(round(rate * 1000))]


def evaluate(
    predict: PredictFn,
    patient_ids: list[str],
    labels: np.ndarray,
    threshold: Any,
    kinds: list[str],
    params: EvaluationParams,
    info: Mapping[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metrics, predictions and summary tables of one run (``info`` columns lead every table)."""
    info = dict(info or {})
    labels = np.asarray(labels, int)
    metric_rows, pred_frames, summary_rows = [], [], []
    for kind in kinds:
        sw = sweep(predict, patient_ids, kind, params)
        predicted, aucs, f1s = score(sw, labels, threshold)
        for k in range(len(sw.rates)):
            metric_rows.append({
                **info, "kind": kind, "rate": sw.rates[k], "repeat": int(sw.repeats[k]),
                "n": len(labels), "n_missing": int((~sw.present[k]).sum()),
                "n_positive": int(labels.sum()), "auc": aucs[k], "f1": f1s[k],
            })
            pred_frames.append(pd.DataFrame({
                **{key: [v] * len(labels) for key, v in info.items()},
                "kind": kind, "rate": sw.rates[k], "repeat": int(sw.repeats[k]),
                "patient_id": patient_ids, "label": labels, "present": sw.present[k].astype(int),
                "branch": sw.branches[k], "prob": sw.probs[k], "pred": predicted[k],
            }))
        for rate in np.unique(sw.rates):
            sel = sw.rates == rate
            ci = {}
            if rate in [float(r) for r in params.missing_rates]:
                ci = M.bootstrap_ci(labels, sw.probs[sel], predicted[sel], params.bootstrap,
                                    seed=_bootstrap_seed(params.seed, kind, rate))
            summary_rows.append({
                **info, "kind": kind, "rate": float(rate), "repeats": int(sel.sum()),
                "auc_mean": float(np.nanmean(aucs[sel])) if np.isfinite(aucs[sel]).any() else np.nan,
                "auc_sd": float(np.nanstd(aucs[sel])) if np.isfinite(aucs[sel]).any() else np.nan,
                "f1_mean": float(f1s[sel].mean()), "f1_sd": float(f1s[sel].std()),
                "auc_ci_low": ci.get("auc_ci_low", np.nan), "auc_ci_high": ci.get("auc_ci_high", np.nan),
                "f1_ci_low": ci.get("f1_ci_low", np.nan), "f1_ci_high": ci.get("f1_ci_high", np.nan),
                "bootstrap": params.bootstrap if ci else 0,
            })
    return pd.DataFrame(metric_rows), pd.concat(pred_frames, ignore_index=True), pd.DataFrame(summary_rows)


# ---------------------------------------------------------------- the trained-run adapter

RUN_INFO_KEYS = ("lambda_m", "lambda_s", "directions", "prompt_length")


def run_identity(checkpoint: Path, experiment: str | None, seed: int | None) -> tuple[str, int]:
    """Experiment and seed, by default from ``.../{experiment}/seed{seed}/checkpoint.pt``."""
    match = re.fullmatch(r"seed(\d+)", checkpoint.parent.name)
    if experiment is None:
        experiment = checkpoint.parent.parent.name if match else checkpoint.parent.name
    if seed is None:
        if not match:
            raise ConfigError(f"{checkpoint}: give --seed (the folder is not named seed<N>)")
        seed = int(match.group(1))
    return experiment, int(seed)


def run_info(run: Any, experiment: str, seed: int) -> dict[str, Any]:
    """Columns that identify a run in every output table (method, ablation settings, epoch)."""
    params = dict(getattr(run, "params", {}) or {})
    method = getattr(run, "method", None) or params.get("method", experiment)
    info: dict[str, Any] = {"experiment": experiment, "method": method, "seed": seed}
    for key in RUN_INFO_KEYS:
        info[key] = params.get(key)
    info["epoch"] = getattr(run, "epoch", None)
    threshold = branch_thresholds(run)
    info["threshold"] = json.dumps(threshold, sort_keys=True) if isinstance(threshold, Mapping) else threshold
    return info


def branch_thresholds(run: Any) -> float | dict[str, float]:
    """Each answering branch's own validation threshold (BD's two branches differ), else the
    run's pooled one."""
    per_branch = dict(getattr(run, "thresholds", {}) or {})
    return {**per_branch, "*": float(run.threshold)} if per_branch else float(run.threshold)


def run_predictor(run: Any, cohort: Any) -> PredictFn:
    """Adapt ``TrainedRun.predict`` (per-modality presence of every patient) to one sweep kind:
    the other modality stays present (a patient without a stored slide never has one)."""
    ids = [str(p) for p in cohort.patient_ids]
    all_on = np.ones(len(ids), bool)

    def predict(kind: str, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if kind == "clinical":
            df = run.predict(cohort, clinical_present=present, slide_present=all_on)
        else:
            df = run.predict(cohort, clinical_present=all_on, slide_present=present)
        got = df["patient_id"].astype(str).tolist()
        if got != ids:
            df = df.assign(patient_id=df["patient_id"].astype(str)).set_index("patient_id").reindex(ids)
            if df["prob"].isna().any():
                raise BDError(f"run predicted no probability for patient {df.index[df['prob'].isna()][0]!r}")
        return df["prob"].to_numpy(float), df["branch"].astype(str).to_numpy()

    return predict


def load_split_cohort(features_dir: str, samples: str, clinical: str, split: str, dtype: Any) -> Any:
    """The cohort restricted to one split: only that split's feature stores are read."""
    import tempfile

    from bd.bags import load_cohort, read_clinical
    from bd.cohort import read_samples

    table, _ = read_clinical(clinical)
    raw = pd.read_csv(clinical, sep="\t", dtype={"patient_id": str})
    part = raw[table["split"] == split]
    if part.empty:
        raise BDError(f"{clinical}: no patient in the {split} split")
    sheet = read_samples(samples)
    with tempfile.TemporaryDirectory(prefix="bd-evaluate-") as tmp:
        table_path, sheet_path = Path(tmp) / "clinical.tsv", Path(tmp) / "samples.tsv"
        part.to_csv(table_path, sep="\t", index=False)
        sheet[sheet["patient_id"].isin(set(part["patient_id"]))].to_csv(sheet_path, sep="\t", index=False)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return load_cohort(features_dir, sheet_path, table_path, progress=False, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="trained run (checkpoint.pt)")
    parser.add_argument("--features-dir", required=True, help="folder of {slide}.zarr feature stores")
    parser.add_argument("--samples", required=True, help="sample sheet TSV (slide_id, patient_id, path)")
    parser.add_argument("--clinical", required=True, help="normalised clinical table (clinical.tsv)")
    parser.add_argument("--params", default=None, help="evaluation section (JSON or file)")
    parser.add_argument("--out-dir", required=True, help="folder for metrics.csv, predictions.csv, summary.csv")
    parser.add_argument("--experiment", default=None, help="experiment name (default: from the checkpoint path)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: from the checkpoint path)")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from bd.runs import load_run

    params = build(EvaluationParams, args.params)
    checkpoint = Path(args.checkpoint)
    experiment, seed = run_identity(checkpoint, args.experiment, args.seed)
    trained = load_run(checkpoint)
    dtype = torch.bfloat16 if trained.params.get("precision", "bf16") == "bf16" else torch.float16
    cohort = load_split_cohort(args.features_dir, args.samples, args.clinical, "test", dtype)
    ids = [str(p) for p in cohort.patient_ids]
    labels = np.asarray(cohort.labels).astype(int)
    info = run_info(trained, experiment, seed)
    kinds = params.kinds(info["method"])
    log.info("%s seed %d: %d test patients (%d N+), kinds %s, %d rates x %d repeats",
             experiment, seed, len(ids), labels.sum(), kinds, len(params.rates()), params.repeats)
    metrics, predictions, summary = evaluate(
        run_predictor(trained, cohort), ids, labels, branch_thresholds(trained), kinds, params, info
    )
    out = Path(args.out_dir)
    write_csv(out / "predictions.csv", predictions)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "metrics.csv", metrics)
    for row in summary[summary["rate"].isin([float(r) for r in params.missing_rates])].itertuples():
        print(f"{row.kind:8s} missing {row.rate:5.1f} %: AUC {row.auc_mean:.3f} ± {row.auc_sd:.3f} "
              f"[{row.auc_ci_low:.3f}, {row.auc_ci_high:.3f}]  F1 {row.f1_mean:.3f} ± {row.f1_sd:.3f}")
    return 0
