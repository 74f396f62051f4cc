"""How much signal a cohort in the BCNB layout carries: the clinical-only logistic-regression test
AUC (age, tumour size, ER, PR, HER2; fit on the train ids, scored on the test ids) and, for the
demo cohort, the oracle AUC of its latent risk. Works on the real BCNB folder too (no oracle).

The parsing here is deliberately minimal and local (numbers and Positive/Negative only), so this
check does not depend on the pipeline's clinical stage that it is meant to sanity-check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from bd.errors import TableError
from bd.cohort.split import SPLITS

TABLE_NAME = "patient-clinical-data.xlsx"
LATENT_NAME = "latent_risk.csv"
SPLIT_DIR = "dataset-splitting"
ID_COLUMN, LABEL_COLUMN = "Patient ID", "ALN status"
NUMERIC_FEATURES = ("Age(years)", "Tumour Size(cm)")
BINARY_FEATURES = ("ER", "PR", "HER2")
NEGATIVE_LABEL = "N0"


@dataclass(frozen=True)
class CohortAUC:
    """Test AUCs of a cohort and the sizes they rest on."""

    clinical_auc: float
    oracle_auc: float | None
    n_train: int
    n_test: int
    test_positives: int


def patient_id(value: object) -> str:
    """Patient ids as text: ``12``, ``12.0`` and ``" 12"`` are the same patient."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def clinical_features(table: pd.DataFrame, source: str = "clinical table") -> pd.DataFrame:
    """Age, size and 0/1 receptor status per patient id (NaN where blank or unreadable)."""
    missing = [c for c in (ID_COLUMN, LABEL_COLUMN, *NUMERIC_FEATURES, *BINARY_FEATURES) if c not in table.columns]
    if missing:
        raise TableError(f"{source}: missing column(s) {missing}")
    out = pd.DataFrame(index=table[ID_COLUMN].map(patient_id))
    for col in NUMERIC_FEATURES:
        out[col] = pd.to_numeric(table[col], errors="coerce").to_numpy()
    for col in BINARY_FEATURES:
        status = table[col].astype(str).str.strip().str.casefold()
        out[col] = status.map({"positive": 1.0, "negative": 0.0}).to_numpy()
    out["label"] = (table[LABEL_COLUMN].astype(str).str.strip() != NEGATIVE_LABEL).astype(int).to_numpy()
    return out


def clinical_only_auc(table: pd.DataFrame, split: dict[str, list[str]], source: str = "clinical table") -> tuple[float, int, int, int]:
    """Fit a standardised logistic regression on the train ids, return (test AUC, n_train, n_test,
    test positives). Blank values take the training median."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = clinical_features(table, source)
    train, test = _rows(data, split["train"], source, "train"), _rows(data, split["test"], source, "test")
    x_cols = [*NUMERIC_FEATURES, *BINARY_FEATURES]
    fill = train[x_cols].median()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(train[x_cols].fillna(fill).to_numpy(), train["label"].to_numpy())
    score = model.predict_proba(test[x_cols].fillna(fill).to_numpy())[:, 1]
    _check_both_classes(test["label"], source)
    return float(roc_auc_score(test["label"], score)), len(train), len(test), int(test["label"].sum())


def oracle_auc(latent: pd.DataFrame, test_ids: list[str]) -> float:
    """AUC of the generator's latent risk on the test ids: what a perfect model could reach."""
    from sklearn.metrics import roc_auc_score

    latent = latent.set_index(latent["patient_id"].map(patient_id))
    test = _rows(latent, test_ids, LATENT_NAME, "test")
    _check_both_classes(test["label"], LATENT_NAME)
    return float(roc_auc_score(test["label"], test["latent_risk"]))


def _rows(data: pd.DataFrame, ids: list[str], source: str, split: str) -> pd.DataFrame:
    unknown = [i for i in ids if i not in data.index]
    if unknown:
        raise TableError(f"{source}: {len(unknown)} {split} id(s) not in the table, e.g. {unknown[0]!r}")
    return data.loc[ids]


def _check_both_classes(labels: pd.Series, source: str) -> None:
    if labels.nunique() < 2:
        raise TableError(f"{source}: the test split's {len(labels)} patient(s) are all of one class; an AUC "
                         "needs both N0 and N+ (use a larger cohort)")


def read_split(split_dir: Path) -> dict[str, list[str]]:
    """Official-style split files: ``{train,val,test}_id.txt``, one patient id a line."""
    split = {}
    for name in SPLITS:
        path = split_dir / f"{name}_id.txt"
        if not path.is_file():
            raise TableError(f"{path}: split file missing (expected {', '.join(f'{s}_id.txt' for s in SPLITS)})")
        split[name] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return split


def cohort_auc(folder: str | Path) -> CohortAUC:
    """Clinical-only and (when ``latent_risk.csv`` exists) oracle test AUCs of a BCNB-layout folder."""
    folder = Path(folder)
    table_path = folder / TABLE_NAME
    if not table_path.is_file():
        raise TableError(f"{table_path}: clinical table missing (run `bd demo` first, or point --out-dir at a BCNB folder)")
    table = pd.read_excel(table_path, dtype=object)
    split = read_split(folder / SPLIT_DIR)
    auc, n_train, n_test, positives = clinical_only_auc(table, split, str(table_path))
    latent_path = folder / LATENT_NAME
    oracle = oracle_auc(pd.read_csv(latent_path), split["test"]) if latent_path.is_file() else None
    return CohortAUC(auc, oracle, n_train, n_test, positives)


def report(result: CohortAUC, folder: str | Path) -> str:
    """Human-readable lines for the command line."""
    lines = [
        f"cohort {folder}: train {result.n_train}, test {result.n_test} ({result.test_positives} N+)",
        f"clinical-only logistic regression (age, size, ER, PR, HER2), test AUC: {result.clinical_auc:.3f}",
    ]
    if result.oracle_auc is not None:
        lines.append(f"oracle (latent risk), test AUC: {result.oracle_auc:.3f}")
    return "\n".join(lines)


def as_dict(result: CohortAUC) -> dict[str, object]:
    return asdict(result)


def simulated_auc(n: int, seed: int, slide_signal: float, test_patients: int | None = None) -> CohortAUC:
    """The same AUCs for an in-memory cohort (table only, no files): for calibration checks
    (``test_patients`` as in ``demo.test_patients``)."""
    from bd.demo.patients import bcnb_table, latent_table, official_split, simulate_patients

    patients = simulate_patients(n, seed, slide_signal)
    split = {k: [str(i) for i in v] for k, v in official_split(patients, seed, test_patients).items()}
    auc, n_train, n_test, positives = clinical_only_auc(bcnb_table(patients), split, "simulated table")
    return CohortAUC(auc, oracle_auc(latent_table(patients), split["test"]), n_train, n_test, positives)
