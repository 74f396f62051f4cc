"""Render one synthetic H&E core-needle-biopsy slide: tissue strips, nuclei, tumour-like regions
and artefacts (pen mark, dust, a blurred patch), as an RGB array plus its ground truth.

Everything is planned on a coarse grid (about 512 px on the long side) and drawn at full
resolution only where it must be: region masks are upsampled, nuclei are cv2 ellipses, and the
colour comes from a Beer-Lambert stain model (optical densities of haematoxylin, eosin, glass
and ink add; RGB = 255 * exp(-OD)), which gives H&E colours that mix like real stains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

# Optical density per unit concentration (RGB), from the colour each gives at unit concentration.
GLASS_OD = -np.log(np.array([232.0, 230.0, 236.0]) / 255.0)
EOSIN_OD = -np.log(np.array([236.0, 138.0, 186.0]) / 255.0)
HAEMATOXYLIN_OD = -np.log(np.array([68.0, 40.0, 122.0]) / 255.0)
INK_OD = {
    "green": -np.log(np.array([40.0, 140.0, 90.0]) / 255.0),
    "blue": -np.log(np.array([45.0, 70.0, 175.0]) / 255.0),
    "black": -np.log(np.array([45.0, 45.0, 55.0]) / 255.0),
}
CONC_SCALE = 100.0  # stain maps are uint8: value v is concentration v / CONC_SCALE
PLAN_SIDE = 512  # long side of the planning grid
BACKGROUND, STROMA_LABEL, TUMOUR_LABEL = 0, 1, 2


@dataclass(frozen=True)
class Morphology:
    """Nuclei of one tissue compartment: size in microns (converted with the slide's MPP),
    haematoxylin concentration (uint8 units) and whether the chromatin is vesicular (pale
    centre, dark rim) as in tumour cells."""

    area_per_nucleus_um2: float
    radius_um: tuple[float, float]
    elongation: tuple[float, float]
    stain: tuple[int, int]
    vesicular: bool = False
    aligned: bool = False  # long axis along the fibres (the cores run left to right)


STROMA = Morphology(area_per_nucleus_um2=900.0, radius_um=(1.8, 2.8), elongation=(1.8, 3.5), stain=(60, 85),
                    aligned=True)
LYMPHOCYTES = Morphology(area_per_nucleus_um2=2500.0, radius_um=(2.4, 3.2), elongation=(1.0, 1.2), stain=(90, 115))
TUMOUR = Morphology(area_per_nucleus_um2=170.0, radius_um=(3.2, 5.2), elongation=(1.0, 1.6), stain=(70, 110),
                    vesicular=True)


@dataclass
class RenderedSlide:
    """A rendered slide (RGB, level 0) with its ground truth in level-0 pixel coordinates."""

    rgb: np.ndarray
    tumour_polygons: list[list[list[int]]]
    tissue_polygons: list[list[list[int]]]
    artefacts: dict[str, Any] = field(default_factory=dict)
    tumour_fraction: float = 0.0


def slide_shape(slide_size: int) -> tuple[int, int]:
    """(height, width) of a demo slide whose longer side is ``slide_size`` (landscape, 4:3)."""
    return int(round(slide_size * 0.75)), int(slide_size)


def render_slide(slide_size: int, mpp: float, tumour_fraction: float, rng: np.random.Generator) -> RenderedSlide:
    """Draw one slide; ``tumour_fraction`` is the share of tissue with tumour-like morphology."""
    height, width = slide_shape(slide_size)
    scale = max(1, int(round(max(height, width) / PLAN_SIDE)))
    plan_hw = (math.ceil(height / scale), math.ceil(width / scale))
    tissue_lo = _tissue_plan(plan_hw, rng)
    tumour_lo = _tumour_plan(tissue_lo, tumour_fraction, rng)
    label = _label_map(tissue_lo, tumour_lo, (height, width))
    grain = _grain_tile(rng)
    stain_h, stain_e = rng.uniform(0.85, 1.15, 2)  # slide-to-slide staining variation
    rgb = cv2.multiply(
        _transmit(_haematoxylin(label, mpp, grain, rng), HAEMATOXYLIN_OD * stain_h),
        _transmit(_eosin(label, plan_hw, rng), EOSIN_OD * stain_e),
        scale=1 / 255,
    )
    rgb = cv2.multiply(rgb, _glass(label.shape, grain, rng), scale=1 / 255)
    pen = _pen_mark(rgb, rng)
    dust = _dust(rgb, mpp, rng)
    blur = _blur_patch(rgb, tissue_lo, scale, mpp, rng)
    area = max(int(tissue_lo.sum()), 1)
    return RenderedSlide(
        rgb=rgb,
        tumour_polygons=_polygons(tumour_lo, scale),
        tissue_polygons=_polygons(tissue_lo, scale),
        artefacts={"pen": pen, "dust": dust, "blur": blur},
        tumour_fraction=float(tumour_lo.sum() / area),
    )


# --- planning grid --------------------------------------------------------------------------


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian noise smoothed at ``sigma`` pixels."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _tissue_plan(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-4 elongated, gently curved, sometimes broken strips (needle cores) with ragged edges
    and a few holes, in the band below the top margin (the margin is left for the pen mark)."""
    h, w = hw
    mask = np.zeros(hw, np.uint8)
    n_strips = int(rng.integers(2, 5))
    centres = np.linspace(0.34, 0.80, n_strips) if n_strips > 1 else np.array([0.55])
    for yc in centres + rng.uniform(-0.03, 0.03, n_strips):
        _draw_strip(mask, yc * h, rng)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.2)
    ragged = soft + 0.22 * _smooth_noise(hw, 1.5, rng)
    near = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3.0) > 0.1
    tissue = ((ragged > 0.5) & near).astype(np.uint8)
    strip_px = max(2.0, 0.09 * h)
    for _ in range(int(rng.integers(1, 7))):
        ys, xs = np.nonzero(tissue)
        if len(xs) == 0:
            break
        k = int(rng.integers(len(xs)))
        axes = tuple(int(max(1, a)) for a in rng.uniform(0.08, 0.22, 2) * strip_px)
        cv2.ellipse(tissue, (int(xs[k]), int(ys[k])), axes, float(rng.uniform(0, 180)), 0, 360, 0, -1)
    return tissue.astype(bool)


def _draw_strip(mask: np.ndarray, yc: float, rng: np.random.Generator) -> None:
    h, w = mask.shape
    x0, x1 = rng.uniform(0.05, 0.2) * w, rng.uniform(0.78, 0.95) * w
    xs = np.linspace(x0, x1, 96)
    u = (xs - x0) / (x1 - x0)
    bend = rng.uniform(-0.025, 0.025) * h * np.sin(np.pi * u * rng.uniform(0.8, 2.0) + rng.uniform(0, np.pi))
    ys = yc + bend + rng.uniform(-0.04, 0.04) * h * (u - 0.5)
    taper = np.clip(np.sqrt(np.clip(1 - (2 * u - 1) ** 6, 0, 1)), 0.25, 1)
    half = 0.5 * rng.uniform(0.07, 0.11) * h * taper * (1 + 0.15 * np.sin(2 * np.pi * u * rng.uniform(1, 3)))
    keep = np.ones_like(u, bool)
    if rng.random() < 0.5:  # a broken core: a gap somewhere along it
        g = rng.uniform(0.3, 0.7)
        keep = np.abs(u - g) > rng.uniform(0.01, 0.03)
    for part in np.split(np.arange(len(u)), np.flatnonzero(np.diff(keep.astype(int))) + 1):
        part = part[keep[part]]
        if len(part) < 2:
            continue
        top = np.stack([xs[part], ys[part] - half[part]], 1)
        bottom = np.stack([xs[part], ys[part] + half[part]], 1)[::-1]
        cv2.fillPoly(mask, [np.round(np.concatenate([top, bottom])).astype(np.int32)], 1)


def _tumour_plan(tissue: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Irregular blobs (tumour nests) inside the tissue until they cover ``fraction`` of it."""
    tumour = np.zeros(tissue.shape, np.uint8)
    ys, xs = np.nonzero(tissue)
    area = len(xs)
    if area == 0 or fraction <= 0:
        return tumour.astype(bool)
    strip_px = 0.09 * tissue.shape[0]
    for _ in range(400):
        k = int(rng.integers(area))
        axes = tuple(int(max(1, a)) for a in rng.uniform(0.25, 0.9, 2) * strip_px)
        cv2.ellipse(tumour, (int(xs[k]), int(ys[k])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if (tumour[ys, xs] > 0).mean() >= fraction:
            break
    ragged = cv2.GaussianBlur(tumour.astype(np.float32), (0, 0), 1.0) + 0.25 * _smooth_noise(tissue.shape, 1.2, rng)
    return (ragged > 0.5) & tissue


def _polygons(mask: np.ndarray, scale: int) -> list[list[list[int]]]:
    """Outer contours of a planning mask as level-0 polygons (vertex lists)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2)
        if len(c) >= 3:
            polys.append((np.round((c + 0.5) * scale)).astype(int).tolist())
    return polys


# --- full-resolution drawing ----------------------------------------------------------------


def _label_map(tissue_lo: np.ndarray, tumour_lo: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Level-0 uint8 map: 0 background, 1 stroma, 2 tumour; planning masks are smoothed before
    upsampling so that the outlines are curves, not staircases."""
    def up(mask: np.ndarray) -> np.ndarray:
        soft = cv2.GaussianBlur(mask.astype(np.float32) * 255, (0, 0), 0.8).astype(np.uint8)
        big = cv2.resize(soft, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        return cv2.threshold(big, 127, 1, cv2.THRESH_BINARY)[1]

    tissue = up(tissue_lo)
    return cv2.add(tissue, cv2.multiply(up(tumour_lo), tissue))


def _grain_tile(rng: np.random.Generator) -> np.ndarray:
    """A 256 px tile of fine noise (uint8 around 128), repeated over the slide where needed."""
    return np.clip(128 + 22 * rng.standard_normal((256, 256)), 0, 255).astype(np.uint8)


def _tiled(tile: np.ndarray, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    th, tw = tile.shape
    tile = np.roll(tile, (int(rng.integers(th)), int(rng.integers(tw))), axis=(0, 1))
    return cv2.repeat(tile, math.ceil(hw[0] / th), math.ceil(hw[1] / tw))[: hw[0], : hw[1]]


def _transmit(conc: np.ndarray, od: np.ndarray, unit: float = CONC_SCALE) -> np.ndarray:
    """RGB transmittance (uint8, 255 = clear) of a stain at concentration map ``conc``."""
    values = np.arange(256, dtype=np.float64)[:, None] / unit
    lut = np.clip(np.round(255.0 * np.exp(-values * od[None, :])), 0, 255).astype(np.uint8)
    return cv2.merge([cv2.LUT(conc, lut[:, c].copy()) for c in range(3)])


def _eosin(label: np.ndarray, plan_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Eosin: pink stroma with patchy intensity and fibres along the cores; paler in tumour."""
    h, w = label.shape
    mid = (max(8, h // 4), max(8, w // 4))
    fibres = cv2.GaussianBlur(rng.standard_normal(mid).astype(np.float32), (0, 0), sigmaX=6.0, sigmaY=0.8)
    patchy = cv2.resize(_smooth_noise(plan_hw, 6.0, rng), (mid[1], mid[0]), interpolation=cv2.INTER_LINEAR)
    texture = 75.0 + 9.0 * patchy + 12.0 * fibres / (fibres.std() + 1e-6)
    texture = cv2.resize(np.clip(texture, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    share = cv2.LUT(label, _label_lut(0, 255, 140))
    return cv2.multiply(texture, share, scale=1 / 255)


def _label_lut(background: int, stroma: int, tumour: int) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    lut[[BACKGROUND, STROMA_LABEL, TUMOUR_LABEL]] = background, stroma, tumour
    return lut


def _haematoxylin(label: np.ndarray, mpp: float, grain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Haematoxylin: a faint wash over tissue, purple cytoplasm in tumour, and the nuclei."""
    nuclei = np.zeros(label.shape, np.uint8)
    _draw_nuclei(nuclei, label == STROMA_LABEL, STROMA, mpp, rng)
    _draw_nuclei(nuclei, label == STROMA_LABEL, LYMPHOCYTES, mpp, rng)
    _draw_nuclei(nuclei, label == TUMOUR_LABEL, TUMOUR, mpp, rng)
    nuclei = cv2.GaussianBlur(nuclei, (0, 0), 0.7)
    nuclei = cv2.multiply(nuclei, _tiled(grain, label.shape, rng), scale=1 / 128)  # chromatin
    return cv2.add(cv2.LUT(label, _label_lut(0, 6, 28)), nuclei)


def _draw_nuclei(canvas: np.ndarray, region: np.ndarray, kind: Morphology, mpp: float,
                 rng: np.random.Generator) -> None:
    """Scatter nuclei of ``kind`` over ``region`` (a Poisson process) as filled ellipses."""
    h, w = region.shape
    n = int(rng.poisson(mpp * mpp / kind.area_per_nucleus_um2 * h * w))
    xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
    keep = region[ys, xs]
    xs, ys = xs[keep], ys[keep]
    m = len(xs)
    minor = np.maximum(1, np.round(rng.uniform(*kind.radius_um, m) / mpp)).astype(int)
    major = np.maximum(minor, np.round(minor * rng.uniform(*kind.elongation, m))).astype(int)
    angle = rng.normal(0, 20, m) if kind.aligned else rng.uniform(0, 180, m)
    stain = rng.integers(kind.stain[0], kind.stain[1] + 1, m)
    for x, y, a, b, t, s in zip(xs.tolist(), ys.tolist(), major.tolist(), minor.tolist(), angle.tolist(), stain.tolist()):
        if kind.vesicular:
            cv2.ellipse(canvas, (x, y), (a, b), t, 0, 360, int(s * 0.7), -1)
            cv2.ellipse(canvas, (x, y), (a, b), t, 0, 360, s, 2)
        else:
            cv2.ellipse(canvas, (x, y), (a, b), t, 0, 360, s, -1)


def _glass(hw: tuple[int, int], grain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Transmittance of glass and mounting medium: light grey, uneven illumination, sensor grain."""
    light = cv2.resize(np.clip(128 + 12 * _smooth_noise((6, 8), 1.2, rng), 0, 255).astype(np.uint8),
                       (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)
    lum = cv2.addWeighted(light, 1.0, _tiled(grain, hw, rng), 0.25, -32.0)
    values = (np.arange(256, dtype=np.float64)[:, None] - 128.0) * 0.0015
    lut = np.clip(np.round(255.0 * np.exp(-(GLASS_OD[None, :] + values))), 0, 255).astype(np.uint8)
    return cv2.merge([cv2.LUT(lum, lut[:, c].copy()) for c in range(3)])


def _pen_mark(rgb: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """A marker stroke in the top margin (away from the tissue), as pathologists draw."""
    h, w = rgb.shape[:2]
    colour = str(rng.choice(list(INK_OD)))
    u = np.linspace(0, 1, 24)
    xs = rng.uniform(0.1, 0.5) * w + u * rng.uniform(0.2, 0.4) * w
    ys = (rng.uniform(0.08, 0.13) + 0.03 * np.sin(np.pi * u * rng.uniform(1, 2.5))) * h
    path = np.round(np.stack([xs, ys], 1)).astype(np.int32)
    width = max(3, int(0.012 * max(h, w)))
    x0, y0 = np.maximum(path.min(0) - width, 0)
    x1, y1 = np.minimum(path.max(0) + width + 1, (w, h))
    ink = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.polylines(ink, [path - (x0, y0)], False, 255, width, cv2.LINE_AA)
    ink = cv2.GaussianBlur(ink, (0, 0), max(1.0, width / 6))
    ink = cv2.multiply(ink, np.clip(rng.normal(220, 25, ink.shape), 0, 255).astype(np.uint8), scale=1 / 255)
    rgb[y0:y1, x0:x1] = cv2.multiply(rgb[y0:y1, x0:x1], _transmit(ink, INK_OD[colour], unit=255.0), scale=1 / 255)
    return {"colour": colour, "path": path.tolist(), "width": width,
            "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]}


def _dust(rgb: np.ndarray, mpp: float, rng: np.random.Generator) -> list[dict[str, int]]:
    """Small grey-black specks anywhere on the slide."""
    h, w = rgb.shape[:2]
    specks = []
    for _ in range(int(rng.integers(8, 25))):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        r = int(max(1, rng.uniform(1.5, 8.0) / mpp))
        x0, y0, x1, y1 = max(0, x - r - 2), max(0, y - r - 2), min(w, x + r + 3), min(h, y + r + 3)
        od = np.zeros((y1 - y0, x1 - x0), np.float32)
        cv2.ellipse(od, (x - x0, y - y0), (r, max(1, int(r * rng.uniform(0.4, 1.0)))), float(rng.uniform(0, 180)),
                    0, 360, float(rng.uniform(0.5, 1.4)), -1)
        od = cv2.GaussianBlur(od, (0, 0), 0.8)
        rgb[y0:y1, x0:x1] = (rgb[y0:y1, x0:x1] * np.exp(-od)[..., None]).astype(np.uint8)
        specks.append({"x": x, "y": y, "r": r})
    return specks


def _blur_patch(rgb: np.ndarray, tissue_lo: np.ndarray, scale: int, mpp: float,
                rng: np.random.Generator) -> dict[str, Any]:
    """An out-of-focus rectangle over the tissue, feathered into its surroundings (in place)."""
    h, w = rgb.shape[:2]
    ys, xs = np.nonzero(tissue_lo)
    k = int(rng.integers(len(xs))) if len(xs) else 0
    cx, cy = (int(xs[k] * scale), int(ys[k] * scale)) if len(xs) else (w // 2, h // 2)
    bw, bh = int(rng.uniform(0.08, 0.15) * w), int(rng.uniform(0.10, 0.18) * h)
    x0, y0 = int(np.clip(cx - bw // 2, 0, w - bw)), int(np.clip(cy - bh // 2, 0, h - bh))
    crop = rgb[y0:y0 + bh, x0:x0 + bw]
    sigma = rng.uniform(2.0, 3.5) / mpp
    blurred = cv2.GaussianBlur(crop, (0, 0), sigma)
    alpha = np.zeros((bh, bw), np.float32)
    edge = max(2, min(bh, bw) // 6)
    alpha[edge:-edge, edge:-edge] = 1.0
    alpha = cv2.GaussianBlur(alpha, (0, 0), edge / 2)[..., None]
    crop[:] = (alpha * blurred + (1 - alpha) * crop).astype(np.uint8)
    return {"x": x0, "y": y0, "w": bw, "h": bh, "sigma_px": round(float(sigma), 2)}
