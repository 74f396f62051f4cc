"""What BD's distillation directions do (the S->M figure): linear CKA between the multi-modal
branch's slide feature ``f_wm`` and the single-modal one's ``f_ws`` per direction setting, S->M's
share of L_mul per epoch, and the single-modal branch's test probabilities with and without M->S."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.methods import DIRECTIONS
from bd.paper.plot import plt, save


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two feature sets of the same patients (rows): 1 when
    one is an orthogonal transform and rescaling of the other, near 0 when unrelated."""
    x = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
    y = np.asarray(y, np.float64) - np.asarray(y, np.float64).mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(x.T @ y) ** 2 / den) if den > 0 else float("nan")


def branch_similarity(run: Any, cohort: Any) -> dict[str, float]:
    """Linear CKA and mean cosine between BD's ``f_wm`` and ``f_ws`` over ``cohort``'s patients."""
    f_wm, f_ws = run.slide_embeddings(cohort, "multi"), run.slide_embeddings(cohort, "single")
    norms = np.linalg.norm(f_wm, axis=1) * np.linalg.norm(f_ws, axis=1)
    cosine = np.sum(f_wm * f_ws, axis=1) / np.where(norms > 0, norms, np.nan)
    return {"cka": linear_cka(f_wm, f_ws), "cosine": float(np.nanmean(cosine))}


def single_branch_probs(run: Any, cohort: Any) -> np.ndarray:
    """The single-modal branch's N+ probabilities (clinical data hidden for everyone)."""
    return run.predict(cohort, clinical_present=np.zeros(cohort.n_patients, bool))["prob"].to_numpy(float)


def s2m_figure(runs: Sequence[Any], curves: Sequence[pd.DataFrame], cohort: Any, out: Path) -> tuple[Path, pd.DataFrame]:
    """(a) CKA(f_wm, f_ws) per directions setting and seed; (b) S->M's share of L_mul per epoch;
    (c) single-modal test probabilities of each setting against ``none`` of the same seed."""
    rows = [{"directions": r.params.get("directions"), "seed": r.seed, **branch_similarity(r, cohort)} for r in runs]
    table = pd.DataFrame(rows)
    order = [d for d in DIRECTIONS if d in set(table["directions"])]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, d in enumerate(order):
        vals = table.loc[table["directions"] == d, "cka"]
        a.scatter(np.full(len(vals), i), vals, color="tab:red" if DIRECTIONS[d][1] else "grey")  # S->M on
        a.plot([i - 0.2, i + 0.2], [vals.mean()] * 2, color="k")
    a.set_xticks(range(len(order)), order)
    a.set_xlabel("directions")
    a.set_ylabel("linear CKA(f_wm, f_ws), test patients")
    a.set_title("(a) linear CKA(f_wm, f_ws) per directions setting", fontsize=9)
    for run, curve in zip(runs, curves):
        if "share_mul_distill" in curve:
            b.plot(curve["epoch"], curve["share_mul_distill"], label=f"{run.params.get('directions')} seed {run.seed}")
    b.set_ylim(0, 1)
    b.set_xlabel("epoch")
    b.set_ylabel("lambda_m * L_mul^f / L_mul")
    b.set_title("(b) S->M's share of the multi-modal loss", fontsize=9)
    b.legend(fontsize=7)
    base = {r.seed: single_branch_probs(r, cohort) for r in runs if r.params.get("directions") == "none"}
    for run in runs:
        d = run.params.get("directions")
        if d != "none" and run.seed in base:
            c.scatter(base[run.seed], single_branch_probs(run, cohort), s=10, label=f"{d} seed {run.seed}")
    c.plot([0, 1], [0, 1], color="k", lw=0.8)
    c.set_xlabel("single-modal P(N+), directions none")
    c.set_ylabel("single-modal P(N+), other setting")
    c.set_title("(c) single-modal outputs against directions none", fontsize=9)
    c.legend(fontsize=7)
    return save(fig, out), table
