"""Missing-rate evaluation on a synthetic run: shapes, shared masks, composition, CIs."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from bd.errors import ConfigError
from bd.evaluation.evaluate import EvaluationParams, evaluate, run_identity
from bd.evaluation.missing import missing_mask
from bd.params import build

N = 30
IDS = [f"T{i}" for i in range(N)]
LABELS = np.array([i % 3 == 0 for i in range(N)], int)
RNG = np.random.default_rng(0)
P_FULL = np.clip(0.25 + 0.5 * LABELS + RNG.normal(0, 0.2, N), 0, 1)
P_IMG = np.clip(0.35 + 0.3 * LABELS + RNG.normal(0, 0.25, N), 0, 1)
PARAMS = EvaluationParams(missing_rates=[0, 50, 100], curve_rates=[0, 20, 50, 100], repeats=3, seed=5, bootstrap=200)
INFO = {"experiment": "bd", "method": "bd", "seed": 0}


def per_patient(kind, present):
    """A run whose prediction for a patient depends only on that patient's own modalities."""
    return np.where(present, P_FULL, P_IMG), np.where(present, "multi", "single")


def test_rows_and_metrics_match_sklearn():
    metrics, preds, summary = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO)
    assert len(metrics) == 4 * 3 and len(preds) == 4 * 3 * N and len(summary) == 4
    assert set(metrics["rate"]) == {0.0, 20.0, 50.0, 100.0}
    for row in metrics.itertuples():
        p = preds[(preds["rate"] == row.rate) & (preds["repeat"] == row.repeat)]
        assert list(p["patient_id"]) == IDS
        assert row.n_missing == (p["present"] == 0).sum() == round(N * row.rate / 100)
        assert row.auc == pytest.approx(roc_auc_score(p["label"], p["prob"]))
        assert row.f1 == pytest.approx(f1_score(p["label"], p["prob"] >= 0.5, average="macro"))
        assert set(p.loc[p["present"] == 0, "branch"]) <= {"single"}
    zero = metrics[metrics["rate"] == 0]
    assert zero["auc"].nunique() == 1 and zero["auc"].iloc[0] == pytest.approx(roc_auc_score(LABELS, P_FULL))


def test_masks_in_predictions_are_the_shared_seeded_masks():
    _, preds, _ = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO)
    for rep in range(3):
        p = preds[(preds["rate"] == 50) & (preds["repeat"] == rep)]
        expected = missing_mask(IDS, 50, rep, seed=5, kind="clinical")
        assert np.array_equal(p["present"].to_numpy() == 0, expected)


def test_same_masks_for_every_method():
    """Two different 'methods' see the same patients missing at each rate and repeat."""
    other = lambda kind, present: (np.where(present, 1 - P_FULL, 0.5), np.where(present, "m", "s"))
    _, a, _ = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO)
    _, b, _ = evaluate(other, IDS, LABELS, 0.5, ["clinical"], PARAMS, {**INFO, "method": "filling"})
    assert np.array_equal(a["present"].to_numpy(), b["present"].to_numpy())


def test_summary_has_ci_at_table_rates_only():
    _, _, summary = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO)
    table = summary[summary["rate"].isin([0, 50, 100])]
    assert table["auc_ci_low"].notna().all() and (table["auc_ci_low"] <= table["auc_mean"]).all()
    assert (table["auc_mean"] <= table["auc_ci_high"]).all()
    assert summary.loc[summary["rate"] == 20, "auc_ci_low"].isna().all()


def test_interacting_predictions_fall_back_to_direct_calls():
    """If a prediction depends on other patients' presence, every mask is predicted directly."""
    calls = []

    def batchy(kind, present):
        calls.append(present.copy())
        shift = 0.1 * present.mean()
        return np.where(present, P_FULL, P_IMG) * (1 - shift), np.where(present, "multi", "single")

    metrics, preds, _ = evaluate(batchy, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO)
    assert len(calls) == 3 + 12
    p = preds[(preds["rate"] == 50) & (preds["repeat"] == 1)]
    present = p["present"].to_numpy().astype(bool)
    expected, _ = batchy("clinical", present)
    assert np.allclose(p["prob"], expected)


def test_slide_kind_uses_its_own_masks():
    metrics, preds, _ = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical", "slide"], PARAMS, INFO)
    c = preds[(preds.kind == "clinical") & (preds.rate == 50) & (preds.repeat == 0)]["present"].to_numpy()
    s = preds[(preds.kind == "slide") & (preds.rate == 50) & (preds.repeat == 0)]["present"].to_numpy()
    assert not np.array_equal(c, s) and c.sum() == s.sum()
    assert set(metrics["kind"]) == {"clinical", "slide"}


def test_params_from_config_section_and_errors():
    p = build(EvaluationParams, '{"missing_rates": [0, 80], "repeats": 2, "missing_kinds": {"bd_wsi": ["slide"]}}')
    assert p.kinds("bd_wsi") == ["slide"] and p.kinds("bd") == ["clinical"]
    with pytest.raises(ConfigError, match=r"key 'evaluation.curve_rates\[1\]': 110.0 must be <= 100"):
        build(EvaluationParams, {"curve_rates": [0, 110]})
    with pytest.raises(ConfigError, match=r"key 'evaluation.missing_kinds.bd\[0\]': 'wsi' is not one of"):
        build(EvaluationParams, {"missing_kinds": {"bd": ["wsi"]}})
    with pytest.raises(ConfigError, match="unknown key 'evaluation.rate'"):
        build(EvaluationParams, {"rate": [0]})


def test_run_identity_from_path():
    assert run_identity(Path("results/train/bd-prompt-50/seed2/checkpoint.pt"), None, None) == ("bd-prompt-50", 2)
    assert run_identity(Path("x/run/checkpoint.pt"), "bd", 1) == ("bd", 1)
    with pytest.raises(ConfigError, match="--seed"):
        run_identity(Path("x/run/checkpoint.pt"), None, None)


# ---------------------------------------------------------------- end to end on tiny trained runs

import pandas as pd  # noqa: E402

from bd.evaluation import clinical_report as C  # noqa: E402
from bd.evaluation import decision as D  # noqa: E402
from bd.cli import main  # noqa: E402

from synthetic_results import make_tiny_cohort, train_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cohort = make_tiny_cohort(root)
    runs = {m: train_tiny(root, cohort, m) for m in ("bd", "filling")}
    return root, cohort, runs


def _evaluate(root, cohort, checkpoint, params):
    out = checkpoint.parent.parent.parent.parent / "evaluate" / checkpoint.parent.parent.name / checkpoint.parent.name
    rc = main(["evaluate", "--run", str(checkpoint), "--feature-index", str(cohort["features"]),
               "--samples", str(cohort["samples"]), "--clinical", str(cohort["clinical"]),
               "--params", params, "--out-dir", str(out)])
    assert rc == 0
    return out


def test_bd_evaluate_on_trained_runs(tiny):
    root, cohort, runs = tiny
    params = '{"missing_rates": [0, 50, 100], "curve_rates": [0, 50, 100], "repeats": 2, "bootstrap": 50}'
    out = _evaluate(root, cohort, runs["bd"], params)
    metrics = pd.read_csv(out / "metrics.csv")
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    clinical = pd.read_csv(cohort["clinical"], sep="\t", dtype={"patient_id": str})
    test_ids = sorted(clinical.loc[clinical.split == "test", "patient_id"])
    assert sorted(set(preds.patient_id)) == test_ids  # test split only
    assert set(metrics.kind) == {"clinical"} and len(metrics) == 3 * 2
    assert (metrics.method == "bd").all() and (metrics.experiment == "bd").all() and (metrics.seed == 0).all()
    assert set(preds.loc[preds.present == 1, "branch"]) == {"multi"}
    assert set(preds.loc[preds.present == 0, "branch"]) == {"single"}
    row = metrics[(metrics.rate == 50) & (metrics.repeat == 1)].iloc[0]
    p = preds[(preds.rate == 50) & (preds.repeat == 1)]
    thr = json.loads(metrics.threshold.iloc[0])  # each branch's own validation threshold
    assert set(thr) == {"multi", "single", "*"}
    cut = p.branch.map(thr).to_numpy(float)
    assert row.auc == pytest.approx(roc_auc_score(p.label, p.prob))
    assert row.f1 == pytest.approx(f1_score(p.label, p.prob >= cut, average="macro"))
    # the composed predictions equal a direct prediction under the same mask
    from bd.evaluation.evaluate import load_split_cohort
    from bd.mil.runs import load_run

    run = load_run(runs["bd"])
    c = load_split_cohort(str(cohort["features"]), str(cohort["samples"]), str(cohort["clinical"]), "test", None)
    present = p.set_index("patient_id").loc[c.patient_ids, "present"].to_numpy().astype(bool)
    direct = run.predict(c, clinical_present=present)
    assert np.allclose(direct.prob, p.set_index("patient_id").loc[c.patient_ids, "prob"], atol=1e-5)


def test_filling_is_swept_over_slides_too(tiny):
    root, cohort, runs = tiny
    out = _evaluate(root, cohort, runs["filling"], '{"missing_rates": [0, 100], "curve_rates": [], "repeats": 1, "bootstrap": 0}')
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics.kind) == {"clinical", "slide"}
    summary = pd.read_csv(out / "summary.csv")
    assert summary.auc_ci_low.isna().all()  # bootstrap 0: no CIs


# ---------------------------------------------------------------- patients without a slide or clinical data

NO_SLIDE = np.zeros(N, bool)
NO_SLIDE[[0, 1]] = True  # T0 (N+) and T1 (N0) have no slide


def constant_without_slide(kind, present):
    """What an image-only model gives a patient with an empty bag: one constant probability."""
    return np.where(NO_SLIDE, 0.99, P_IMG), np.full(N, "image")


def test_patients_without_a_slide_are_not_scored_by_a_method_that_needs_it():
    from bd.evaluation.evaluate import Modalities

    mods = Modalities(has_slide=~NO_SLIDE, has_clinical=np.ones(N, bool), uses_slide=True)
    metrics, preds, _ = evaluate(constant_without_slide, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO, mods)
    keep = ~NO_SLIDE
    assert metrics["auc"].iloc[0] == pytest.approx(roc_auc_score(LABELS[keep], P_IMG[keep]))
    assert (metrics["n_scored"] == N - 2).all() and (metrics["n_unscored"] == 2).all()
    assert not set(preds["patient_id"]) & {"T0", "T1"}
    # counted with their constant, the AUC would differ: the test can fail
    assert metrics["auc"].iloc[0] != pytest.approx(roc_auc_score(LABELS, np.where(NO_SLIDE, 0.99, P_IMG)))


def test_a_method_with_a_no_slide_behaviour_answers_from_clinical_data_only():
    from bd.evaluation.evaluate import Modalities

    mods = Modalities(has_slide=~NO_SLIDE, has_clinical=np.ones(N, bool), uses_slide=True, answers_without_slide=True)
    metrics, preds, _ = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO, mods)
    zero = metrics[metrics["rate"] == 0].iloc[0]
    assert (zero.n_scored, zero.n_both, zero.n_clinical_only, zero.n_unscored) == (N, N - 2, 2, 0)
    full = metrics[metrics["rate"] == 100].iloc[0]  # no clinical data and no slide: nothing to answer from
    assert (full.n_scored, full.n_slide_only, full.n_unscored, full.n_neither) == (N - 2, N - 2, 2, 0)
    assert set(preds.loc[preds.patient_id == "T0", "has_slide"]) == {0}


def test_a_patient_without_clinical_values_counts_as_missing_clinical_data():
    from bd.evaluation.evaluate import Modalities

    has_clinical = np.ones(N, bool)
    has_clinical[5] = False
    mods = Modalities(has_slide=np.ones(N, bool), has_clinical=has_clinical, uses_slide=True)
    metrics, _, _ = evaluate(per_patient, IDS, LABELS, 0.5, ["clinical"], PARAMS, INFO, mods)
    zero = metrics[metrics["rate"] == 0].iloc[0]
    assert (zero.n_both, zero.n_slide_only) == (N - 1, 1)


def test_cohort_batches_never_carry_clinical_data_a_patient_does_not_have():
    from bd.synthetic import synthetic_cohort

    cohort = synthetic_cohort(n_patients=6, n_clinical=3)
    cohort.has_clinical = np.array([True, False, True, True, True, True])
    batch = cohort.batch([0, 1], clinical_present=np.array([True, True]))
    assert batch.clinical_present.tolist() == [True, False] and not batch.clinical[1].any()
    assert cohort.select([1, 2]).has_clinical.tolist() == [False, True]


def _stores_cohort(tmp_path: Path) -> tuple[Path, Path, Path]:
    from bd.features.store import write_store

    feats = tmp_path / "features"
    rows = []
    for i in range(1, 5):
        slide = tmp_path / f"{i}.svs"
        slide.write_bytes(b"slide")
        write_store(feats / f"{i}.zarr", np.ones((3, 4)), np.zeros((3, 2)), {"encoder": "x"})
        rows.append((str(i), f"00{i}", str(slide)))  # 001 in the sheet is patient 1 of the table
    import pandas as pd

    pd.DataFrame(rows, columns=["slide_id", "patient_id", "path"]).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    pd.DataFrame({"patient_id": ["1", "2", "3", "4"], "split": "test", "label": [0, 1, 0, 1],
                  "c": 0.0}).to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    return feats, tmp_path / "s.tsv", tmp_path / "c.tsv"


def test_a_lost_store_is_refused_naming_it(tmp_path, caplog):
    """bd train and bd evaluate load the cohort through load_cohort: a slide of the cohort whose
    store is gone is an error naming the store, not a patient silently missing its slide."""
    import shutil

    from bd.mil.bags import load_cohort
    from bd.errors import StoreError

    feats, sheet, table = _stores_cohort(tmp_path)
    assert load_cohort(feats, sheet, table, progress=False).has_slide.all()
    shutil.rmtree(feats / "3.zarr")
    with pytest.raises(StoreError, match=r"1 slide\(s\) of the cohort have no feature store: .*3\.zarr"):
        load_cohort(feats, sheet, table, progress=False)
    (tmp_path / "3.svs").unlink()  # the slide file is missing too (on_slide_error: skip): counted as missing
    cohort = load_cohort(feats, sheet, table, progress=False)
    assert cohort.has_slide.tolist() == [True, True, False, True] and "have no feature store" in caplog.text


# ---------------------------------------------------------------- the clinical report of bd evaluate


@pytest.fixture(scope="module")
def named_clinical(tmp_path_factory):
    """A tiny cohort whose clinical columns carry BCNB's names (for the subgroups) and its scaler."""
    root = tmp_path_factory.mktemp("named")
    cohort = make_tiny_cohort(root, n_patients=32)
    table = pd.read_csv(cohort["clinical"], sep="\t", dtype={"patient_id": str})
    rng = np.random.default_rng(1)
    table = table.rename(columns={"age": "Age(years)", "size": "Tumour Size(cm)", "er": "ER"})
    table["ER"] = np.where(table["ER"] > 0.4, 1.0, -1.0)  # binary, scaled: positive 1, negative -1
    table["HER2"] = np.where(rng.random(len(table)) < 0.3, 1.0, -1.0)
    table.to_csv(cohort["clinical"], sep="\t", index=False)
    scaler = {"features": [{"column": "Age(years)", "kind": "numeric", "mean": 52.0, "std": 10.0},
                           {"column": "Tumour Size(cm)", "kind": "numeric", "mean": 2.0, "std": 1.0},
                           {"column": "ER", "kind": "binary", "mean": 0.5, "std": 0.5},
                           {"column": "HER2", "kind": "binary", "mean": 0.5, "std": 0.5}]}
    (root / "scaler.json").write_text(json.dumps(scaler))
    runs = {m: train_tiny(root, cohort, m) for m in ("bd", "modality_dropout")}
    return root, cohort, runs


@pytest.mark.parametrize("method", ["bd", "modality_dropout"])
def test_bd_evaluate_writes_the_clinical_report(named_clinical, method):
    root, cohort, runs = named_clinical
    out = root / "evaluate" / method / "seed0"
    rc = main(["evaluate", "--run", str(runs[method]), "--feature-index", str(cohort["features"]),
               "--samples", str(cohort["samples"]), "--clinical", str(cohort["clinical"]),
               "--scaler", str(root / "scaler.json"), "--out-dir", str(out),
               "--params", '{"missing_rates": [0, 100], "curve_rates": [], "repeats": 1, "bootstrap": 0, '
                           '"target_sensitivity": 0.9, "calibration_bins": 5}'])
    assert rc == 0
    table = pd.read_csv(cohort["clinical"], sep="\t", dtype={"patient_id": str})
    test, val = table[table.split == "test"], table[table.split == "val"]
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    op = pd.read_csv(out / "operating_point.csv").set_index("rate")
    assert list(op.index) == [0.0, 100.0] and (op.method == method).all()
    assert op.loc[0.0, "branch"] in ("multi", "fusion") and op.loc[100.0, "branch"] in ("single", "token")
    assert (op.n == len(test)).all() and (op.val_n == len(val)).all()
    # the operating point is chosen on the validation predictions of the same condition
    from bd.mil.runs import load_run

    run = load_run(runs[method])
    from bd.evaluation.evaluate import load_split_cohort

    vc = load_split_cohort(str(cohort["features"]), str(cohort["samples"]), str(cohort["clinical"]), "val", None)
    for rate, present in ((0.0, True), (100.0, False)):
        v = run.predict(vc, clinical_present=np.full(vc.n_patients, present))
        assert op.loc[rate, "threshold"] == pytest.approx(D.threshold_for_sensitivity(v.label, v.prob, 0.9))
        assert op.loc[rate, "val_sensitivity"] >= 0.9
        t = preds[(preds.rate == rate)]
        assert op.loc[rate, "brier"] == pytest.approx(D.brier_score(t.label, t.prob))
        m = D.confusion_metrics(t.label.to_numpy(), t.prob.to_numpy(), op.loc[rate, "threshold"])
        assert op.loc[rate, "npv"] == pytest.approx(m["npv"], nan_ok=True)
    cal = pd.read_csv(out / "calibration.csv")
    assert len(cal) == 2 * 5 and (cal.groupby("rate").n.sum() == len(test)).all()
    dca = pd.read_csv(out / "decision_curve.csv")
    assert len(dca) == 2 * 99
    sub = pd.read_csv(out / "subgroups.csv")
    assert set(sub.subgroup) == set(C.SUBGROUPS)
    both = sub[(sub.rate == 0)].set_index("subgroup")
    assert both.loc["ER positive", "n"] + both.loc["ER negative", "n"] == len(test)
    young = (test["Age(years)"] * 10 + 52 < 50).sum()
    assert both.loc["age < 50", "n"] == young
    defined = both.auc.notna()
    assert (both.reason[~defined] != "").all() and both.reason[defined].isna().all()
