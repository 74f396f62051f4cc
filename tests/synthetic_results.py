"""Synthetic evaluations for the aggregation, figure and report tests.

Each synthetic "run" predicts from a per-method signal strength, through the real
``bd.evaluation.evaluate.evaluate`` (seeded masks, scikit-learn metrics), so the tables and figures are
built from files of exactly the shape ``bd evaluate`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bd.synthetic import synthetic_cohort
from bd.evaluation.evaluate import EvaluationParams, evaluate, write_csv
from bd.features.store import write_store

N_TEST = 40
IDS = [f"P{i:03d}" for i in range(N_TEST)]
LABELS = (np.arange(N_TEST) % 3 == 0).astype(int)

# method -> (signal with all modalities, signal with the swept modality missing)
STRENGTH = {
    "image_only": (1.4, 1.4), "clinical_only": (0.8, 0.0), "filling": (1.8, 1.1), "ae": (1.8, 1.2),
    "ensemble": (1.9, 1.4), "smil": (1.7, 1.3), "bd": (2.1, 1.7), "bd_wsi": (1.9, 1.0),
    "modality_dropout": (1.9, 1.5),
}
PARAMS = EvaluationParams(missing_rates=[0, 50, 80, 100], curve_rates=[0, 20, 40, 60, 80, 100],
                          repeats=3, seed=0, bootstrap=100)


def predictor(strength: tuple[float, float], seed: int):
    rng = np.random.default_rng(seed)
    noise_on, noise_off = rng.normal(size=N_TEST), rng.normal(size=N_TEST)

    def predict(kind: str, present: np.ndarray):
        z = np.where(present, strength[0] * LABELS + noise_on, strength[1] * LABELS + noise_off) - 0.7
        return 1 / (1 + np.exp(-z)), np.where(present, "multi", "single")

    return predict


def experiment_info(name: str) -> dict:
    info = {"experiment": name, "method": name, "lambda_m": 0.6, "lambda_s": 0.5,
            "directions": "both", "prompt_length": 50, "epoch": 20, "threshold": 0.5}
    if name.startswith("bd-dir-"):
        info.update(method="bd", directions=name.split("-")[-1])
    elif name.startswith("bd-prompt-"):
        info.update(method="bd", prompt_length=int(name.split("-")[-1]))
    elif name.startswith("bd-lm-"):
        parts = name.split("-")
        info.update(method="bd", lambda_m=float(parts[2]), lambda_s=float(parts[4]), epoch=10 + len(name))
    return info


# Test patients' clinical rows (scaled as bd clinical writes them) and the scaler, for the subgroups.
_RNG = np.random.default_rng(11)
CLINICAL_ROWS = pd.DataFrame({"patient_id": IDS, "split": "test", "label": LABELS,
                              "Age(years)": _RNG.normal(size=N_TEST), "ER": np.where(_RNG.random(N_TEST) < 0.7, 1.0, -1.0),
                              "HER2": np.where(_RNG.random(N_TEST) < 0.3, 1.0, -1.0), "clinical_present": True})
SCALER = {"features": [{"column": "Age(years)", "kind": "numeric", "mean": 52.0, "std": 10.0},
                       {"column": "ER", "kind": "binary", "mean": 0.5, "std": 0.5},
                       {"column": "HER2", "kind": "binary", "mean": 0.5, "std": 0.5}]}


def write_clinical_report(out: Path, base: tuple[float, float], seed: int, kinds: list[str], info: dict,
                          params: EvaluationParams) -> None:
    """The clinical-report tables of `bd evaluate` (bd.evaluation.clinical_report.run_tables) for a synthetic
    run; validation predictions from the same predictor with another seed."""
    from bd.evaluation import clinical_report as C

    everyone = lambda kind, present: np.ones(present.shape, bool)  # noqa: E731
    test = C.condition_frame(predictor(base, seed), IDS, LABELS, kinds, everyone)
    val = C.condition_frame(predictor(base, seed + 100), IDS, LABELS, kinds, everyone)
    tables = C.run_tables(test, val, CLINICAL_ROWS, SCALER, params.target_sensitivity, params.calibration_bins, info)
    for name, frame in tables.items():
        write_csv(out / f"{name}.csv", frame)


def write_run(results: Path, name: str, seed: int, params: EvaluationParams = PARAMS) -> Path:
    """results/evaluate/{name}/seed{seed}/{metrics,predictions,summary}.csv and the clinical
    report's tables; returns metrics.csv."""
    info = {**experiment_info(name), "seed": seed}
    method = info["method"]
    base = STRENGTH.get(name, STRENGTH.get(method, (1.5, 1.0)))
    if name.startswith("bd-"):
        base = (base[0] + 0.05 * (sum(map(ord, name)) % 5), base[1])
    kinds = params.kinds(method)
    metrics, preds, summary = evaluate(predictor(base, seed), IDS, LABELS, 0.5, kinds, params, info)
    out = results / "evaluate" / name / f"seed{seed}"
    write_csv(out / "predictions.csv", preds)
    write_csv(out / "summary.csv", summary)
    write_clinical_report(out, base, seed, kinds, info, params)
    write_csv(out / "metrics.csv", metrics)
    return out / "metrics.csv"


MAIN = ["image_only", "clinical_only", "filling", "ae", "ensemble", "smil", "bd", "modality_dropout"]
DIRECTIONS = ["bd-dir-none", "bd-dir-m2s", "bd-dir-s2m", "bd-dir-both"]
PROMPTS = ["bd-prompt-10", "bd-prompt-50"]
LAMBDAS = ["bd-lm-0.2-ls-0.5", "bd-lm-0.6-ls-0.5", "bd-lm-0.6-ls-0.8"]


# ---------------------------------------------------------------- a tiny real cohort and runs

SLIDE = Path(__file__).parent / "data" / "cmu-1-small-region.svs"  # 2220 x 2967, MPP 0.499
STORE_ATTRS = {"encoder": "tiny-test", "weights_sha256": "0" * 64, "patch_size": 256,
               "target_mpp": 0.5, "mpp": 0.499, "patch_size_level0": 256.5}


def make_tiny_cohort(root: Path, n_patients: int = 24, dim: int = 16, seed: int = 0) -> dict[str, Path]:
    """Feature stores (patches over the real fixture slide), samples.tsv and clinical.tsv: N+
    patients have a shifted mean in a few feature and clinical columns, so models learn quickly."""
    import pandas as pd

    from bd.features.store import write_store

    rng = np.random.default_rng(seed)
    features_dir = root / "features"
    labels = ((np.arange(n_patients) // 4) % 2).astype(int)  # both classes in every split
    splits = np.array(["train", "train", "val", "test"] * (n_patients // 4 + 1))[:n_patients]
    grid = np.array([[x, y] for y in range(0, 2700, 256) for x in range(0, 1960, 256)], np.int64)
    for i in range(n_patients):
        n = int(rng.integers(6, 14))
        coords = grid[rng.choice(len(grid), n, replace=False)]
        feats = rng.normal(size=(n, dim)) + 1.5 * labels[i] * (np.arange(dim) < 4)
        write_store(features_dir / f"S{i}.zarr", feats, coords, dict(STORE_ATTRS))
    ids = [f"P{i}" for i in range(n_patients)]
    samples = pd.DataFrame({"slide_id": [f"S{i}" for i in range(n_patients)], "patient_id": ids,
                            "path": [str(SLIDE)] * n_patients})
    clin = rng.normal(size=(n_patients, 3)) + 0.8 * labels[:, None]
    clinical = pd.DataFrame({"patient_id": ids, "split": splits, "label": labels,
                             "age": clin[:, 0], "size": clin[:, 1], "er": clin[:, 2]})
    samples.to_csv(root / "samples.tsv", sep="\t", index=False)
    clinical.to_csv(root / "clinical.tsv", sep="\t", index=False)
    return {"features": features_dir, "samples": root / "samples.tsv", "clinical": root / "clinical.tsv"}


def train_tiny(root: Path, cohort: dict[str, Path], method: str, seed: int = 0, **overrides) -> Path:
    """``bd train`` for a few epochs; returns the checkpoint path."""
    import json

    from bd.cli import main

    name = overrides.pop("experiment", method)
    out = root / "train" / name / f"seed{seed}"
    params = {"method": method, "max_epochs": 3, "patience": 3, "hidden_dim": 8, "clinical_dim": 6,
              "prompt_length": 5, "lr": 0.01, "precision": "fp32", "device": "cpu", **overrides}
    rc = main(["train", "--feature-index", str(cohort["features"]), "--samples", str(cohort["samples"]),
               "--clinical", str(cohort["clinical"]), "--seed", str(seed), "--params", json.dumps(params),
               "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    return out / "checkpoint.pt"


def write_cohort_layout(root: Path, n: int = 16, patches: int = 8, dim: int = 16, clin: int = 4,
                        seed: int = 4, signal: float = 3.0, last_without_store: bool = True) -> dict[str, Path]:
    """What ``bd train`` reads, for a synthetic cohort of ``n`` patients: feature stores (the last
    patient's left out when ``last_without_store``), sample sheet, clinical table and scaler."""
    syn = synthetic_cohort(n, patches, dim, clin, seed=seed, signal=signal)
    feats = root / "features"
    for i, sid in enumerate(syn.slide_ids[:-1] if last_without_store else syn.slide_ids):
        a, b = int(syn.offsets[i]), int(syn.offsets[i + 1])
        write_store(feats / f"{sid}.zarr", syn.features[a:b].numpy(), syn.coords[a:b],
                    {"encoder": "toy", "weights_sha256": "0" * 64, "patch_size": 256, "slide_id": sid})
    pd.DataFrame({"slide_id": syn.slide_ids, "patient_id": syn.patient_ids, "path": "x"}).to_csv(
        root / "samples.tsv", sep="\t", index=False)
    table = pd.DataFrame({"patient_id": syn.patient_ids, "split": syn.split, "label": syn.labels})
    for j, col in enumerate(syn.clinical_columns):
        table[col] = syn.clinical[:, j]
    table.to_csv(root / "clinical.tsv", sep="\t", index=False)
    (root / "scaler.json").write_text(json.dumps({"age": {"mean": 1.0}}))
    return {"features": feats, "samples": root / "samples.tsv", "clinical": root / "clinical.tsv",
            "scaler": root / "scaler.json"}
