"""Exports for viewers and further analysis: per-patch attention as a table and as QuPath GeoJSON,
tissue contours as QuPath annotations, and the scale bar drawn on heatmaps.

QuPath reads a GeoJSON FeatureCollection (File > Import objects from file) in level-0 pixel
coordinates with the origin at the image's top-left corner; each Feature's ``properties`` carry
``objectType`` (``annotation``, ``detection``, ``tile``, ...), an optional ``classification``
(``{"name": ..., "color": [r, g, b]}``) and ``measurements`` (name -> number), which QuPath shows
in its measurement tables and maps (Measure > Show measurement maps). Patches are exported as
``tile`` objects (or ``detection``) of class "Attention" with their attention as measurements;
tissue regions as ``annotation`` objects of class "Tissue", holes as polygon interiors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

ATTENTION_COLUMNS = ["slide_id", "x", "y", "patch_size_level0", "patch_size", "target_mpp", "attention",
                     "attention_norm", "attention_percentile"]
ATTENTION_CLASS = {"name": "Attention", "color": [255, 80, 0]}
TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 60]}
ObjectType = Literal["tile", "detection"]


def normalised(scores: np.ndarray) -> np.ndarray:
    """Attention min-max scaled to [0, 1] within the slide (all 1 when every patch has the same)."""
    scores = np.asarray(scores, float)
    if scores.size == 0:
        return scores
    span = float(scores.max() - scores.min())
    return np.ones_like(scores) if span <= 0 else (scores - scores.min()) / span


def percentile_scores(scores: np.ndarray) -> np.ndarray:
    """Attention as percentiles in [0, 1]: comparable across slides of different bag sizes."""
    scores = np.asarray(scores, float)
    if scores.size <= 1:
        return np.ones_like(scores)
    ranks = scores.argsort().argsort()
    return ranks / (scores.size - 1)


def attention_table(slide_id: str, coords: np.ndarray, attention: np.ndarray, side_level0: float,
                    patch_size: int | None = None, target_mpp: float | None = None) -> pd.DataFrame:
    """One row per patch: slide, level-0 top-left x, y, patch side (level 0 and as encoded), attention,
    min-max normalised attention and its percentile within the slide (the heatmap's colour)."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    attention = np.asarray(attention, float)
    return pd.DataFrame({
        "slide_id": str(slide_id), "x": coords[:, 0], "y": coords[:, 1],
        "patch_size_level0": float(side_level0), "patch_size": patch_size, "target_mpp": target_mpp,
        "attention": attention, "attention_norm": normalised(attention),
        "attention_percentile": percentile_scores(attention),
    }, columns=ATTENTION_COLUMNS)


def _square(x: float, y: float, side: float) -> list[list[list[float]]]:
    x1, y1 = x + side, y + side
    return [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def attention_geojson(table: pd.DataFrame, object_type: ObjectType = "tile",
                      properties: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attention table as a QuPath FeatureCollection: one square polygon per patch (level-0 pixels),
    object type ``tile`` or ``detection``, class "Attention", the attention values as measurements."""
    features = []
    for row in table.itertuples(index=False):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": _square(float(row.x), float(row.y),
                                                                   float(row.patch_size_level0))},
            "properties": {
                "objectType": object_type,
                "name": f"{row.slide_id} ({int(row.x)}, {int(row.y)})",
                "classification": dict(ATTENTION_CLASS),
                "isLocked": True,
                "measurements": {k: v for k in ("attention", "attention_norm", "attention_percentile")
                                 if (v := _number(getattr(row, k))) is not None},
            },
        })
    return {"type": "FeatureCollection", "features": features, **({"properties": properties} if properties else {})}


def tissue_annotation(properties: dict[str, Any]) -> dict[str, Any]:
    """The QuPath properties of a tissue region: an annotation of class "Tissue", keeping bd's own."""
    return {**properties, "objectType": "annotation", "classification": dict(TISSUE_CLASS), "isLocked": False}


def write_attention(out_dir: Path, stem: str, table: pd.DataFrame, object_type: ObjectType = "tile") -> list[Path]:
    """``<stem>.attention.tsv`` and ``<stem>.attention.geojson`` in ``out_dir`` (atomically)."""
    from bd.io import atomic_path, write_json

    tsv, geo = out_dir / f"{stem}.attention.tsv", out_dir / f"{stem}.attention.geojson"
    with atomic_path(tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    write_json(geo, attention_geojson(table, object_type))
    return [tsv, geo]


# ---------------------------------------------------------------- scale bar

NICE_STEPS = (1.0, 2.0, 5.0)


def scale_bar(um_per_px: float, image_width_px: int, fraction: float = 0.25) -> tuple[float, float]:
    """A scale bar for an image at ``um_per_px``: (length in µm, length in image pixels), the length a
    1-2-5 number of µm no longer than ``fraction`` of the image width."""
    if not um_per_px or um_per_px <= 0 or image_width_px <= 0:
        raise ValueError(f"scale bar needs a positive pixel size and width (got {um_per_px}, {image_width_px})")
    target = fraction * image_width_px * um_per_px
    exponent = math.floor(math.log10(target))
    length = max(s * 10**exponent for s in NICE_STEPS if s * 10**exponent <= target)
    return float(length), float(length / um_per_px)


def scale_label(length_um: float) -> str:
    return f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"


def draw_scale_bar(ax: Any, um_per_px: float, image_shape: Sequence[int]) -> tuple[float, float]:
    """Draw a scale bar in the lower left of an ``imshow`` axis; returns (µm, pixels) as drawn."""
    from matplotlib.patches import Rectangle

    height, width = int(image_shape[0]), int(image_shape[1])
    length_um, length_px = scale_bar(um_per_px, width)
    x0, y0 = 0.04 * width, 0.94 * height
    bar_h = max(2.0, 0.012 * height)
    ax.add_patch(Rectangle((x0 - 3, y0 - bar_h - 0.06 * height), length_px + 6, bar_h + 0.075 * height,
                           facecolor="white", alpha=0.7, edgecolor="none"))
    ax.add_patch(Rectangle((x0, y0 - bar_h), length_px, bar_h, facecolor="black", edgecolor="none"))
    ax.text(x0 + length_px / 2, y0 - bar_h - 0.01 * height, scale_label(length_um), ha="center", va="bottom",
            fontsize=7)
    return length_um, length_px
