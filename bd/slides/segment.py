"""Tissue segmentation of one slide on a low-resolution level: mask, contours and a QC thumbnail.

The slide is read at about ``downsample`` x (32 by default; a pyramid level is used when one is
close, otherwise the nearest finer level is resized, as for flat JPEGs). Tissue is what is
saturated: HSV saturation, median blur, Otsu (or a fixed value, never below ``min_saturation``).
A slide without colour (a greyscale scan, expanded to RGB by ``bd.slides.slide``) has no saturation to
threshold; its tissue is what is dark instead (255 - HSV value, same blur, Otsu and floor), and
``mask.json`` says which channel was used.
Pen marks (hue bands of green and blue ink, dark unsaturated black ink) and dark debris are cut
out, the mask is closed, and components and holes are filtered by area in square microns, so one
setting holds at 20x and 40x. Contours (with holes) come from the final mask, so mask and GeoJSON
agree exactly. The mask's scale relative to level 0 is stored in ``mask.json`` for tiling, and
the pen-ink and debris pixels in ``artefacts.png`` (same size), so that tiling can drop patches
that hold them (``tiling.max_artefact_fraction``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from bd import params as params_mod
from bd.params import param
from bd.errors import BDError, ConfigError, SlideError, environment_reason, slide_fault
from bd.io import write_json

from bd.slides.qc_draw import caption, error_image, fit, legend, mark, write_png

log = logging.getLogger(__name__)

COLOURLESS_SATURATION = 8.0  # 99.9th percentile of saturation below this: a greyscale slide


# Pen inks as HSV rules (OpenCV ranges: H 0-179, S and V 0-255). H&E lies at H 120-179 and 0-10
# (purple to pink); green and blue inks sit well away from it, and black ink is dark but, unlike
# dense nuclei, not saturated.
PenRule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
PEN_COLORS: dict[str, PenRule] = {
    "green": lambda h, s, v: (h >= 35) & (h < 95) & (s >= 60),
    "blue": lambda h, s, v: (h >= 95) & (h < 125) & (s >= 140),
    "black": lambda h, s, v: (v < 70) & (s < 130),
}


@dataclass
class SegmentParams:
    """Tissue segmentation of each slide (`bd segment`)."""

    downsample: float = param(32.0, minimum=1, description="target downsample of the segmentation level (about 32-64)")
    min_size: int = param(512, minimum=16,
                          description="small slides are segmented finer, so that the mask's longer side has this many px")
    threshold: Literal["otsu"] | float = param("otsu", minimum=0, maximum=255,
                                               description="otsu, or a fixed saturation value 0-255")
    min_saturation: float = param(20.0, minimum=0, maximum=255,
                                  description="floor on the threshold: a blank slide stays blank")
    median_blur: int = param(7, minimum=1, description="median blur, px at the segmentation level (odd)")
    close_kernel: int = param(5, minimum=0, description="morphological closing, px at the segmentation level; 0: none")
    min_tissue_area_um2: float = param(20000.0, minimum=0, description="smaller tissue components are dropped (um^2)")
    min_hole_area_um2: float = param(5000.0, minimum=0, description="smaller holes in the tissue are filled (um^2)")
    pen_colors: list[str] = param(default_factory=lambda: ["green", "blue", "black"], choices=PEN_COLORS,
                                  unique_items=True, description="pen inks cut out of the mask")
    dark_value: int = param(30, minimum=0, maximum=255,
                            description="HSV value below which any pixel is debris, whatever its colour")
    artefact_dilate: int = param(1, minimum=0, description="px grown around pen and debris pixels (ink halos)")

    def __post_init__(self) -> None:
        params_mod.check(self)
        if self.median_blur % 2 == 0:
            raise ConfigError(f"segmentation.median_blur: {self.median_blur} must be an odd number >= 1")


@dataclass
class Segmentation:
    """A tissue mask at the segmentation level and what is needed to map it to level 0."""

    mask: np.ndarray  # (h, w) uint8, 0 or 255
    artefacts: np.ndarray  # (h, w) uint8, 255 where pen ink or debris was found
    image: np.ndarray  # (h, w, 3) uint8 RGB at the segmentation level (for QC)
    scale: tuple[float, float]  # level-0 pixels per mask pixel along x and y
    level0_size: tuple[int, int]  # (width, height)
    mpp: float
    polygons: list[list[np.ndarray]]  # per component: [outer, *holes], (k, 2) level-0 float x, y
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tissue_fraction(self) -> float:
        return float(np.count_nonzero(self.mask)) / max(self.mask.size, 1)


def artefact_mask(hsv: np.ndarray, params: SegmentParams, colour: bool = True) -> np.ndarray:
    """Pixels of pen ink and dark debris (bool), cleaned of isolated pixels and grown a little;
    on a slide without colour only the darkness rule applies (ink hues cannot be told apart)."""
    h, s, v = (hsv[..., i].astype(np.int16) for i in range(3))
    marks = v < params.dark_value
    for name in params.pen_colors if colour else ():
        marks |= PEN_COLORS[name](h, s, v)
    marks = cv2.medianBlur(marks.astype(np.uint8) * 255, 3)
    if params.artefact_dilate > 0:
        size = 2 * params.artefact_dilate + 1
        marks = cv2.dilate(marks, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    return marks > 0


def saturation_threshold(saturation: np.ndarray, params: SegmentParams) -> float:
    """Otsu's threshold of the (blurred) saturation, or the fixed one; never below the floor."""
    if params.threshold == "otsu":
        value, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        value = float(params.threshold)
    return max(float(value), params.min_saturation)


def _remove_small_components(mask: np.ndarray, min_area_px: float, connectivity: int) -> np.ndarray:
    """Zero the connected components of ``mask`` smaller than ``min_area_px`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=connectivity)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return np.where(keep[labels], 255, 0).astype(np.uint8)


def _fill_small_holes(mask: np.ndarray, min_hole_px: float) -> np.ndarray:
    """Fill background components enclosed by tissue and smaller than ``min_hole_px``."""
    background = (mask == 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = stats[:, cv2.CC_STAT_AREA] < min_hole_px
    small[border] = False
    small[0] = False  # label 0 is tissue in the background image
    out = mask.copy()
    out[small[labels]] = 255
    return out


def tissue_channel(hsv: np.ndarray) -> tuple[np.ndarray, str]:
    """What tissue is brighter in: saturation, or darkness (255 - value) on a colourless slide."""
    saturation = np.ascontiguousarray(hsv[..., 1])
    if saturation.size and np.percentile(saturation, 99.9) < COLOURLESS_SATURATION:
        return np.ascontiguousarray(255 - hsv[..., 2]), "darkness"
    return saturation, "saturation"


def tissue_mask(rgb: np.ndarray, um_per_px: float, params: SegmentParams,
                artefacts_out: list[np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Tissue mask (uint8 0/255) of an RGB image whose pixels are ``um_per_px`` microns wide;
    the artefact mask (uint8 0/255) is appended to ``artefacts_out`` when given."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    channel, channel_name = tissue_channel(hsv)
    saturation = cv2.medianBlur(channel, params.median_blur)
    threshold = saturation_threshold(saturation, params)
    tissue = saturation > threshold
    artefacts = artefact_mask(hsv, params, colour=channel_name == "saturation")
    tissue &= ~artefacts
    mask = tissue.astype(np.uint8) * 255
    if params.close_kernel > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.close_kernel,) * 2)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
        mask[artefacts] = 0  # closing must not bridge tissue back over ink
    px_area = um_per_px**2
    mask = _remove_small_components(mask, params.min_tissue_area_um2 / px_area, connectivity=8)
    mask = _fill_small_holes(mask, params.min_hole_area_um2 / px_area)
    meta = {
        "threshold": threshold,
        "channel": channel_name,
        "artefact_fraction": float(artefacts.mean()),
        "um_per_px": um_per_px,
    }
    if artefacts_out is not None:
        artefacts_out.append(artefacts.astype(np.uint8) * 255)
    return mask, meta


def mask_polygons(mask: np.ndarray, scale: tuple[float, float]) -> list[list[np.ndarray]]:
    """Outer contours with their holes (RETR_CCOMP), as level-0 float polygons of pixel centres."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    to_level0 = lambda c: (c.reshape(-1, 2).astype(np.float64) + 0.5) * np.asarray(scale)  # noqa: E731
    parents = hierarchy[0][:, 3]
    components: dict[int, list[np.ndarray]] = {
        i: [to_level0(c)] for i, c in enumerate(contours) if parents[i] < 0
    }
    for i, c in enumerate(contours):
        if parents[i] >= 0 and len(c) >= 3:
            components[int(parents[i])].append(to_level0(c))
    return list(components.values())


def segmentation_downsample(level0_size: tuple[int, int], params: SegmentParams) -> float:
    """The downsample to segment at: ``params.downsample``, finer for slides too small for it."""
    longest = max(level0_size)
    return max(1.0, min(params.downsample, longest / params.min_size))


def read_segmentation_image(slide: Any, downsample: float) -> np.ndarray:
    """The slide at ``downsample`` x as RGB: the best pyramid level, resized when it is finer."""
    level = slide.get_best_level_for_downsample(downsample)
    image = slide.read_level(level)
    width, height = slide.dimensions
    target = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    if slide.level_downsamples[level] < downsample / 1.25:
        image = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[..., :3])


def segment_slide(slide: Any, params: SegmentParams) -> Segmentation:
    """Segment ``slide`` (a :func:`bd.slides.slide.open_slide` object, or anything with its interface)."""
    size = tuple(int(v) for v in slide.dimensions)
    image = read_segmentation_image(slide, segmentation_downsample(size, params))
    scale = (size[0] / image.shape[1], size[1] / image.shape[0])
    um_per_px = float(slide.mpp) * math.sqrt(scale[0] * scale[1])
    artefacts: list[np.ndarray] = []
    mask, meta = tissue_mask(image, um_per_px, params, artefacts)
    polygons = mask_polygons(mask, scale)
    meta.update(mpp_source=getattr(slide, "mpp_source", "metadata"), components=len(polygons))
    if meta["channel"] == "darkness":
        log.warning("%s: no colour in the slide (greyscale scan?); tissue taken as what is dark",
                    getattr(slide, "path", "slide"))
    return Segmentation(mask, artefacts[0], image, scale, size, float(slide.mpp), polygons, meta)


def polygon_area_um2(polygon: list[np.ndarray], mpp: float) -> float:
    """Area of an outer ring minus its holes, in square microns (shoelace formula)."""
    def ring(xy: np.ndarray) -> float:
        x, y = xy[:, 0], xy[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))

    return (ring(polygon[0]) - sum(ring(h) for h in polygon[1:])) * mpp**2


def to_geojson(seg: Segmentation | None, properties: dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of tissue polygons (level-0 pixel coordinates, holes kept as polygon
    interiors), each a QuPath annotation of class "Tissue" (File > Import objects from file)."""
    from bd.exports import tissue_annotation

    features = []
    for i, polygon in enumerate(seg.polygons if seg else []):
        rings = [np.vstack([r, r[:1]]).round(2).tolist() for r in polygon]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": tissue_annotation({"id": i, "holes": len(polygon) - 1,
                                             "area_um2": round(polygon_area_um2(polygon, seg.mpp), 1)}),
        })
    return {"type": "FeatureCollection", "properties": properties, "features": features}


def mask_info(seg: Segmentation, params: SegmentParams) -> dict[str, Any]:
    """What tiling needs to map the mask to level 0, plus a record of how it was made."""
    return {
        "level0_width": seg.level0_size[0],
        "level0_height": seg.level0_size[1],
        "mask_width": int(seg.mask.shape[1]),
        "mask_height": int(seg.mask.shape[0]),
        "scale_x": seg.scale[0],
        "scale_y": seg.scale[1],
        "mpp": seg.mpp,
        "tissue_fraction": seg.tissue_fraction,
        "params": params_mod.to_dict(params),
        **seg.meta,
    }


# What the QC image marks, as (label, BGR colour): outlines, and the excluded pixels filled.
QC_LEGEND = {"tissue": ("tissue outline", (0, 140, 255)), "hole": ("hole", (255, 80, 0)),
             "pen": ("excluded: pen ink", (255, 0, 255)), "debris": ("excluded: dark debris", (255, 255, 0))}


def artefact_kinds(seg: Segmentation, params: SegmentParams) -> tuple[np.ndarray, np.ndarray]:
    """The artefact mask split into pen ink and dark debris (bool, mask size): pixels darker than
    ``dark_value`` are debris, pixels of a pen colour rule are ink, and the grown halo around each
    goes to the kind it surrounds (ink first)."""
    hsv = cv2.cvtColor(np.ascontiguousarray(seg.image), cv2.COLOR_RGB2HSV)
    if hsv.shape[:2] != seg.artefacts.shape[:2]:
        hsv = cv2.resize(hsv, seg.artefacts.shape[::-1], interpolation=cv2.INTER_NEAREST)
    h, s, v = (hsv[..., i].astype(np.int16) for i in range(3))
    excluded = seg.artefacts > 0
    debris = v < params.dark_value
    colour = seg.meta.get("channel", "saturation") == "saturation"
    ink = np.zeros_like(debris)
    for name in params.pen_colors if colour else ():
        ink |= PEN_COLORS[name](h, s, v)
    ink &= ~debris
    size = 2 * max(params.artefact_dilate, 1) + 1
    grown = cv2.dilate(ink.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))) > 0
    pen = excluded & grown
    return pen, excluded & ~pen


def qc_image(seg: Segmentation, title: str, params: SegmentParams | None = None) -> np.ndarray:
    """Thumbnail (BGR) with tissue outlines in orange and holes in blue; with ``params``, the excluded
    pen ink (magenta) and dark debris (cyan) filled in their colours, and a legend."""
    image, factor = fit(cv2.cvtColor(seg.image, cv2.COLOR_RGB2BGR))
    excluded = []
    if params is not None and seg.artefacts.size > 1:
        pen, debris = artefact_kinds(seg, params)
        for key, where in (("pen", pen), ("debris", debris)):
            mark(image, where, QC_LEGEND[key][1])
            excluded.append(f"{QC_LEGEND[key][0].split(': ')[1]} {100 * where.mean():.2f}%")
    sx, sy = seg.scale[0] / factor, seg.scale[1] / factor
    to_px = lambda r: np.round(r / (sx, sy) - 0.5).astype(np.int32).reshape(-1, 1, 2)  # noqa: E731
    cv2.polylines(image, [to_px(p[0]) for p in seg.polygons], True, (0, 140, 255), 2, cv2.LINE_AA)
    cv2.polylines(image, [to_px(h) for p in seg.polygons for h in p[1:]], True, (255, 80, 0), 1, cv2.LINE_AA)
    lines = [
        title,
        f"tissue {100 * seg.tissue_fraction:.1f}% | {len(seg.polygons)} regions | "
        f"mpp {seg.mpp:.3g} ({seg.meta.get('mpp_source', '?')}) | mask 1:{seg.scale[0]:.1f}",
    ]
    if params is not None:
        lines.append("excluded: " + ", ".join(excluded))
        image = legend(image, list(QC_LEGEND.values()))
    return caption(image, lines)


def write_segmentation(seg: Segmentation, params: SegmentParams, out_dir: Path, title: str) -> None:
    """Write mask.png, artefacts.png, mask.json, contours.geojson and qc.png into ``out_dir``."""
    info = mask_info(seg, params)
    write_png(out_dir / "mask.png", seg.mask)
    write_png(out_dir / "artefacts.png", seg.artefacts)
    write_json(out_dir / "mask.json", info)
    write_json(out_dir / "contours.geojson", to_geojson(seg, info))
    write_png(out_dir / "qc.png", qc_image(seg, title, params))


def write_failure(out_dir: Path, title: str, reason: str) -> None:
    """Outputs of a slide that could not be read: an empty mask and contours, a QC image saying so."""
    info = {"error": reason, "error_stage": "segment", "tissue_fraction": 0.0, "scale_x": None, "scale_y": None}
    write_png(out_dir / "mask.png", np.zeros((1, 1), np.uint8))
    write_png(out_dir / "artefacts.png", np.zeros((1, 1), np.uint8))
    write_json(out_dir / "mask.json", info)
    write_json(out_dir / "contours.geojson", to_geojson(None, info))
    write_png(out_dir / "qc.png", error_image(title, reason))


def read_mask(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask written by ``bd segment`` and its ``mask.json`` (empty dict when the file is absent)."""
    path = Path(path)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise BDError(f"{path}: not a readable mask image (rerun `bd segment` for this slide)")
    info_path = path.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return mask, info


def environment_checked(step: Callable[[], Any], what: str) -> Any:
    """Run ``step``; an allocation failure inside OpenCV or numpy becomes a ResourceError (the job
    fails, a retry with more memory can act), never a slide error or a traceback."""
    try:
        return step()
    except (cv2.error, MemoryError) as exc:
        if environment_reason(exc) is None:
            raise
        raise slide_fault(what, exc) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slide", required=True, help="slide file")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for mask.png, contours.geojson, qc.png")
    parser.add_argument("--params", default=None, help="segmentation parameters (JSON or a YAML/JSON file)")
    parser.add_argument("--fallback-mpp", type=float, default=None, help="um/px for slides without MPP metadata")
    parser.add_argument("--mpp", type=float, default=None,
                        help="um/px of this slide (the sample sheet's; overrides the metadata)")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="skip: an unreadable slide gets empty outputs and a warning (exit 0); "
                             "out of memory, a full disk and other faults of the machine always fail")


def run(args: argparse.Namespace) -> int:
    from bd.slides.slide import open_slide

    params = params_mod.build(SegmentParams, args.params)
    title = Path(args.slide).name
    try:
        with open_slide(args.slide, fallback_mpp=args.fallback_mpp, mpp=args.mpp) as slide:
            seg = environment_checked(lambda: segment_slide(slide, params), f"{args.slide}: segmentation")
    except SlideError as exc:
        if args.on_error == "fail":
            raise
        log.warning("skipping unreadable slide %s: %s", args.slide, exc)
        write_failure(args.out_dir, title, str(exc))
        return 0
    if not seg.polygons:
        log.warning("%s: no tissue found (threshold %.1f); its grid will be empty", args.slide, seg.meta["threshold"])
    write_segmentation(seg, params, args.out_dir, title)
    log.info("%s: %d tissue regions, %.1f%% tissue, mask %dx%d at 1:%.2f", title, len(seg.polygons),
             100 * seg.tissue_fraction, seg.mask.shape[1], seg.mask.shape[0], seg.scale[0])
    return 0
