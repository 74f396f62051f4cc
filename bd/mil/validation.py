"""Validation during training: the decision threshold of each answering branch (Youden on the
validation patients, under each condition the method is meant for), the validation scores of an
epoch, and the early-stopping rules that pick the kept epoch from them."""

from __future__ import annotations

import logging
import math
import os

# OpenMP threads that wait sleep instead of spinning: on a machine whose other cores are busy, a
# spinning thread burns the time slice its partner needs, and a step then takes several times
# longer with two threads than with one (benchmarks/train.py). libgomp reads this when torch is
# first imported, so it applies to `bd train` (a value set by the user wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import Any

import numpy as np
import torch

from bd.mil.bags import Cohort
from bd.mil.models import (
    ALL_CONDITIONS,
    CONDITION_NAMES,
    Condition,
    MILModel,
)
from bd.mil.runs import predict_patients

log = logging.getLogger(__name__)


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The probability cut maximising macro F1 (ties: the one nearest 0.5); 0.5 if undecidable."""
    from bd.evaluation.metrics import f1_macro

    labels = np.asarray(labels, int)
    if labels.min() == labels.max():
        return 0.5
    candidates = np.unique(np.round(probs, 6))
    scores = np.array([f1_macro(labels, (probs >= t).astype(int)) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


THRESHOLD_CONDITIONS: tuple[Condition, ...] = ALL_CONDITIONS[:3]  # complete, no clinical, no slide


def choose_thresholds(model: MILModel, cohort: Cohort, idx: np.ndarray,
                      device: torch.device) -> tuple[float, dict[str, float]]:
    """(pooled threshold, threshold per branch) from validation predictions. Every branch that
    answers gets its own macro-F1 threshold, tuned on the validation patients under the first
    condition (complete, no clinical data, no slide) where it answers: the same policy for every
    method, Filling's zero-filled branches included. The pooled one covers the method's own
    conditions (for a branch the per-branch table does not name)."""
    labels = cohort.labels[idx]
    thresholds: dict[str, float] = {}
    pooled_p, pooled_y = [], []
    for clin, slide in THRESHOLD_CONDITIONS:
        n = len(idx)
        probs, branches = predict_patients(model, cohort, idx, np.full(n, clin), np.full(n, slide), device)
        for branch in np.unique(branches):
            sel = branches == branch
            thresholds.setdefault(str(branch), choose_threshold(labels[sel], probs[sel]))
        if (clin, slide) in model.conditions:
            pooled_p.append(probs)
            pooled_y.append(labels)
    return choose_threshold(np.concatenate(pooled_y), np.concatenate(pooled_p)), thresholds


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of N+ probabilities (clipped at 1e-7)."""
    p = np.clip(np.asarray(probs, float), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def validate(model: MILModel, cohort: Cohort, idx: np.ndarray, conditions: tuple[Condition, ...],
             device: torch.device, prefix: str = "val") -> dict[str, float]:
    """On ``idx`` under each condition: AUC, log loss, macro F1 at the threshold tuned on these
    predictions (``f1``) and at 0.5 (``f1_05``); then the mean of each over the conditions."""
    from bd.evaluation.metrics import auc, f1_macro

    labels = cohort.labels[idx]
    out: dict[str, float] = {}
    for clin, slide in conditions:
        n = len(idx)
        probs, _ = predict_patients(model, cohort, idx, np.full(n, clin), np.full(n, slide), device)
        name = CONDITION_NAMES[(clin, slide)]
        out[f"{prefix}_f1_{name}"] = f1_macro(labels, (probs >= choose_threshold(labels, probs)).astype(int))
        out[f"{prefix}_f1_05_{name}"] = f1_macro(labels, (probs >= 0.5).astype(int))
        out[f"{prefix}_auc_{name}"] = auc(labels, probs)
        out[f"{prefix}_loss_{name}"] = log_loss(labels, probs)
        out[f"{prefix}_prob_sd_{name}"] = float(np.std(probs))
    for metric in ("f1", "f1_05", "auc", "loss", "prob_sd"):
        values = [out[f"{prefix}_{metric}_{CONDITION_NAMES[c]}"] for c in conditions]
        out[f"{prefix}_{metric}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


# training.early_stopping -> (the curve column it monitors, +1: higher is better, -1: lower is better)
EARLY_STOPPING = {
    "val_auc": ("val_auc", 1),
    "val_loss": ("val_loss", -1),
    "val_f1": ("val_f1", 1),  # at the threshold tuned on the same validation predictions
    "train_f1": ("trainset_f1_05", 1),  # the paper's rule: F1 (at 0.5) on the training set
}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def epoch_score(row: dict[str, Any], rule: str) -> tuple[float, float, float]:
    """The monitored value (signed so that higher is better), then validation AUC and -loss as
    tie-breakers."""
    column, sign = EARLY_STOPPING[rule]
    return (_finite(sign * row[column]), _finite(row["val_auc"]), _finite(-row["val_loss"]))
