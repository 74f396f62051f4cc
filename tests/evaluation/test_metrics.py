"""Metrics equal scikit-learn's on known inputs; masks are seeded, exact and method-independent."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from bd.evaluation import metrics as M
from bd.errors import ConfigError
from bd.evaluation.missing import missing_mask, n_missing

LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
PROBS = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.65, 0.3, 0.7, 0.5])


def test_auc_known_value():
    # 25 positive/negative pairs, 19 ordered correctly (2 + 5 + 5 + 2 + 5) -> 0.76
    assert M.auc(LABELS, PROBS) == pytest.approx(19 / 25)
    assert M.auc(LABELS, PROBS) == pytest.approx(roc_auc_score(LABELS, PROBS))


def test_auc_single_class_is_nan():
    assert np.isnan(M.auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_f1_macro_equals_sklearn_and_hand_value():
    pred = M.threshold_predictions(PROBS, 0.5)
    assert pred.tolist() == [0, 0, 0, 1, 0, 1, 1, 0, 1, 1]
    # N+: tp=3 fp=2 fn=2 -> 0.6; N0: tp=3 fp=2 fn=2 -> 0.6
    assert M.f1_macro(LABELS, pred) == pytest.approx(0.6)
    assert M.f1_macro(LABELS, pred) == pytest.approx(f1_score(LABELS, pred, average="macro"))


def test_f1_macro_matches_sklearn_on_random_and_degenerate_predictions():
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, 50), rng.integers(0, 2, 50)) for _ in range(20)]
    cases += [(np.array([0, 1, 1]), np.zeros(3, int)), (np.zeros(4, int), np.zeros(4, int)),
              (np.ones(4, int), np.zeros(4, int))]
    for labels, pred in cases:
        want = f1_score(labels, pred, labels=[0, 1], average="macro", zero_division=0.0)
        assert M.f1_macro(labels, pred) == pytest.approx(want)


def test_per_branch_thresholds():
    branches = np.array(["multi"] * 5 + ["single"] * 5)
    pred = M.threshold_predictions(PROBS, {"multi": 0.3, "single": 0.75}, branches)
    assert pred.tolist() == [0, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    with pytest.raises(Exception, match="no validation threshold"):
        M.threshold_predictions(PROBS, {"multi": 0.3}, branches)


def test_column_metrics_equal_per_column_sklearn():
    rng = np.random.default_rng(1)
    probs = rng.random((40, 7))
    labels = rng.integers(0, 2, 40)
    pred = (probs >= 0.45).astype(int)
    aucs = M.auc_columns(labels, probs)
    f1s = M.f1_macro_columns(labels, pred)
    for j in range(7):
        assert aucs[j] == pytest.approx(roc_auc_score(labels, probs[:, j]))
        assert f1s[j] == pytest.approx(f1_score(labels, pred[:, j], average="macro"))


def test_column_auc_nan_for_one_class_column():
    labels = np.array([[0, 1], [0, 0], [0, 1]])
    out = M.auc_columns(labels, np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.8]]))
    assert np.isnan(out[0]) and out[1] == pytest.approx(1.0)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)[None, :]
    pred = (probs >= 0.5).astype(int)
    a = M.bootstrap_ci(labels, probs, pred, 300, seed=3)
    b = M.bootstrap_ci(labels, probs, pred, 300, seed=3)
    assert a == b
    point = roc_auc_score(labels, probs[0])
    assert a["auc_ci_low"] < point < a["auc_ci_high"]
    assert 0 < a["auc_ci_high"] - a["auc_ci_low"] < 0.3
    f1 = f1_score(labels, pred[0], average="macro")
    assert a["f1_ci_low"] < f1 < a["f1_ci_high"]


def test_mean_roc_of_identical_curves():
    fpr, tpr = M.roc(LABELS, PROBS)
    grid, mean, sd = M.mean_roc([(fpr, tpr), (fpr, tpr)])
    assert np.allclose(sd, 0) and mean[-1] == 1.0 and np.trapezoid(mean, grid) == pytest.approx(0.76, abs=0.01)


IDS = [f"P{i:03d}" for i in range(37)]


@pytest.mark.parametrize("rate", [0, 10, 50, 80, 100])
def test_mask_rate_is_exact(rate):
    mask = missing_mask(IDS, rate, repeat=0, seed=0)
    assert mask.sum() == n_missing(len(IDS), rate) == round(37 * rate / 100 + 1e-9)


def test_mask_depends_only_on_seed_rate_repeat_and_ids():
    a = missing_mask(IDS, 50, repeat=2, seed=7)
    # order of patients does not matter: the same patients are missing
    perm = np.random.default_rng(0).permutation(len(IDS))
    b = missing_mask([IDS[i] for i in perm], 50, repeat=2, seed=7)
    assert set(np.array(IDS)[a]) == set(np.array(IDS)[perm][b])
    # repeats and seeds differ
    assert not np.array_equal(a, missing_mask(IDS, 50, repeat=3, seed=7))
    assert not np.array_equal(a, missing_mask(IDS, 50, repeat=2, seed=8))
    # slide masks are drawn independently of clinical masks
    assert not np.array_equal(a, missing_mask(IDS, 50, repeat=2, seed=7, kind="slide"))


def test_masks_are_nested_across_rates():
    masks = [missing_mask(IDS, r, 1, 0) for r in range(0, 101, 10)]
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any()


def test_mask_stable_across_processes():
    """Hash-based, not Python's salted hash(): a fresh interpreter draws the same mask."""
    import subprocess
    import sys

    code = ("from bd.evaluation.missing import missing_mask; "
            f"print(''.join('1' if m else '0' for m in missing_mask({IDS!r}, 50, 4, 11)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = "".join("1" if m else "0" for m in missing_mask(IDS, 50, 4, 11))
    assert out.stdout.strip() == here


def test_mask_rejects_bad_rate_and_duplicates():
    with pytest.raises(ConfigError, match="outside 0-100"):
        missing_mask(IDS, 120, 0, 0)
    with pytest.raises(ConfigError, match="unique"):
        missing_mask(["a", "a"], 50, 0, 0)


def test_bootstrap_auc_equals_sklearn_per_resample():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 50)
    probs = np.round(rng.random(50), 1)  # many ties
    pos, neg = M.stratified_resamples(labels, 25, rng)
    fast = M.auc_from_classes(probs[pos], probs[neg])
    idx = np.concatenate([pos, neg])
    assert np.allclose(fast, M.auc_columns(labels[idx], probs[idx]))
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()


def test_per_branch_thresholds_fall_back_to_the_pooled_one():
    from bd.evaluation.metrics import threshold_predictions

    probs = np.array([0.3, 0.3, 0.6, 0.6])
    branches = np.array(["multi", "single", "multi", "other"])
    got = threshold_predictions(probs, {"multi": 0.5, "single": 0.2, "*": 0.7}, branches)
    assert got.tolist() == [0, 1, 1, 0]


def test_column_metrics_equal_scikit_learn_with_ties_and_one_class_columns():
    """The vectorised AUC (mid-rank U) and macro F1 give scikit-learn's figures column by column."""
    from sklearn.metrics import f1_score, roc_auc_score

    from bd.evaluation.metrics import auc_columns, f1_macro_columns

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(40, 6))
    labels[:, 2] = 1  # one class only: NaN
    probs = np.round(rng.random((40, 6)), 1)  # many ties
    predicted = (probs >= 0.5).astype(int)
    predicted[:, 3] = 0  # a class never predicted
    aucs, f1s = auc_columns(labels, probs), f1_macro_columns(labels, predicted)
    for j in range(6):
        if j == 2:
            assert np.isnan(aucs[j])
        else:
            assert aucs[j] == pytest.approx(roc_auc_score(labels[:, j], probs[:, j]), abs=1e-12)
        assert f1s[j] == pytest.approx(f1_score(labels[:, j], predicted[:, j], average="macro", zero_division=0.0),
                                       abs=1e-12)
    one_label = [roc_auc_score(labels[:, 0], probs[:, j]) for j in range(6)]
    np.testing.assert_allclose(auc_columns(labels[:, 0], probs), one_label)
