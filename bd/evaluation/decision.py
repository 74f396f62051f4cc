"""Clinical decision metrics over labels ``y`` (0/1) and predicted probabilities ``p`` of N+.

Pure functions over arrays, used by ``bd evaluate`` (:mod:`bd.evaluation.clinical_report`):

* calibration: :func:`brier_score`; :func:`calibration_bins`, a reliability table over ``bins``
  equal-width bins of [0, 1] (each bin ``[lo, hi)``, the last ``[lo, 1]``); :func:`ece`, the
  expected calibration error over those bins, ``sum_b n_b / n * |mean(p in b) - mean(y in b)|``;
* decision-curve analysis (Vickers & Elkin 2006): :func:`net_benefit` of treating patients with
  ``p >= t``, ``TP/n - FP/n * t / (1 - t)``, against treat-all (``prevalence - (1 - prevalence)
  * t / (1 - t)``) and treat-none (0), over a grid of threshold probabilities;
* an operating point: :func:`threshold_for_sensitivity` picks, on one set of predictions (the
  validation split), the largest threshold whose sensitivity reaches the target, and
  :func:`confusion_metrics` gives sensitivity, specificity, PPV and NPV of a threshold on
  another set (the test split);
* :func:`subgroup_auc`: AUC within a subgroup, NaN with the reason when it has one class.
"""

from __future__ import annotations

import math

import numpy as np

from bd.errors import BDError
from bd.evaluation.metrics import auc


def _arrays(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``y`` as int and ``p`` as float, same length, ``p`` in [0, 1]."""
    y, p = np.asarray(y).astype(int).ravel(), np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise BDError(f"{y.size} labels for {p.size} probabilities")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise BDError("probabilities outside [0, 1]")
    return y, p


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between the probability of N+ and the outcome (0 is perfect)."""
    y, p = _arrays(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each probability among ``bins`` equal-width bins of [0, 1] (1.0 in the last)."""
    return np.minimum((np.asarray(p, float) * bins).astype(int), bins - 1)


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability table: per bin its edges, patients, mean probability and observed N+ fraction
    (NaN for an empty bin)."""
    if bins < 1:
        raise BDError(f"calibration bins: {bins} must be at least 1")
    y, p = _arrays(y, p)
    b = bin_index(p, bins)
    n = np.bincount(b, minlength=bins)
    sum_p = np.bincount(b, weights=p, minlength=bins)
    sum_y = np.bincount(b, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(n > 0, sum_p / n, np.nan)
        frac = np.where(n > 0, sum_y / n, np.nan)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {"bin": np.arange(bins), "lower": edges[:-1], "upper": edges[1:], "n": n,
            "n_positive": sum_y.astype(int), "mean_prob": mean_p, "observed": frac}


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width bins (see the module docstring)."""
    table = calibration_bins(y, p, bins)
    n = table["n"]
    if n.sum() == 0:
        return math.nan
    used = n > 0
    return float(np.sum(n[used] / n.sum() * np.abs(table["mean_prob"][used] - table["observed"][used])))


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating the patients with ``p >= t``, for each threshold probability t
    in (0, 1)."""
    y, p = _arrays(y, p)
    t = np.asarray(thresholds, float)
    if np.any((t <= 0) | (t >= 1)):
        raise BDError("decision-curve thresholds must lie strictly between 0 and 1")
    if not y.size:
        return np.full(t.shape, math.nan)
    treated = p[None, :] >= t[:, None]
    tp = (treated & (y[None, :] == 1)).sum(axis=1)
    fp = (treated & (y[None, :] == 0)).sum(axis=1)
    return tp / y.size - fp / y.size * t / (1 - t)


def treat_all_net_benefit(y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating everyone (treat-none is 0 at every threshold)."""
    y = np.asarray(y).astype(int)
    t = np.asarray(thresholds, float)
    prevalence = y.mean() if y.size else math.nan
    return prevalence - (1 - prevalence) * t / (1 - t)


def decision_thresholds(step: float = 0.01) -> np.ndarray:
    """The threshold probabilities of a decision curve: ``step`` to ``1 - step``."""
    n = int(round(1 / step))
    return np.arange(1, n) / n


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = 0.9) -> float:
    """The largest threshold t whose rule ``p >= t`` has sensitivity >= ``target`` on (y, p):
    the ceil(target * positives)-th largest probability among the positives (the most specific
    rule meeting the target). NaN when there is no positive."""
    if not 0 < target <= 1:
        raise BDError(f"target sensitivity {target} must be in (0, 1]")
    y, p = _arrays(y, p)
    pos = np.sort(p[y == 1])[::-1]
    if not pos.size:
        return math.nan
    k = math.ceil(target * pos.size - 1e-12)
    return float(pos[max(k, 1) - 1])


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def confusion_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Counts and sensitivity, specificity, PPV and NPV of the rule ``p >= threshold`` (NaN
    where a denominator is 0)."""
    y, p = _arrays(y, p)
    if not math.isfinite(threshold):
        return {k: math.nan for k in ("tp", "fp", "tn", "fn", "sensitivity", "specificity", "ppv", "npv")}
    pred = p >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}


def subgroup_auc(y: np.ndarray, p: np.ndarray, member: np.ndarray) -> tuple[float, int, int, str]:
    """(AUC, patients, N+ patients, reason) within the subgroup ``member``; the AUC is NaN, with
    the reason, when the subgroup is empty or has one class only."""
    y, p = _arrays(y, p)
    member = np.asarray(member, bool)
    ys, ps = y[member], p[member]
    n, n_pos = int(ys.size), int(ys.sum())
    if n == 0:
        return math.nan, 0, 0, "no patient"
    if n_pos in (0, n):
        return math.nan, n, n_pos, f"one class only ({'all N+' if n_pos else 'all N0'})"
    return float(auc(ys, ps)), n, n_pos, ""
