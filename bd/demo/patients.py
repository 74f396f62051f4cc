"""The demo cohort's patients: labels, clinical values in BCNB's messy form, latent risk, split.

Generative story (label first, so every published statistic is matched by construction):

1. ALN status is assigned in BCNB's exact ratio 655 : 210 : 193 (N0 : N+(1-2) : N+(>2)).
2. Each label-dependent variable is drawn from a class-conditional distribution calibrated to
   BCNB's published N0 vs N+ statistics (age, tumour size, ER/PR jointly, HER2, histological grade incl. blanks), and a hidden
   *tissue risk* (the slide's tumour burden, in SD units) from N(shift, 1) with a larger shift
   for N+(>2) than for N+(1-2); the slides show it as a tumour-like area fraction.
3. The *latent risk* is the exact Bayes log posterior odds of N+ given all of those draws, so its
   AUC (the oracle AUC) bounds any model on the cohort. The clinical part alone gives a
   logistic-regression AUC of about 0.64, the tissue part about 0.84, as in the real cohort.
4. Label-independent columns (tumour type, HER2 expression, Ki67, molecular subtype) follow from
   the above; label-revealing ones (``Surgical``, ``Number of lymph node metastases``) from the label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

ALN_CLASSES = ("N0", "N+(1-2)", "N+(>2)")
BCNB_CLASS_COUNTS = (655, 210, 193)
BCNB_SPLIT_COUNTS = {"train": 630, "val": 210, "test": 218}
BCNB_COLUMNS = [
    "Patient ID", "Age(years)", "Tumour Size(cm)", "Tumour Type", "ER", "PR", "HER2",
    "HER2 Expression", "Histological grading", "Surgical", "Ki67", "Molecular subtype",
    "Number of lymph node metastases", "ALN status",
]
TABLE_STREAM = 0  # SeedSequence stream of the table (slides use 1 + patient id)


@dataclass(frozen=True)
class Normal:
    """A class-conditional normal variable (index 0: N0, 1: N+)."""

    mean: tuple[float, float]
    sd: tuple[float, float]

    def sample(self, rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
        return rng.normal(np.take(self.mean, y), np.take(self.sd, y))

    def log_ratio(self, x: np.ndarray) -> np.ndarray:
        """log p(x | N+) - log p(x | N0)."""
        return _log_normal(x, self.mean[1], self.sd[1]) - _log_normal(x, self.mean[0], self.sd[0])


@dataclass(frozen=True)
class Choice:
    """A class-conditional categorical variable over ``levels`` (probabilities for N0, N+)."""

    levels: tuple[str, ...]
    probs: tuple[tuple[float, ...], tuple[float, ...]]

    def sample(self, rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
        cum = np.cumsum(np.asarray(self.probs), axis=1)[y]
        idx = (rng.random(len(y))[:, None] > cum[:, :-1]).sum(axis=1)
        return np.asarray(self.levels, dtype=object)[idx]

    def log_ratio(self, x: np.ndarray) -> np.ndarray:
        table = {lv: math.log(p1 / p0) for lv, p0, p1 in zip(self.levels, *self.probs)}
        return np.array([table[v] for v in x], dtype=float)


@dataclass(frozen=True)
class TissueBurden:
    """The hidden tumour burden a slide shows: N(0,1) for N0, N(shift -/+ spread, 1) for N+."""

    shift: float
    spread: float = 0.25

    def means(self) -> np.ndarray:
        return np.array([0.0, self.shift - self.spread, self.shift + self.spread])

    def sample(self, rng: np.random.Generator, aln: np.ndarray) -> np.ndarray:
        return rng.normal(self.means()[aln], 1.0)

    def log_ratio(self, t: np.ndarray) -> np.ndarray:
        """log p(t | N+) - log p(t | N0), N+ being the BCNB-weighted mixture of its two classes."""
        w = np.asarray(BCNB_CLASS_COUNTS[1:], dtype=float) / sum(BCNB_CLASS_COUNTS[1:])
        m = self.means()
        pos = np.log(w[0] * np.exp(_log_normal(t, m[1], 1.0)) + w[1] * np.exp(_log_normal(t, m[2], 1.0)))
        return pos - _log_normal(t, m[0], 1.0)


def _log_normal(x: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))


def _receptor_probs(er_neg: float, pr_neg: float, overlap: float = 0.85) -> tuple[float, ...]:
    """Joint ER/PR probabilities (levels ``--``, ``-+``, ``+-``, ``++``) with the given marginal
    negative rates; ``overlap`` of the rarer negative is double negative, as ER and PR go together."""
    both = overlap * min(er_neg, pr_neg)
    return (both, er_neg - both, pr_neg - both, 1.0 - er_neg - pr_neg + both)


def _grade_probs(blank: float, grades: tuple[float, float, float]) -> tuple[float, ...]:
    return (blank, *(g * (1.0 - blank) for g in grades))


# Calibrated to BCNB's published statistics (N0 vs N+); grade levels among the non-blank are a plausible guess.
AGE = Normal(mean=(58.5, 56.0), sd=(12.2, 12.9))
TUMOUR_SIZE = Normal(mean=(2.08, 2.48), sd=(0.83, 0.85))
RECEPTORS = Choice(("--", "-+", "+-", "++"), (_receptor_probs(0.24, 0.27), _receptor_probs(0.18, 0.23)))
HER2 = Choice(("Negative", "Positive"), ((0.74, 0.26), (0.73, 0.27)))
GRADE = Choice(("", "1", "2", "3"), (_grade_probs(0.14, (0.12, 0.62, 0.26)), _grade_probs(0.09, (0.08, 0.60, 0.32))))

AGE_RANGE = (24, 90)
SIZE_RANGE = (0.5, 5.5)
TUMOUR_TYPES = (("Invasive ductal carcinoma", 0.86), ("Invasive lobular carcinoma", 0.04), ("Other type", 0.10))
SURGERY = ("Sentinel Lymph Node Biopsy", "Axillary Lymph Node Dissection")
SURGERY_DISSECTION_RATE = (0.06, 0.70, 1.0)  # per ALN class
KI67_FORMS = (("fraction", 0.85), ("range", 0.10), ("bound", 0.05))
LUMINAL_A_KI67 = 0.14


def class_counts(n: int, ratio: tuple[int, ...] = BCNB_CLASS_COUNTS) -> np.ndarray:
    """Split ``n`` into parts in proportion to ``ratio`` (largest remainder; sums to ``n``)."""
    exact = n * np.asarray(ratio, dtype=float) / sum(ratio)
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def simulate_patients(n: int, seed: int, slide_signal: float = 1.4) -> pd.DataFrame:
    """``n`` synthetic patients (ids 1..n) with typed clinical values, label and latent risk."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, TABLE_STREAM]))
    aln = rng.permutation(np.repeat(np.arange(3), class_counts(n)))
    y = (aln > 0).astype(int)
    burden = TissueBurden(slide_signal)
    p = pd.DataFrame({"patient_id": np.arange(1, n + 1), "aln": aln, "label": y})
    p["age_raw"] = AGE.sample(rng, y)
    p["size_raw"] = TUMOUR_SIZE.sample(rng, y)
    p["receptors"] = RECEPTORS.sample(rng, y)
    p["her2"] = HER2.sample(rng, y)
    p["grade"] = GRADE.sample(rng, y)
    p["tissue_risk"] = burden.sample(rng, aln)
    p["tumour_type"] = _draw(rng, TUMOUR_TYPES, n)
    p["her2_expression"] = _her2_expression(rng, p["her2"].to_numpy())
    p["ki67"] = _ki67_values(rng, p)
    p["ki67_text"] = _ki67_texts(rng, p["ki67"].to_numpy())
    p["surgical"] = np.where(rng.random(n) < np.take(SURGERY_DISSECTION_RATE, aln), SURGERY[1], SURGERY[0])
    p["lymph_nodes"] = _lymph_nodes(rng, aln)
    _ensure_messy_forms(rng, p)
    p["tumour_fraction"] = tumour_fraction(p["tissue_risk"].to_numpy())
    p["latent_risk"] = _latent_risk(p, burden)
    return p


def _draw(rng: np.random.Generator, options: tuple[tuple[str, float], ...], n: int) -> np.ndarray:
    names, probs = zip(*options)
    return np.asarray(names, dtype=object)[rng.choice(len(names), size=n, p=probs)]


def _her2_expression(rng: np.random.Generator, her2: np.ndarray) -> np.ndarray:
    """IHC score consistent with HER2 status: positive is 3+ (or 2+ with amplification)."""
    pos = _draw(rng, (("3+", 0.8), ("2+", 0.2)), len(her2))
    neg = _draw(rng, (("0", 0.30), ("1+", 0.45), ("2+", 0.25)), len(her2))
    return np.where(her2 == "Positive", pos, neg)


def _ki67_values(rng: np.random.Generator, p: pd.DataFrame) -> np.ndarray:
    """Ki67 fraction: low in hormone-receptor-positive HER2- tumours, high in triple negatives."""
    hr_pos = p["receptors"].to_numpy() != "--"
    her2_pos = p["her2"].to_numpy() == "Positive"
    a = np.select([hr_pos & ~her2_pos, her2_pos], [1.6, 3.0], 4.0)
    b = np.select([hr_pos & ~her2_pos, her2_pos], [7.0, 5.0], 4.0)
    return np.clip(rng.beta(a, b), 0.005, 0.95)


def _ki67_texts(rng: np.random.Generator, ki67: np.ndarray) -> np.ndarray:
    """Ki67 as BCNB writes it: mostly fractions (``0.3``), some ranges (``30-40%``), and bounds
    (``＜5%`` full-width, ``<1%``, ``>90%``) where the value is extreme."""
    forms = _draw(rng, KI67_FORMS, len(ki67))
    texts = [_ki67_text(v, f) for v, f in zip(ki67, forms)]
    return np.asarray(texts, dtype=object)


def _ki67_text(value: float, form: str) -> str:
    if form == "bound":
        if value < 0.01:
            return "<1%"
        if value < 0.05:
            return "＜5%"
        if value > 0.9:
            return ">90%"
        form = "range"
    if form == "range":
        return _ki67_range(value)
    step = 0.05 if value >= 0.1 else 0.01
    return f"{max(round(value / step) * step, 0.01):.2f}".rstrip("0").rstrip(".")


def _ki67_range(value: float) -> str:
    low = int(min(value * 100 // 10 * 10, 80))
    return f"{max(low, 5)}-{low + 10}%" if low else "5-10%"


def _lymph_nodes(rng: np.random.Generator, aln: np.ndarray) -> np.ndarray:
    """Number of metastatic nodes: 0, 1-2, or 3 plus a geometric tail."""
    few = rng.integers(1, 3, size=len(aln))
    many = np.minimum(2 + rng.geometric(0.17, size=len(aln)), 45)
    return np.select([aln == 0, aln == 1], [0, few], many)


def _ensure_messy_forms(rng: np.random.Generator, p: pd.DataFrame) -> None:
    """Make sure even a tiny cohort has a range Ki67, a full-width Ki67 and a blank grade, so
    that every parser path is exercised; large cohorts have them already."""
    texts = p["ki67_text"]
    if not texts.str.contains("-").any():
        i = int(rng.choice(np.flatnonzero(~texts.str.contains("[<＜>]"))))
        p.loc[i, "ki67_text"] = _ki67_range(p.loc[i, "ki67"])
    if not p["ki67_text"].str.contains("＜").any():
        free = np.flatnonzero(~p["ki67_text"].str.contains("-"))
        i = int(free[np.argmin(p["ki67"].to_numpy()[free])])
        p.loc[i, "ki67_text"] = f"＜{max(5, math.ceil(p.loc[i, 'ki67'] * 20) * 5)}%"
    if not (p["grade"] == "").any():
        p.loc[int(rng.integers(len(p))), "grade"] = ""


def tumour_fraction(tissue_risk: np.ndarray) -> np.ndarray:
    """Share of the tissue drawn with tumour-like morphology, rising with the tissue risk."""
    return np.clip(1.0 / (1.0 + np.exp(-(-1.55 + 0.85 * tissue_risk))), 0.03, 0.75)


def _latent_risk(p: pd.DataFrame, burden: TissueBurden) -> np.ndarray:
    """Exact log posterior odds of N+ given every label-dependent draw (the oracle score)."""
    prior = math.log(sum(BCNB_CLASS_COUNTS[1:]) / BCNB_CLASS_COUNTS[0])
    return (
        prior
        + AGE.log_ratio(p["age_raw"].to_numpy())
        + TUMOUR_SIZE.log_ratio(p["size_raw"].to_numpy())
        + RECEPTORS.log_ratio(p["receptors"].to_numpy())
        + HER2.log_ratio(p["her2"].to_numpy())
        + GRADE.log_ratio(p["grade"].to_numpy())
        + burden.log_ratio(p["tissue_risk"].to_numpy())
    )


def _subtype(er: np.ndarray, pr: np.ndarray, her2: np.ndarray, ki67: np.ndarray) -> np.ndarray:
    hr = (er == "Positive") | (pr == "Positive")
    her2_pos = her2 == "Positive"
    return np.select(
        [hr & ~her2_pos & (ki67 < LUMINAL_A_KI67), hr, her2_pos],
        ["Luminal A", "Luminal B", "HER2(+)"],
        "Triple negative",
    ).astype(object)


def bcnb_table(p: pd.DataFrame) -> pd.DataFrame:
    """The clinical table as BCNB's ``patient-clinical-data.xlsx`` holds it (exact columns)."""
    receptors = p["receptors"].to_numpy().astype(str)
    er = np.where(np.char.startswith(receptors, "+"), "Positive", "Negative")
    pr = np.where(np.char.endswith(receptors, "+"), "Positive", "Negative")
    grade = [int(g) if g else None for g in p["grade"]]
    table = pd.DataFrame(
        {
            "Patient ID": p["patient_id"].astype(int),
            "Age(years)": np.clip(np.round(p["age_raw"]), *AGE_RANGE).astype(int),
            "Tumour Size(cm)": np.clip(np.round(p["size_raw"], 1), *SIZE_RANGE),
            "Tumour Type": p["tumour_type"],
            "ER": er,
            "PR": pr,
            "HER2": p["her2"],
            "HER2 Expression": p["her2_expression"],
            "Histological grading": pd.Series(grade, dtype=object),
            "Surgical": p["surgical"],
            "Ki67": p["ki67_text"],
            "Molecular subtype": _subtype(er, pr, p["her2"].to_numpy(), p["ki67"].to_numpy()),
            "Number of lymph node metastases": p["lymph_nodes"].astype(int),
            "ALN status": np.asarray(ALN_CLASSES, dtype=object)[p["aln"].to_numpy()],
        }
    )
    return table[BCNB_COLUMNS]


def latent_table(p: pd.DataFrame) -> pd.DataFrame:
    """``latent_risk.csv``: patient id, latent risk (log odds of N+), label, and its parts."""
    return pd.DataFrame(
        {
            "patient_id": p["patient_id"].astype(int),
            "latent_risk": p["latent_risk"].round(6),
            "label": p["label"].astype(int),
            "aln_status": np.asarray(ALN_CLASSES, dtype=object)[p["aln"].to_numpy()],
            "tissue_risk": p["tissue_risk"].round(6),
            "tumour_fraction": p["tumour_fraction"].round(6),
        }
    )


def split_targets(n: int, test_patients: int | None = None) -> np.ndarray:
    """Patients per split (train, val, test): BCNB's ratio 630/210/218, or ``test_patients`` in
    the test split and the rest in BCNB's 630:210 train:val ratio."""
    if test_patients is None:
        return class_counts(n, tuple(BCNB_SPLIT_COUNTS.values()))
    if not 0 < test_patients < n - 1:
        raise ValueError(f"demo.test_patients: {test_patients} leaves no training or validation patient of {n}")
    rest = class_counts(n - test_patients, (BCNB_SPLIT_COUNTS["train"], BCNB_SPLIT_COUNTS["val"]))
    return np.array([*rest, test_patients])


def official_split(p: pd.DataFrame, seed: int, test_patients: int | None = None) -> dict[str, list[int]]:
    """Patient ids per split (see :func:`split_targets`), stratified by ALN class: patients are
    ordered by class (random within class) and dealt to splits in an even interleave."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, TABLE_STREAM, 1]))
    order = np.lexsort((rng.random(len(p)), p["aln"].to_numpy()))
    names = list(BCNB_SPLIT_COUNTS)
    targets = split_targets(len(p), test_patients)
    dealt = np.zeros(len(names))
    split: dict[str, list[int]] = {name: [] for name in names}
    for k, idx in enumerate(order):
        s = int(np.argmax(targets * (k + 1) / len(p) - dealt))
        dealt[s] += 1
        split[names[s]].append(int(p["patient_id"].iloc[idx]))
    return {name: sorted(ids) for name, ids in split.items()}
