"""The clinical report: per-run tables from `bd evaluate`, subgroups from the scaler, and the
tables and figures over all runs (bd/evaluation/clinical_report.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from bd.evaluation import clinical_report as C
from bd.evaluation import decision as D
from bd.cli import main

IDS = [f"P{i}" for i in range(8)]
Y = np.array([0, 1, 0, 1, 1, 0, 0, 1])
P_ON = np.array([0.1, 0.9, 0.3, 0.7, 0.6, 0.2, 0.4, 0.8])
P_OFF = np.array([0.4, 0.6, 0.5, 0.5, 0.45, 0.3, 0.55, 0.65])
SCALER = {"features": [
    {"column": "Age(years)", "kind": "numeric", "mean": 50.0, "std": 10.0},
    {"column": "ER", "kind": "binary", "mean": 0.5, "std": 0.5},
]}  # no HER2 among the features: its subgroups are omitted with the reason


def frame(p_on=P_ON, p_off=P_OFF, y=Y) -> pd.DataFrame:
    def predict(kind, present):
        return np.where(present, p_on, p_off), np.where(present, "multi", "single")

    return C.condition_frame(predict, IDS, y, ["clinical"], lambda kind, present: np.ones(present.shape, bool))


def clinical_rows() -> pd.DataFrame:
    age = np.array([40, 45, 48, 55, 60, 65, 30, 70.0])
    er = np.array([1, 0, 1, 1, 0, 1, 0, 1.0])
    return pd.DataFrame({"patient_id": IDS, "split": "test", "label": Y, "Age(years)": (age - 50) / 10,
                         "Age(years)_missing": [0, 0, 0, 0, 0, 0, 1, 0], "ER": (er - 0.5) / 0.5,
                         "ER_missing": 0, "clinical_present": True})


def test_condition_frame_holds_both_conditions_with_their_branches():
    f = frame()
    assert sorted(set(zip(f.rate, f.branch))) == [(0.0, "multi"), (100.0, "single")]
    assert f[f.rate == 0].prob.tolist() == P_ON.tolist() and f[f.rate == 100].prob.tolist() == P_OFF.tolist()


def test_run_tables_match_the_decision_functions():
    val = frame(p_on=np.array([0.2, 0.8, 0.1, 0.6, 0.5, 0.3, 0.35, 0.9]))
    info = {"experiment": "bd", "method": "bd", "seed": 0, "threshold": "x"}
    tables = C.run_tables(frame(), val, clinical_rows(), SCALER, 0.9, 4, info)
    assert set(tables) == set(C.OUTPUTS)
    op = tables["operating_point"].set_index("rate")
    assert list(tables["operating_point"].columns[:3]) == ["experiment", "method", "seed"]
    # validation positives at 0 %: 0.9, 0.8, 0.6, 0.5 -> ceil(3.6) = 4th largest = 0.5
    assert op.loc[0.0, "threshold"] == 0.5
    assert op.loc[0.0, "val_sensitivity"] == 1.0
    on_test = D.confusion_metrics(Y, P_ON, 0.5)
    for key in ("sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn"):
        assert op.loc[0.0, key] == on_test[key]
    assert op.loc[0.0, "brier"] == pytest.approx(D.brier_score(Y, P_ON))
    assert op.loc[100.0, "ece"] == pytest.approx(D.ece(Y, P_OFF, 4)) and op.loc[0.0, "ece_bins"] == 4
    cal = tables["calibration"]
    assert len(cal) == 2 * 4 and cal.groupby("rate").n.sum().tolist() == [8, 8]
    dca = tables["decision_curve"]
    assert len(dca) == 2 * 99 and (dca.treat_none == 0).all()
    row = dca[(dca.rate == 0) & np.isclose(dca.threshold, 0.5)].iloc[0]
    assert row.net_benefit == pytest.approx(D.net_benefit(Y, P_ON, np.array([0.5]))[0])


def test_subgroups_by_raw_value_with_counts_and_reasons():
    sub = C.subgroup_table(frame(), clinical_rows(), SCALER)
    s = sub[sub.rate == 0].set_index("subgroup")
    # age raw: 40 45 48 55 60 65 (missing) 70 -> < 50: P0 P1 P2; >= 50: P3 P4 P5 P7
    assert (s.loc["age < 50", "n"], s.loc["age < 50", "n_positive"], s.loc["age < 50", "n_unknown"]) == (3, 1, 1)
    assert s.loc["age < 50", "auc"] == pytest.approx(1.0)  # N+ 0.9 above N0 0.1, 0.3
    assert s.loc["age >= 50", "n"] == 4
    assert s.loc["age >= 50", "auc"] == pytest.approx(D.subgroup_auc(Y[[3, 4, 5, 7]], P_ON[[3, 4, 5, 7]],
                                                                     np.ones(4, bool))[0])
    # ER negative: P1 P4 P6 -> two N+, one N0
    assert s.loc["ER negative", "n"] == 3 and s.loc["ER negative", "n_positive"] == 2
    assert math.isnan(s.loc["HER2 positive", "auc"]) and "not a clinical feature" in s.loc["HER2 positive", "reason"]
    one_class = C.subgroup_table(frame(y=np.array([0, 1, 0, 1, 1, 0, 0, 1])), clinical_rows().assign(
        ER=[1, 1, 1, -1, 1, 1, 1, 1]), SCALER)  # ER negative: P3 only (N+)
    row = one_class[(one_class.rate == 0) & (one_class.subgroup == "ER negative")].iloc[0]
    assert math.isnan(row.auc) and row.n == 1 and "one class" in row.reason
    none = C.subgroup_table(frame(), clinical_rows(), None)
    assert none.auc.isna().all() and (none.reason == "no scaler.json given").all()


def test_tables_and_figures_over_runs(tmp_path):
    paths = {name: [] for name in C.OUTPUTS}
    for method in ("bd", "filling"):
        for seed in (0, 1):
            rng = np.random.default_rng(seed)
            on = np.clip(P_ON + rng.normal(0, 0.05, 8), 0, 1)
            tables = C.run_tables(frame(p_on=on), frame(), clinical_rows(), SCALER, 0.9, 5,
                                  {"experiment": method, "method": method, "seed": seed})
            for name, t in tables.items():
                path = tmp_path / method / f"seed{seed}" / f"{name}.csv"
                path.parent.mkdir(parents=True, exist_ok=True)
                t.to_csv(path, index=False)
                paths[name].append(str(path))
    out = tmp_path / "tables"
    assert main(["clinical-report", "tables", "--operating-points", *paths["operating_point"],
                 "--subgroups", *paths["subgroups"], "--out-dir", str(out)]) == 0
    op = pd.read_csv(out / "operating_point.csv")
    assert len(op) == 2 * 2 and (op.seeds == 2).all()
    runs = pd.concat(pd.read_csv(p) for p in paths["operating_point"])
    want = runs[(runs.method == "bd") & (runs.rate == 0)].npv.mean()
    assert op[(op.method == "bd") & (op.rate == 0)].npv.iloc[0] == pytest.approx(want)
    md = (out / "operating_point.md").read_text()
    assert "| BD | clinical | 0 |" in md and "sensitivity >= 0.9 on the validation split" in md
    sub = pd.read_csv(out / "subgroup_auc.csv")
    assert len(sub) == 2 * 2 * len(C.SUBGROUPS)
    assert "not a clinical feature" in (out / "subgroup_auc.md").read_text()
    figs = tmp_path / "figures"
    assert main(["clinical-report", "figures", "--calibration", *paths["calibration"],
                 "--decision-curves", *paths["decision_curve"], "--methods", "filling", "bd",
                 "--calibration-out", str(figs / "calibration.png"), "--decision-out", str(figs / "dca.png")]) == 0
    assert (figs / "calibration.png").stat().st_size > 10_000 and (figs / "dca.png").stat().st_size > 10_000
    pooled = C.pooled_calibration(pd.concat(pd.read_csv(p) for p in paths["calibration"]))
    assert pooled.groupby(["method", "rate"]).n.sum().eq(16).all()  # 8 patients x 2 seeds


def test_missing_run_file_is_named(tmp_path):
    rc = main(["clinical-report", "tables", "--operating-points", str(tmp_path / "nope.csv"),
               "--subgroups", str(tmp_path / "nope2.csv"), "--out-dir", str(tmp_path)])
    assert rc == 2


def test_read_scaler_round_trip(tmp_path):
    (tmp_path / "scaler.json").write_text(json.dumps(SCALER))
    assert C.read_scaler(tmp_path / "scaler.json") == SCALER and C.read_scaler(None) is None
