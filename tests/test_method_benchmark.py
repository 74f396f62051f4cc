"""The method benchmark: its synthetic cohort (bd.synthetic), its claim verdicts, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from bd.errors import ConfigError
from bd.evaluation.metrics import auc
from bd.synthetic import LOGIT_SD, LOGIT_SHIFT, REGIMES, method_cohort, split_counts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import method as bench  # noqa: E402


def test_bcnb_size_split_and_prevalence():
    syn = method_cohort("independent", seed=3, patches=(4, 8))
    c = syn.cohort
    assert c.n_patients == 1058 and int(c.labels.sum()) == 402
    assert [int((c.split == s).sum()) for s in ("train", "val", "test")] == [630, 210, 218]
    for s in ("train", "val", "test"):  # stratified: 38 % N+ in every split
        assert c.labels[c.split == s].mean() == pytest.approx(0.38, abs=0.01)
    assert c.feature_dim == 32 and np.all(np.diff(c.offsets.numpy()) >= 4)
    assert split_counts(300) == (179, 60, 61)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b = method_cohort("shortcut", 300, seed=1), method_cohort("shortcut", 300, seed=1)
    assert np.array_equal(a.cohort.labels, b.cohort.labels)
    assert np.array_equal(a.cohort.features.numpy(), b.cohort.features.numpy())
    assert not np.array_equal(a.tumour_fraction, method_cohort("shortcut", 300, seed=2).tumour_fraction)


def test_tumour_fraction_auc_is_what_the_design_says():
    design = norm.cdf(LOGIT_SHIFT / LOGIT_SD / math.sqrt(2))
    assert design == pytest.approx(0.80, abs=0.005)
    aucs = [auc(s.cohort.labels, s.tumour_fraction)
            for s in (method_cohort("independent", 4000, seed=seed, patches=(2, 3)) for seed in range(4))]
    assert np.mean(aucs) == pytest.approx(design, abs=0.015)
    syn = method_cohort("independent", 1058, seed=0, patches=(2, 3))
    c = syn.cohort
    test = c.indices("test")  # the method reports the split's own figure
    assert syn.tumour_fraction_auc("test") == pytest.approx(auc(c.labels[test], syn.tumour_fraction[test]))


def test_patches_carry_the_tumour_fraction():
    """The share of tumour-like patches (far along the tumour direction) tracks the hidden fraction."""
    syn = method_cohort("independent", 400, seed=0)
    c = syn.cohort
    feats, offsets = c.features.numpy(), c.offsets.numpy()
    pooled = np.stack([feats[offsets[i]:offsets[i + 1]].mean(0) for i in range(c.n_patients)])
    # the tumour direction is the leading direction of the pooled features' covariance with t
    cov = ((pooled - pooled.mean(0)) * (syn.tumour_fraction - syn.tumour_fraction.mean())[:, None]).mean(0)
    score = pooled @ (cov / np.linalg.norm(cov))
    assert np.corrcoef(score, syn.tumour_fraction)[0, 1] > 0.95


@pytest.mark.parametrize("regime", list(REGIMES))
def test_clinical_auc_per_regime_as_designed(regime):
    """Mean over four cohorts of 4,000 (one cohort's AUC has a standard error of about 0.009)."""
    aucs = []
    for seed in range(4):
        syn = method_cohort(regime, 4000, seed=seed, patches=(2, 3))
        aucs.append(auc(syn.cohort.labels, syn.clinical_score))
    assert np.mean(aucs) == pytest.approx(REGIMES[regime].clinical_auc, abs=0.015)


def test_regimes_differ_as_designed():
    ind, short = REGIMES["independent"], REGIMES["shortcut"]
    assert 0.65 <= ind.clinical_auc <= 0.70
    assert short.clinical_auc > ind.clinical_auc + 0.1  # the clinical shortcut is stronger ...
    assert short.clinical_columns_with_signal == 1  # ... and in a single column (easy to learn)
    assert short.tumour_shift < ind.tumour_shift  # the slide signal is harder
    # independent: the clinical signal is spread over all five columns
    syn = method_cohort("independent", 6000, seed=0, patches=(2, 3))
    c = syn.cohort
    per_column = [abs(auc(c.labels, c.clinical[:, j]) - 0.5) for j in range(c.n_clinical)]
    assert min(per_column) > 0.02
    # slide and clinical signal independent given the label
    for y in (0, 1):
        sel = c.labels == y
        assert abs(np.corrcoef(syn.tumour_fraction[sel], syn.clinical_score[sel])[0, 1]) < 0.05


def test_bad_arguments_name_the_problem():
    with pytest.raises(ConfigError, match="regime"):
        method_cohort("nonsense")
    with pytest.raises(ConfigError, match="n_patients"):
        method_cohort("independent", 5)


def test_verdicts():
    assert bench.verdict(0.1, 2.0) == "holds"
    assert bench.verdict(-2.0, -0.1) == "contradicted"
    assert bench.verdict(-1.0, 1.0) == "not shown"
    assert bench.verdict(-2.0, -0.1, sign=-1) == "holds"  # the claim is that the difference is negative
    assert bench.verdict(0.1, 2.0, sign=-1) == "contradicted"
    assert bench.verdict(math.nan, math.nan) == "not shown"


def test_mean_ci_is_a_t_interval():
    mean, low, high = bench.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert high - mean == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert low == pytest.approx(2 * mean - high)
    assert all(math.isnan(x) for x in bench.mean_ci([1.0])[1:])


def test_claims_and_the_papers_figures():
    claims = {c.name: c for c in bench.CLAIMS}
    assert claims["bd_minus_filling"].paper(0.0) == 2.0
    assert claims["bd_minus_filling"].paper(80.0) == 5.1
    assert claims["bd_minus_image_only"].paper(100.0) == 0.4
    assert claims["filling_minus_image_only"].paper(100.0) == -3.4
    assert claims["ensemble_between_filling_and_bd"].paper(0.0) == 1.0  # min(85.1 - 84.1, 86.1 - 85.1)
    assert claims["modality_dropout_minus_bd"].paper(0.0) is None  # not a method of the paper
    between = claims["ensemble_between_filling_and_bd"]
    aucs = {"filling": np.array([80.0, 80.0]), "ensemble": np.array([81.0, 79.0]), "bd": np.array([83.0, 82.0])}
    assert between.differences(aucs).tolist() == [1.0, -1.0]  # the smaller margin, negative if outside


def test_tiny_run_prints_valid_json_lines():
    cmd = [sys.executable, str(ROOT / "benchmarks/method.py"), "--seeds", "2", "--patients", "200",
           "--repeats", "1", "--paper-optimiser-epochs", "1",
           "--training", json.dumps({"max_epochs": 1, "min_epochs": 1, "patience": 1})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert all({"metric", "value", "unit", "target", "better"} <= set(r) for r in rows)
    names = {r["metric"]: r for r in rows}
    assert names["seeds"]["value"] == 2
    assert "minutes" in names and "cpu" in names
    for regime in REGIMES:
        for key in ("image_only_vs_tumour_fraction_auc", "image_only_vs_mean_pool_lr_auc", "s2m_share"):
            assert math.isfinite(names[f"{key}_{regime}"]["value"])
        for method in bench.METHODS:
            assert f"auc_{regime}_{method}_100" in names
    claims = [r for r in rows if r["metric"].startswith("claim_")]
    assert len(claims) == 2 * (4 + 1 + 1 + 4 + 4 + 4)  # the last two: modality dropout vs BD and Filling
    assert {r["verdict"] for r in claims} <= {"holds", "not shown", "contradicted"}
    assert all(r["target"] is None and len(r["ci"]) == 2 and r["seeds"] == 2 for r in claims)
    assert {"paper_optimiser_bd_test_auc", "paper_optimiser_bd_kept_epoch"} <= set(names)
