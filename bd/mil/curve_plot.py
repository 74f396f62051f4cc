"""The training-curve figure (``curve.png``) of a run: one panel per group of series.

BD logs nine loss series (L_mul and L_sgl with their terms), five loss shares and five validation
series per epoch; drawn in three panels a stage they crowded under overlapping legends. Here each
row of panels holds one group, with at most five series: the total loss, the multi-modal branch
(L_mul, its CE and S->M terms), the single-modal branch (L_sgl, CE, MSE, KL), each term's share of
its branch's loss, the validation scores on [0, 1] (AUC, tuned F1, probability sd) and the
validation log loss on its own scale. Stages (two-stage methods) are columns; each row has one
legend, outside the panels to their right, so no legend covers a curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bd.io import atomic_path

BRANCHES = {"mul": "multi-modal branch L_mul", "sgl": "single-modal branch L_sgl"}
VALIDATION_SCORES = ("val_auc", "val_f1", "val_prob_sd", "trainset_f1_05")
VALIDATION_LOSS = ("val_loss",)


def _present(curve: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if k in curve.columns and curve[k].notna().any()]


def curve_panels(curve: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Rows of the figure: (title, columns of ``curve``), each a group of comparable series."""
    losses = _present(curve, [c for c in curve.columns if c.startswith("train_")])
    rows: list[tuple[str, list[str]]] = []
    by_branch = {b: [k for k in losses if k.removeprefix("train_").split("_")[0] == b] for b in BRANCHES}
    others = [k for k in losses if not any(k in keys for keys in by_branch.values())]
    if others:
        rows.append(("training loss", others))
    rows += [(f"{BRANCHES[b]}: terms", keys) for b, keys in by_branch.items() if keys]
    shares = _present(curve, [c for c in curve.columns if c.startswith("share_")])
    if shares:
        rows.append(("share of the branch loss", shares))
    scores = _present(curve, list(VALIDATION_SCORES))
    if scores:
        rows.append(("validation", scores))
    vloss = _present(curve, list(VALIDATION_LOSS))
    if vloss:
        rows.append(("validation log loss", vloss))
    return rows


def _label(key: str) -> str:
    return key.removeprefix("train_").removeprefix("share_")


def plot_curve(curve: pd.DataFrame, stage_epochs: dict[str, int], path: Path, title: str) -> None:
    """Write the curve figure: rows from :func:`curve_panels`, one column per training stage,
    the kept epoch dashed in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(curve["stage"]))
    panels = curve_panels(curve)
    fig, axes = plt.subplots(len(panels), len(stages), figsize=(4.2 * len(stages) + 2.4, 2.1 * len(panels) + 0.6),
                             squeeze=False, sharex="col")
    for col, stage in enumerate(stages):
        rows = curve[curve["stage"] == stage]
        for row, (name, keys) in enumerate(panels):
            ax = axes[row, col]
            for key in keys:
                ax.plot(rows["epoch"], rows[key], label=_label(key),
                        lw=2 if key in ("train_loss", "train_mul", "train_sgl", "val_auc") else 1.2)
            ax.axvline(stage_epochs.get(stage, np.nan), color="k", ls="--", lw=0.8, label="kept epoch")
            if name.startswith(("share", "validation")) and name != "validation log loss":
                ax.set_ylim(0, 1)
            ax.set_title(f"{stage}: {name}" if len(stages) > 1 else name, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        axes[-1, col].set_xlabel("epoch")
    for row in range(len(panels)):
        handles, labels = axes[row, -1].get_legend_handles_labels()
        axes[row, -1].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
                             frameon=False)
    kept = ", ".join(f"{s} {e}" for s, e in stage_epochs.items())
    fig.suptitle(f"{title} (kept epoch: {kept})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=70, format="png")  # legible at 70 dpi; 42 curves fit the 15 MB report
    plt.close(fig)
