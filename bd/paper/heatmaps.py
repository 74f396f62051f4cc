"""Attention heatmaps over slide thumbnails: each patch tinted by its attention percentile. Used by
``bd figures heatmaps`` (a few test patients of a trained run) and by ``bd predict`` (a new slide)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from bd.errors import BDError
from bd.exports import percentile_scores  # the heatmap colours (the attention exports share them)
from bd.paper.plot import plt, save


def attention_overlay(
    thumbnail: np.ndarray, coords: np.ndarray, side_level0: float, scores: np.ndarray,
    slide_size: tuple[int, int], alpha: float = 0.5, cmap: str = "jet",
) -> np.ndarray:
    """The thumbnail with each patch tinted by its score (0-1), blended at ``alpha``."""
    h, w = thumbnail.shape[:2]
    sx, sy = w / slide_size[0], h / slide_size[1]
    heat = np.full((h, w), np.nan)
    for (x, y), v in zip(np.asarray(coords), np.asarray(scores, float)):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int(np.ceil((x + side_level0) * sx))), max(y0 + 1, int(np.ceil((y + side_level0) * sy)))
        region = heat[y0:y1, x0:x1]
        heat[y0:y1, x0:x1] = np.fmax(region, v)
    rgb = thumbnail[..., :3].astype(float) / 255.0
    covered = np.isfinite(heat)
    colors = plt.get_cmap(cmap)(np.nan_to_num(heat))[..., :3]
    rgb[covered] = (1 - alpha) * rgb[covered] + alpha * colors[covered]
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def heatmap_figure(
    thumbnail: np.ndarray, overlay: np.ndarray, title: str, out: Path, cmap: str = "jet",
    um_per_px: float | None = None,
) -> Path:
    """Thumbnail and attention overlay side by side, with a colour bar of attention percentiles and,
    given the thumbnail's microns per pixel, a scale bar on both."""
    from bd.exports import draw_scale_bar

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    axes[0].imshow(thumbnail)
    axes[0].set_title("slide", fontsize=9)
    im = axes[1].imshow(overlay)
    axes[1].set_title("attention (percentile)", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
        if um_per_px:
            draw_scale_bar(ax, um_per_px, thumbnail.shape)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 1))
    fig.colorbar(sm, ax=axes[1], fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=10)
    del im
    return save(fig, out)


def patch_side_level0(attrs: dict[str, Any]) -> float:
    """Side of a patch in level-0 pixels from a feature store's attributes."""
    if attrs.get("patch_size_level0"):
        return float(attrs["patch_size_level0"])
    try:
        return float(attrs["patch_size"]) * float(attrs["target_mpp"]) / float(attrs["mpp"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise BDError(f"feature store attributes give no patch size in level-0 pixels ({exc})") from exc


def render_slide_heatmap(
    slide_path: str | Path, coords: np.ndarray, side_level0: float, attention: np.ndarray,
    title: str, out: Path, max_thumbnail: int = 1024, fallback_mpp: float | None = None,
) -> Path:
    """Attention of one slide's patches over its thumbnail, written as a PNG."""
    from bd.slides.slide import open_slide

    with open_slide(slide_path, fallback_mpp=fallback_mpp) as slide:
        thumb = slide.get_thumbnail((max_thumbnail, max_thumbnail))
        size, mpp = slide.dimensions, float(slide.mpp)
    overlay = attention_overlay(thumb, coords, side_level0, percentile_scores(attention), size)
    return heatmap_figure(thumb, overlay, title, out, um_per_px=thumbnail_um_per_px(mpp, size, thumb.shape))


def thumbnail_um_per_px(mpp: float, level0_size: Sequence[int], thumb_shape: Sequence[int]) -> float:
    """Microns per thumbnail pixel: the slide's level-0 MPP times the thumbnail's downsample (x)."""
    return float(mpp) * float(level0_size[0]) / float(thumb_shape[1])


def choose_patients(ids: Sequence[str], labels: np.ndarray, n: int) -> list[str]:
    """``n`` test patients, half N+ and half N0 where possible, in sorted id order (reproducible)."""
    ids = np.asarray([str(i) for i in ids])
    order = np.argsort(ids, kind="stable")
    pos = [ids[i] for i in order if labels[i] == 1]
    neg = [ids[i] for i in order if labels[i] == 0]
    n_pos = min(len(pos), (n + 1) // 2)
    n_neg = min(len(neg), n - n_pos)
    n_pos = min(len(pos), n - n_neg)
    return pos[:n_pos] + neg[:n_neg]


def write_heatmaps(run: Any, cohort: Any, patient: str, samples: pd.DataFrame, features: Path,
                   out_dir: Path, fallback_mpp: float | None = None) -> list[Path]:
    """One attention heatmap PNG per slide of ``patient`` (``<patient>_<slide>.png``), with its patches'
    attention as a table and as QuPath GeoJSON (``<patient>_<slide>.attention.tsv`` / ``.geojson``);
    ``features`` is the feature index or a folder of stores."""
    from bd.exports import attention_table, write_attention
    from bd.features.store import read_store, store_paths

    att = run.attention(cohort, patient)
    i = cohort.index(patient)
    label = {0: "N0", 1: "N+"}.get(int(cohort.labels[i]), "?")
    out = []
    for sid, part in att.groupby("slide_id", sort=False):
        attrs = read_store(store_paths(features, [sid])[sid], with_features=False).attrs
        out.append(render_slide_heatmap(
            samples.loc[sid, "path"], part[["x", "y"]].to_numpy(), patch_side_level0(attrs),
            part["attention"].to_numpy(), f"patient {patient} ({label}), slide {sid}",
            out_dir / f"{patient}_{sid}.png", fallback_mpp=fallback_mpp))
        write_attention(out_dir, f"{patient}_{sid}", attention_table(
            sid, part[["x", "y"]].to_numpy(), part["attention"].to_numpy(), patch_side_level0(attrs),
            attrs.get("patch_size"), attrs.get("target_mpp")))
    return out
