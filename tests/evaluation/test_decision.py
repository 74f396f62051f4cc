"""Clinical decision metrics (bd/evaluation/decision.py) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bd.evaluation import decision as D
from bd.errors import BDError

# six patients: three N+; the hand computations below use these
Y = np.array([0, 0, 1, 1, 1, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.05])


def test_brier_score_by_hand():
    # (0.01 + 0.16 + 0.4225 + 0.04 + 0.01 + 0.0025) / 6
    assert D.brier_score(Y, P) == pytest.approx(0.645 / 6)
    assert D.brier_score([1, 0], [1.0, 0.0]) == 0.0


def test_calibration_bins_and_ece_by_hand():
    t = D.calibration_bins(Y, P, bins=2)
    # bin [0, 0.5): p 0.1, 0.4, 0.35, 0.05 with one N+; bin [0.5, 1]: p 0.8, 0.9, both N+
    assert t["n"].tolist() == [4, 2] and t["n_positive"].tolist() == [1, 2]
    assert t["mean_prob"] == pytest.approx([0.225, 0.85])
    assert t["observed"] == pytest.approx([0.25, 1.0])
    assert t["lower"].tolist() == [0.0, 0.5] and t["upper"].tolist() == [0.5, 1.0]
    # 4/6 * |0.225 - 0.25| + 2/6 * |0.85 - 1|
    assert D.ece(Y, P, bins=2) == pytest.approx(4 / 6 * 0.025 + 2 / 6 * 0.15)


def test_bin_edges_and_empty_bins():
    assert D.bin_index(np.array([0.0, 0.0999, 0.1, 0.5, 0.99, 1.0]), 10).tolist() == [0, 0, 1, 5, 9, 9]
    t = D.calibration_bins([1, 0], [0.95, 0.05], bins=10)
    assert np.isnan(t["mean_prob"][4]) and t["n"][4] == 0
    assert D.ece([1, 0], [0.95, 0.05], bins=10) == pytest.approx(0.05)
    with pytest.raises(BDError, match="outside"):
        D.brier_score([1], [1.2])


def test_net_benefit_and_treat_all_by_hand():
    t = np.array([0.3, 0.5])
    # t 0.3: treated p >= 0.3 are 0.4 (N0), 0.35, 0.8, 0.9 (N+): 3/6 - 1/6 * 0.3/0.7
    # t 0.5: 0.8 and 0.9, both N+: 2/6
    assert D.net_benefit(Y, P, t) == pytest.approx([0.5 - 0.3 / 0.7 / 6, 2 / 6])
    # prevalence 0.5: 0.5 - 0.5 * t / (1 - t)
    assert D.treat_all_net_benefit(Y, t) == pytest.approx([0.5 - 0.5 * 0.3 / 0.7, 0.0])
    grid = D.decision_thresholds(0.01)
    assert grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(0.99) and len(grid) == 99
    with pytest.raises(BDError, match="strictly between"):
        D.net_benefit(Y, P, np.array([1.0]))


def test_operating_point_for_a_target_sensitivity_by_hand():
    # positives' probabilities, largest first: 0.9, 0.8, 0.35
    assert D.threshold_for_sensitivity(Y, P, 0.9) == 0.35  # ceil(2.7) = 3rd
    assert D.threshold_for_sensitivity(Y, P, 0.6) == 0.8  # ceil(1.8) = 2nd
    assert D.threshold_for_sensitivity(Y, P, 2 / 3) == 0.8  # exactly 2 of 3, no rounding up
    assert math.isnan(D.threshold_for_sensitivity([0, 0], [0.2, 0.3], 0.9))
    m = D.confusion_metrics(Y, P, 0.35)
    # N+ where p >= 0.35: 0.4 (N0), 0.35, 0.8, 0.9 -> TP 3, FP 1, TN 2, FN 0
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 2, 0)
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == 0.75 and m["npv"] == 1.0
    m = D.confusion_metrics(Y, P, 0.95)  # nobody called N+: PPV undefined
    assert math.isnan(m["ppv"]) and m["npv"] == 0.5 and m["sensitivity"] == 0.0


def test_sensitivity_on_validation_carries_to_its_own_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1)
    t = D.threshold_for_sensitivity(y, p, 0.9)
    assert D.confusion_metrics(y, p, t)["sensitivity"] >= 0.9
    # the most specific such threshold: the next larger positive probability misses the target
    above = np.sort(p[(y == 1) & (p > t)])
    assert D.confusion_metrics(y, p, above[0])["sensitivity"] < 0.9


def test_subgroup_auc_by_hand_and_one_class():
    auc, n, n_pos, why = D.subgroup_auc(Y, P, np.array([1, 1, 1, 0, 0, 0], bool))
    # N+ 0.35 against N0 0.1 (above) and 0.4 (below)
    assert (auc, n, n_pos, why) == (0.5, 3, 1, "")
    auc, n, n_pos, why = D.subgroup_auc(Y, P, np.array([0, 0, 0, 1, 1, 0], bool))
    assert math.isnan(auc) and (n, n_pos) == (2, 2) and "one class" in why
    assert D.subgroup_auc(Y, P, np.zeros(6, bool))[3] == "no patient"
