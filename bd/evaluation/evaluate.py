"""Evaluate a trained run on the test split at clinical-data (and slide) missing rates.

For every missing kind the run supports, every rate in ``missing_rates`` and ``curve_rates`` and
every repeat, a seeded mask (:mod:`bd.evaluation.missing`, the same for every method and run) hides that
modality for some test patients; the run predicts, and AUC and macro F1 at the run's validation
threshold are recorded. A patient's prediction depends only on its own modalities, so the run is
asked twice per kind (all present, all missing) and the masks pick per patient; one mixed mask is
predicted directly to check that, falling back to one prediction per mask if it does not hold.

Writes ``metrics.csv`` (one row per kind, rate, repeat), ``predictions.csv`` (one row per patient
and mask) and ``summary.csv`` (mean, sd and bootstrap 95 % CI per kind and rate); and the clinical
report of :mod:`bd.evaluation.clinical_report` at 0 % and 100 % missing (``calibration.csv``,
``decision_curve.csv``, ``operating_point.csv`` with the operating point chosen on the validation
split, ``subgroups.csv``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.evaluation import metrics as M
from bd.errors import BDError, ConfigError
from bd.io import atomic_path
from bd.evaluation.missing import missing_mask
from bd.methods import default_missing_kinds
from bd.params import build, check, param

log = logging.getLogger(__name__)

# Which modality a missing-rate sweep removes; Section III-E is the "slide" sweep.
MISSING_KINDS = ("clinical", "slide")


@dataclass
class FigureParams:
    """Figure settings (read by the figure rules; accepted so the evaluation section passes whole)."""

    roc_rates: list[float] = param(default_factory=lambda: [0.0, 100.0], minimum=0, maximum=100, min_items=1,
                                   unique_items=True, description="clinical missing rates of the ROC figure's panels")
    heatmap_patients: int = param(4, minimum=1,
                                  description="test patients with an attention heatmap (half N+, half N0)")
    tsne_perplexity: float = param(30.0, exclusive_minimum=0, description="perplexity of the t-SNE figure")


RATES = {"minimum": 0, "maximum": 100, "min_items": 1, "unique_items": True}  # clinical missing rates, in %


@dataclass
class EvaluationParams:
    """Evaluation of each run at clinical and slide missing rates (`bd evaluate`), and the report's settings."""

    missing_rates: list[float] = param(default_factory=lambda: [0.0, 50.0, 80.0, 100.0], **RATES,
                                       description="clinical missing rates of the tables (%)")
    curve_rates: list[float] = param(default_factory=lambda: [float(r) for r in range(0, 101, 10)], **RATES,
                                     schema_only=("min_items",),  # bd evaluate runs without curves
                                     description="clinical missing rates of the curves (%)")
    repeats: int = param(10, minimum=1, description="random masks per rate")
    seed: int = param(0, description="seed of the masks")
    bootstrap: int = param(1000, minimum=0, description="bootstrap resamples of the confidence intervals")
    missing_kinds: dict[str, list[str]] = param(
        default_factory=default_missing_kinds, choices=MISSING_KINDS, min_items=1, unique_items=True,
        description="method -> the modalities removed (clinical, slide); methods not listed: clinical only")
    target_sensitivity: float = param(
        0.9, exclusive_minimum=0, maximum=1,
        description="clinical report: operating point chosen on validation for at least this sensitivity")
    calibration_bins: int = param(
        10, minimum=1, description="clinical report: equal-width probability bins of the reliability table and ECE")
    figures: FigureParams = param(default_factory=FigureParams, description="figure settings")

    def __post_init__(self) -> None:
        check(self)

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


@dataclass
class Modalities:
    """What each test patient really has, beyond the masks: a stored slide with patches, and any
    clinical value; and what the method can do without a slide.

    A slide-using method scores a patient only from a modality the patient has: a patient without
    a slide (or whose slide a mask hides) is answered by the method's no-slide behaviour when it
    has one (the methods whose ``missing_kinds`` include ``slide``: it is what the slide sweep
    tests), with clinical data; otherwise it is left out of that mask's AUC and F1 (unscored),
    never counted with a constant prediction. Methods without a slide branch score everyone."""

    has_slide: np.ndarray  # (n,) bool
    has_clinical: np.ndarray  # (n,) bool
    uses_slide: bool = False
    answers_without_slide: bool = False

    @classmethod
    def complete(cls, n: int) -> Modalities:
        return cls(np.ones(n, bool), np.ones(n, bool))

    def available(self, kind: str, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slide, clinical) availability (K x n) under the masks ``present`` of ``kind``."""
        slide = np.broadcast_to(self.has_slide, present.shape)
        clinical = np.broadcast_to(self.has_clinical, present.shape)
        return (slide & present, clinical) if kind == "slide" else (slide, clinical & present)

    def scored(self, kind: str, present: np.ndarray) -> np.ndarray:
        """Which patients (K x n) each mask lets the method answer from a modality they have."""
        slide, clinical = self.available(kind, present)
        if not self.uses_slide:
            return np.ones(present.shape, bool)
        return slide | (clinical if self.answers_without_slide else np.zeros(present.shape, bool))

    def counts(self, kind: str, present: np.ndarray, scored: np.ndarray) -> dict[str, np.ndarray]:
        """Patients per condition (K values each): scored ones by the modalities they were
        answered with, and the unscored."""
        slide, clinical = self.available(kind, present)
        return {
            "n_scored": scored.sum(axis=1), "n_unscored": (~scored).sum(axis=1),
            "n_both": (scored & slide & clinical).sum(axis=1),
            "n_slide_only": (scored & slide & ~clinical).sum(axis=1),
            "n_clinical_only": (scored & ~slide & clinical).sum(axis=1),
            "n_neither": (scored & ~slide & ~clinical).sum(axis=1),
        }


def score_subsets(sweep_: Sweep, labels: np.ndarray, threshold: Any,
                  scored: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`score` over the scored patients of each mask only."""
    predicted, aucs, f1s = score(sweep_, labels, threshold)
    if scored.all():
        return predicted, aucs, f1s
    for k in range(len(sweep_.rates)):
        keep = scored[k]
        aucs[k] = M.auc(labels[keep], sweep_.probs[k, keep]) if keep.any() else np.nan
        f1s[k] = M.f1_macro(labels[keep], predicted[k, keep]) if keep.any() else np.nan
    return predicted, aucs, f1s


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.mean()), float(finite.std())) if finite.size else (np.nan, np.nan)


def evaluate(
    predict: PredictFn,
    patient_ids: list[str],
    labels: np.ndarray,
    threshold: Any,
    kinds: list[str],
    params: EvaluationParams,
    info: Mapping[str, Any] | None = None,
    modalities: Modalities | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metrics, predictions and summary tables of one run (``info`` columns lead every table).
    ``modalities`` (default: every patient has both) decides who is scored; predictions.csv holds
    the scored patients of each mask, metrics.csv the number of patients per condition."""
    info = dict(info or {})
    labels = np.asarray(labels, int)
    modalities = modalities or Modalities.complete(len(labels))
    metric_rows, pred_frames, summary_rows = [], [], []
    for kind in kinds:
        sw = sweep(predict, patient_ids, kind, params)
        scored = modalities.scored(kind, sw.present)
        predicted, aucs, f1s = score_subsets(sw, labels, threshold, scored)
        counts = modalities.counts(kind, sw.present, scored)
        for k in range(len(sw.rates)):
            keep = scored[k]
            metric_rows.append({
                **info, "kind": kind, "rate": sw.rates[k], "repeat": int(sw.repeats[k]),
                "n": len(labels), "n_missing": int((~sw.present[k]).sum()),
                "n_positive": int(labels[keep].sum()), "auc": aucs[k], "f1": f1s[k],
                **{name: int(v[k]) for name, v in counts.items()},
            })
            pred_frames.append({
                **{key: [v] * int(keep.sum()) for key, v in info.items()},
                "kind": [kind] * int(keep.sum()), "rate": np.full(int(keep.sum()), sw.rates[k]),
                "repeat": np.full(int(keep.sum()), int(sw.repeats[k])),
                "patient_id": np.asarray(patient_ids)[keep], "label": labels[keep],
                "present": sw.present[k][keep].astype(int), "has_slide": modalities.has_slide[keep].astype(int),
                "has_clinical": modalities.has_clinical[keep].astype(int),
                "branch": sw.branches[k][keep], "prob": sw.probs[k][keep], "pred": predicted[k][keep],
            })
        for rate in np.unique(sw.rates):
            sel = sw.rates == rate
            ci = {}
            if rate in [float(r) for r in params.missing_rates]:
                # CIs over the patients scored under every mask of this rate
                always = scored[sel].all(axis=0)
                ci = M.bootstrap_ci(labels[always], sw.probs[sel][:, always], predicted[sel][:, always],
                                    params.bootstrap, seed=_bootstrap_seed(params.seed, kind, rate))
            auc_mean, auc_sd = _mean_sd(aucs[sel])
            f1_mean, f1_sd = _mean_sd(f1s[sel])
            summary_rows.append({
                **info, "kind": kind, "rate": float(rate), "repeats": int(sel.sum()),
                "auc_mean": auc_mean, "auc_sd": auc_sd, "f1_mean": f1_mean, "f1_sd": f1_sd,
                "auc_ci_low": ci.get("auc_ci_low", np.nan), "auc_ci_high": ci.get("auc_ci_high", np.nan),
                "f1_ci_low": ci.get("f1_ci_low", np.nan), "f1_ci_high": ci.get("f1_ci_high", np.nan),
                "bootstrap": params.bootstrap if ci else 0,
            })
    return pd.DataFrame(metric_rows), _stack_columns(pred_frames), pd.DataFrame(summary_rows)


def _stack_columns(parts: list[dict[str, Any]]) -> pd.DataFrame:
    """One table from per-mask column dicts (one DataFrame built, not one per mask and a concat:
    an evaluation has hundreds of masks)."""
    if not parts:
        return pd.DataFrame()
    columns = {key: np.concatenate([np.asarray(part[key], dtype=object if isinstance(part[key], list) else None)
                                    for part in parts]) for key in parts[0]}
    frame = pd.DataFrame({key: list(v) if v.dtype == object else v for key, v in columns.items()})
    return frame.infer_objects()


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


def run_predictor(run: Any, cohort: Any, cache: bool = True) -> PredictFn:
    """Adapt ``TrainedRun.predict`` (per-modality presence of every patient) to one sweep kind:
    the other modality stays present (a patient without a stored slide never has one). With
    ``cache``, every prediction of this predictor shares one :class:`bd.mil.runs.PooledCache`: each
    patient's slide is pooled once, whatever the masks."""
    from bd.mil.runs import PooledCache

    ids = [str(p) for p in cohort.patient_ids]
    all_on = np.ones(len(ids), bool)
    pooled = {"cache": PooledCache(len(ids))} if cache else {}

    def predict(kind: str, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if kind == "clinical":
            df = run.predict(cohort, clinical_present=present, slide_present=all_on, **pooled)
        else:
            df = run.predict(cohort, clinical_present=all_on, slide_present=present, **pooled)
        got = df["patient_id"].astype(str).tolist()
        if got != ids:
            df = df.assign(patient_id=df["patient_id"].astype(str)).set_index("patient_id").reindex(ids)
            if df["prob"].isna().any():
                raise BDError(f"run predicted no probability for patient {df.index[df['prob'].isna()][0]!r}")
        return df["prob"].to_numpy(float), df["branch"].astype(str).to_numpy()

    return predict


def load_split_cohort(features: str, samples: str, clinical: str, split: str, dtype: Any) -> Any:
    """The cohort restricted to one split: only that split's feature stores are read."""
    from bd.mil.bags import load_cohort

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return load_cohort(features, samples, clinical, progress=False, split=split, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="trained run (checkpoint.pt of bd train)")
    parser.add_argument("--feature-index", required=True, help="the feature index (index.tsv: slide_id, store) or a folder of {slide}.zarr stores")
    parser.add_argument("--samples", required=True, help="sample sheet TSV (slide_id, patient_id, path)")
    parser.add_argument("--clinical", required=True, help="normalised clinical table (clinical.tsv)")
    parser.add_argument("--params", default=None, help="evaluation section (JSON or file)")
    parser.add_argument("--scaler", default=None, help="scaler.json of bd clinical (subgroups by raw age, ER, HER2)")
    parser.add_argument("--out-dir", required=True, help="folder for metrics.csv, predictions.csv, summary.csv "
                        "and the clinical report's tables")
    parser.add_argument("--experiment", default=None, help="experiment name (default: from the checkpoint path)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: from the checkpoint path)")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def modalities_of(cohort: Any, trained: Any, kinds: list[str]) -> Modalities:
    """What each patient of ``cohort`` has, and what the run can do without a slide."""
    return Modalities(
        has_slide=np.asarray(cohort.has_slide, bool), has_clinical=np.asarray(cohort.has_clinical, bool),
        uses_slide=bool(getattr(trained.model, "slide_pools", None)), answers_without_slide="slide" in kinds,
    )


def validation_frame(trained: Any, args: argparse.Namespace, table: pd.DataFrame, kinds: list[str],
                     dtype: Any) -> pd.DataFrame:
    """The validation split's predictions per condition (the operating point is chosen on them);
    empty, so that the operating point is NaN, for a cohort without one (an external cohort).
    ``table`` is the normalised clinical table (read once by :func:`clinical_report`)."""
    from bd.evaluation import clinical_report as C

    if not (table["split"] == "val").any():
        log.warning("%s: no validation patients; the clinical report's operating point is left empty "
                    "(it is chosen on validation)", args.clinical)
        return pd.DataFrame({"kind": [], "rate": [], "label": [], "prob": []})
    val_cohort = load_split_cohort(args.feature_index, args.samples, args.clinical, "val", dtype)
    return C.condition_frame(run_predictor(trained, val_cohort), [str(p) for p in val_cohort.patient_ids],
                             np.asarray(val_cohort.labels).astype(int), kinds,
                             modalities_of(val_cohort, trained, kinds).scored)


def clinical_report(trained: Any, cohort: Any, labels: np.ndarray, modalities: Modalities, kinds: list[str],
                    params: EvaluationParams, info: Mapping[str, Any], args: argparse.Namespace,
                    dtype: Any) -> dict[str, pd.DataFrame]:
    """The per-run clinical tables (:mod:`bd.evaluation.clinical_report`): test predictions at 0 % and
    100 % missing, the operating point from the validation split's under the same condition."""
    from bd.evaluation import clinical_report as C
    from bd.mil.bags import read_clinical

    table, _ = read_clinical(args.clinical)
    val = validation_frame(trained, args, table, kinds, dtype)
    test = C.condition_frame(run_predictor(trained, cohort), [str(p) for p in cohort.patient_ids], labels, kinds,
                             modalities.scored)
    return C.run_tables(test, val, table, C.read_scaler(args.scaler), params.target_sensitivity,
                        params.calibration_bins, info)


def run(args: argparse.Namespace) -> int:
    import torch

    from bd.mil.runs import load_run

    params = build(EvaluationParams, args.params)
    checkpoint = Path(args.run)
    experiment, seed = run_identity(checkpoint, args.experiment, args.seed)
    trained = load_run(checkpoint)
    dtype = torch.bfloat16 if trained.params.get("precision", "bf16") == "bf16" else torch.float16
    cohort = load_split_cohort(args.feature_index, args.samples, args.clinical, "test", dtype)
    ids = [str(p) for p in cohort.patient_ids]
    labels = np.asarray(cohort.labels).astype(int)
    info = run_info(trained, experiment, seed)
    kinds = params.kinds(info["method"])
    log.info("%s seed %d: %d test patients (%d N+), kinds %s, %d rates x %d repeats",
             experiment, seed, len(ids), labels.sum(), kinds, len(params.rates()), params.repeats)
    modalities = modalities_of(cohort, trained, kinds)
    if not modalities.has_slide.all() or not modalities.has_clinical.all():
        log.warning("%d test patient(s) without a slide, %d without clinical data: scored only from what they have%s",
                    int((~modalities.has_slide).sum()), int((~modalities.has_clinical).sum()),
                    "" if modalities.answers_without_slide or not modalities.uses_slide
                    else f" ({info['method']} needs the slide: patients without one are left out)")
    metrics, predictions, summary = evaluate(
        run_predictor(trained, cohort), ids, labels, branch_thresholds(trained), kinds, params, info, modalities
    )
    out = Path(args.out_dir)
    clinical_tables = clinical_report(trained, cohort, labels, modalities, kinds, params, info, args, dtype)
    write_csv(out / "predictions.csv", predictions)
    write_csv(out / "summary.csv", summary)
    for name, frame in clinical_tables.items():
        write_csv(out / f"{name}.csv", frame)
    write_csv(out / "metrics.csv", metrics)
    for row in summary[summary["rate"].isin([float(r) for r in params.missing_rates])].itertuples():
        print(f"{row.kind:8s} missing {row.rate:5.1f} %: AUC {row.auc_mean:.3f} ± {row.auc_sd:.3f} "
              f"[{row.auc_ci_low:.3f}, {row.auc_ci_high:.3f}]  F1 {row.f1_mean:.3f} ± {row.f1_sd:.3f}")
    return 0
