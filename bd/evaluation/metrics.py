"""Classification metrics, column-wise for many masks at once, and bootstrap CIs.

AUC is the area under the ROC curve of the N+ probability; F1 is the macro average of the F1
scores of N0 and N+ (the paper's "averaged" F1), with N+ predicted where the probability reaches
the run's validation-chosen threshold. Column-wise versions evaluate one column per mask or per
bootstrap resample in one vectorised call (counts in numpy for F1, scipy's Mann-Whitney U for
bootstrap AUCs), which keeps a 1,000-sample bootstrap well under a second. AUC and F1 are counted
in numpy (equal to scikit-learn's ``roc_auc_score`` and ``f1_score``; tests compare them), so that
``bd train`` and ``bd evaluate`` do not import scikit-learn (about 2 CPU s a process, paid once per
workflow job); ``roc`` imports it when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bd.errors import BDError


def _both_classes(labels: np.ndarray) -> bool:
    return bool(labels.size) and 0 < int(labels.sum()) < labels.size


def auc(labels: Sequence[int], probs: Sequence[float]) -> float:
    """ROC AUC; NaN when only one class is present (AUC is undefined there)."""
    y = np.asarray(labels, dtype=int).reshape(-1)
    return _auc_1d(y, np.asarray(probs, float).reshape(-1)) if _both_classes(y) else float("nan")


def _auc_1d(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of one score vector with both classes present: the rank-sum (Mann-Whitney U)
    statistic with tied scores at their average rank, as scikit-learn's ``roc_auc_score``."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]  # 1-based average ranks
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_macro(labels: Sequence[int], predicted: Sequence[int]) -> float:
    """Macro-averaged F1 over the classes N0 and N+ (a class never seen nor predicted scores 0).
    Counted in numpy (scikit-learn's ``f1_score`` gives the same figure at ~100x the cost, which
    matters where thresholds are searched over hundreds of candidate cuts)."""
    y = np.asarray(labels, int).reshape(-1) == 1
    p = np.asarray(predicted, int).reshape(-1) == 1
    scores = []
    for truth, guess in ((y, p), (~y, ~p)):
        tp = int(np.count_nonzero(truth & guess))
        wrong = int(np.count_nonzero(truth ^ guess))
        scores.append(2 * tp / (2 * tp + wrong) if 2 * tp + wrong else 0.0)
    return float(np.mean(scores))


def threshold_predictions(
    probs: np.ndarray, threshold: float | Mapping[str, float], branches: np.ndarray | None = None
) -> np.ndarray:
    """0/1 predictions: N+ where ``prob >= threshold``; a mapping gives one threshold per branch
    (key ``"*"``: the threshold of any branch the mapping does not name)."""
    probs = np.asarray(probs, float)
    if not isinstance(threshold, Mapping):
        return (probs >= float(threshold)).astype(int)
    if branches is None:
        raise BDError("per-branch thresholds need the branch of every prediction")
    branches = np.asarray(branches)
    unknown = sorted(set(np.unique(branches)) - set(threshold))
    if unknown and "*" in threshold:
        threshold = {**{b: threshold["*"] for b in unknown}, **threshold}
    elif unknown:
        raise BDError(f"no validation threshold for branch {unknown[0]!r} (have {sorted(threshold)})")
    cut = np.vectorize(lambda b: float(threshold[b]), otypes=[float])(branches)
    return (probs >= cut).astype(int)


def auc_columns(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUC of every column of ``probs`` (n x k) against ``labels`` (n x k, or n); NaN where a
    column holds one class only."""
    probs = np.asarray(probs, float)
    y = np.broadcast_to(np.asarray(labels, int).reshape(probs.shape[0], -1), probs.shape)
    out = np.full(probs.shape[1], np.nan)
    ok = np.array([_both_classes(y[:, j]) for j in range(y.shape[1])], dtype=bool)
    for j in np.flatnonzero(ok):
        out[j] = _auc_1d(y[:, j], probs[:, j])
    return out


def f1_macro_columns(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Macro F1 (N0 and N+) of every column of ``predicted`` (n x k) against ``labels``."""
    yhat = np.asarray(predicted, int)
    y = np.ascontiguousarray(np.broadcast_to(np.asarray(labels, int).reshape(yhat.shape[0], -1), yhat.shape))
    truth, guess = y == 1, yhat == 1
    tp = np.count_nonzero(truth & guess, axis=0)
    tn = np.count_nonzero(~truth & ~guess, axis=0)
    wrong = np.count_nonzero(truth ^ guess, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty class scores 0, as zero_division=0
        pos = np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), 0.0)
        neg = np.where(2 * tn + wrong > 0, 2 * tn / (2 * tn + wrong), 0.0)
    return (pos + neg) / 2.0


def stratified_resamples(labels: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap resamples that keep each class's count, so every resample has an AUC: indices of
    N+ patients (n_pos x n_boot) and of N0 patients (n_neg x n_boot)."""
    labels = np.asarray(labels, int)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    return rng.choice(pos, size=(pos.size, n_boot)), rng.choice(neg, size=(neg.size, n_boot))


def auc_from_classes(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """AUC per column from the scores of N+ (n_pos x k) and N0 (n_neg x k) patients: the
    Mann-Whitney U statistic over n_pos * n_neg (scipy, vectorised; equal to scikit-learn's
    ``roc_auc_score``, ties counting one half; a test checks it)."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(pos_scores, neg_scores, axis=0, method="asymptotic").statistic
    return np.asarray(u, float) / (pos_scores.shape[0] * neg_scores.shape[0])


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    predicted: np.ndarray,
    n_boot: int,
    seed: int | Sequence[int] = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap CIs of AUC and macro F1 over patients and masks.

    ``probs``/``predicted`` are (repeats x n): one row per missing-modality mask. Each resample
    draws patients with replacement (stratified by class) and one mask at random, so the interval
    covers both the test-set sampling and the choice of missing patients.
    """
    labels = np.asarray(labels, int)
    probs = np.atleast_2d(np.asarray(probs, float))
    predicted = np.atleast_2d(np.asarray(predicted, int))
    nan = {"auc_ci_low": np.nan, "auc_ci_high": np.nan, "f1_ci_low": np.nan, "f1_ci_high": np.nan}
    if n_boot <= 0 or not _both_classes(labels):
        return nan
    rng = np.random.default_rng(seed)
    pos, neg = stratified_resamples(labels, n_boot, rng)
    rows = rng.integers(0, probs.shape[0], size=n_boot)[None, :]
    aucs = auc_from_classes(probs[rows, pos], probs[rows, neg])
    idx = np.concatenate([pos, neg])
    f1s = f1_macro_columns(labels[idx], predicted[rows, idx])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {
        "auc_ci_low": float(np.percentile(aucs, lo)),
        "auc_ci_high": float(np.percentile(aucs, hi)),
        "f1_ci_low": float(np.percentile(f1s, lo)),
        "f1_ci_high": float(np.percentile(f1s, hi)),
    }


def roc(labels: Sequence[int], probs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve (scikit-learn's ``roc_curve``)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels, int), np.asarray(probs, float))
    return fpr, tpr


def mean_roc(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: int = 101) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation of several ROC curves, interpolated on a common FPR grid."""
    fpr_grid = np.linspace(0.0, 1.0, grid)
    tprs = np.stack([np.interp(fpr_grid, f, t) for f, t in curves])
    tprs[:, 0] = 0.0
    return fpr_grid, tprs.mean(axis=0), tprs.std(axis=0)
