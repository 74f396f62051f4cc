"""Matplotlib without a display (the Agg backend, set before pyplot loads), and one way to write a figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bd.io import atomic_path  # noqa: E402

__all__ = ["plt", "save"]


def save(fig: plt.Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write a figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
