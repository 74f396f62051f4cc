"""Patch tiling at a physical size: one global grid aligned to the slide origin, cells kept by
their tissue fraction measured on the segmentation mask.

A patch is ``patch_size`` pixels at ``target_mpp`` microns per pixel, so it covers
``patch_size * target_mpp / mpp`` level-0 pixels (a float; never an integer-truncated downsample).
Grid corners are ``round(k * patch_size_level0)``, rounded once, so the grid is the same whatever
the mask. Each cell's tissue fraction is its exact area fraction of the mask, computed for all
cells at once from the mask's integral image (bilinear in fractional coordinates, hence exact for
any cell size, larger or smaller than a mask pixel). The same exact fraction of the
segmentation's artefact mask (pen ink, debris) drops cells above ``max_artefact_fraction``.

A slide coarser than ``target_mpp`` has its patches upsampled: by more than ``UPSAMPLE_WARNING``
(1.25x) that is a warning in the log, the grid and the QC table; by more than ``max_upsample``
the slide is not tiled (a SlideError, which follows ``on_slide_error``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bd import params as params_mod
from bd.params import param
from bd.errors import ConfigError, SlideError, StoreError
from bd.slides.grid import PatchGrid, save_grid

log = logging.getLogger(__name__)

MAGNIFICATION_MPP = 10.0  # microns per pixel at 1x: 20x is 0.5 um/px, 40x is 0.25 um/px
QC_MAX_SIDE = 1024
LEVEL_TOLERANCE = 0.01  # a level at 4.0002x serves a 4x request (scanners' levels are rarely exact)
UPSAMPLE_WARNING = 1.25  # patches upsampled by more than this are warned about (log, grid, QC)


@dataclass
class TileParams:
    """The patch grid of each slide (`bd tile`)."""

    target_mpp: float = param(0.5, exclusive_minimum=0, description="microns per pixel of the patches")
    target_magnification: float | None = param(None, exclusive_minimum=0,
                                               description="when set, overrides target_mpp (20x: 0.5 um/px)")
    patch_size: int = param(256, minimum=16, description="patch side in px at the target resolution")
    tissue_threshold: float = param(0.5, minimum=0, maximum=1,
                                    description="a patch is kept when at least this fraction of it is tissue")
    use_annotations: bool = param(False, description="restrict the patches to annotation polygons (BCNB tumour regions)")
    annotation_keys: tuple[str, ...] = param(("positive",), min_items=1,
                                             description="which lists of the annotation JSON to use")
    max_patches: int | None = param(None, minimum=1, description="a seeded random subset when a slide has more; null: all")
    seed: int = param(0, description="seed of the max_patches subset")
    max_artefact_fraction: float | None = param(
        0.0, minimum=0, maximum=1, description="a patch with more pen ink or debris than this is dropped; null: no filter")
    max_upsample: float | None = param(
        2.0, minimum=1, description="a slide needing more upsampling is a slide error (on_slide_error); null: any")

    def __post_init__(self) -> None:
        params_mod.check(self)

    @property
    def mpp(self) -> float:
        """The target microns per pixel, from the magnification when one is given."""
        if self.target_magnification is not None:
            return MAGNIFICATION_MPP / self.target_magnification
        return self.target_mpp


@dataclass(frozen=True)
class GridGeometry:
    """Where and how patches are read: level-0 patch size, pyramid level, grid extent."""

    patch_size_level0: float
    read_level: int
    read_downsample: float
    read_size: int
    columns: int
    rows: int

    def origins(self, count: int) -> np.ndarray:
        """Level-0 corners of the first ``count`` grid lines: round(k * size), rounded once."""
        return np.rint(np.arange(count) * self.patch_size_level0).astype(np.int64)


def grid_geometry(
    size: tuple[int, int], mpp: float, level_downsamples: list[float] | tuple[float, ...], params: TileParams
) -> GridGeometry:
    """The grid of a slide of level-0 ``size`` (w, h) at ``mpp``; only whole patches fit."""
    ps0 = params.patch_size * params.mpp / mpp
    wanted = ps0 / params.patch_size  # the downsample at which a patch is patch_size pixels
    levels = [i for i, ds in enumerate(level_downsamples) if ds <= wanted * (1 + LEVEL_TOLERANCE)] or [0]
    level = max(levels, key=lambda i: level_downsamples[i])
    read_ds = float(level_downsamples[level])
    fit = lambda n: int(math.floor(n / ps0 + 1e-9))  # noqa: E731
    return GridGeometry(ps0, level, read_ds, max(1, round(ps0 / read_ds)), fit(size[0]), fit(size[1]))


def _integral_at(integral: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``integral`` at fractional ``edges`` along ``axis`` (exact: the
    integral of a piecewise-constant image is piecewise linear along each axis)."""
    n = integral.shape[axis] - 1
    edges = np.clip(edges, 0, n)
    lo = np.minimum(np.floor(edges).astype(np.int64), max(n - 1, 0))
    t = edges - lo
    a = np.take(integral, lo, axis=axis)
    b = np.take(integral, np.minimum(lo + 1, n), axis=axis)
    shape = [1, 1]
    shape[axis] = -1
    return a + (b - a) * t.reshape(shape)


def cell_fractions(mask: np.ndarray, scale: tuple[float, float], geom: GridGeometry) -> np.ndarray:
    """Tissue fraction (rows x columns) of every patch footprint [x, x + size) x [y, y + size):
    its exact area average of the mask, for all cells at once."""
    if geom.rows == 0 or geom.columns == 0:
        return np.zeros((geom.rows, geom.columns))
    integral = cv2.integral((mask > 0).astype(np.uint8), sdepth=cv2.CV_64F)
    x0 = geom.origins(geom.columns) / scale[0]
    y0 = geom.origins(geom.rows) / scale[1]
    width, height = geom.patch_size_level0 / scale[0], geom.patch_size_level0 / scale[1]
    strips = _integral_at(integral, x0 + width, axis=1) - _integral_at(integral, x0, axis=1)
    area = _integral_at(strips, y0 + height, axis=0) - _integral_at(strips, y0, axis=0)
    return np.clip(area / (width * height), 0.0, 1.0)


def select_cells(fractions: np.ndarray, threshold: float, geom: GridGeometry,
                 artefact: np.ndarray | None = None, max_artefact: float | None = None) -> np.ndarray:
    """Level-0 corners (N x 2, row-major order) of cells whose fraction reaches ``threshold``
    (a cell without any tissue is never kept, even at threshold 0) and whose artefact fraction
    does not exceed ``max_artefact``."""
    keep = (fractions >= threshold - 1e-9) & (fractions > 0)
    if artefact is not None and max_artefact is not None:
        keep &= artefact <= max_artefact + 1e-9
    rows, cols = np.nonzero(keep)
    return np.stack([geom.origins(geom.columns)[cols], geom.origins(geom.rows)[rows]], axis=1)


def cap_patches(coords: np.ndarray, max_patches: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of at most ``max_patches`` rows, in the original order."""
    if max_patches is None or len(coords) <= max_patches:
        return coords
    rng = np.random.default_rng(seed)
    return coords[np.sort(rng.choice(len(coords), size=max_patches, replace=False))]


def load_annotations(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    """Polygons (level-0 x, y) of the given lists of a BCNB annotation JSON:
    ``{"positive": [{"name": ..., "vertices": [[x, y], ...]}], "negative": [...]}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: not a readable annotation JSON ({exc})") from exc
    polygons = []
    for key in keys:
        for i, item in enumerate(data.get(key) or []):
            try:
                vertices = np.asarray(item["vertices"], dtype=np.float64).reshape(-1, 2)
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreError(f"{path}: {key}[{i}] has no list of [x, y] 'vertices' ({exc})") from exc
            if len(vertices) >= 3:
                polygons.append(vertices)
    return polygons


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Fill level-0 ``polygons`` into a uint8 0/255 image of ``shape`` at the mask's scale."""
    out = np.zeros(shape, np.uint8)
    pts = [np.round(p / np.asarray(scale) - 0.5).astype(np.int32).reshape(-1, 1, 2) for p in polygons]
    if pts:
        cv2.fillPoly(out, pts, 255)
    return out


def tile_mask(
    mask: np.ndarray,
    scale: tuple[float, float],
    size: tuple[int, int],
    mpp: float,
    level_downsamples: list[float] | tuple[float, ...],
    params: TileParams,
    artefacts: np.ndarray | None = None,
) -> tuple[np.ndarray, GridGeometry]:
    """Kept patch corners (level 0) of a slide, given its tissue mask (and the artefact mask, of
    the same shape, when there is one); the core of tiling."""
    geom = grid_geometry(size, mpp, level_downsamples, params)
    artefact = None if artefacts is None else cell_fractions(artefacts, scale, geom)
    coords = select_cells(cell_fractions(mask, scale, geom), params.tissue_threshold, geom,
                          artefact, params.max_artefact_fraction)
    return cap_patches(coords, params.max_patches, params.seed), geom


def check_upsample(mpp: float, params: TileParams, where: str) -> tuple[float, list[str]]:
    """How much patches are upsampled (slide MPP / target MPP), and the warning to record; a
    SlideError beyond ``max_upsample``."""
    upsample = mpp / params.mpp
    if params.max_upsample is not None and upsample > params.max_upsample * (1 + 1e-9):
        raise SlideError(f"{where}: the slide is {mpp:g} um/px, {upsample:.2f}x coarser than tiling's "
                         f"{params.mpp:g} um/px, beyond tiling.max_upsample {params.max_upsample:g}: "
                         "its patches would be mostly interpolation. Check its MPP (sample sheet `mpp`, "
                         "cohort.fallback_mpp) or raise tiling.max_upsample")
    if upsample > UPSAMPLE_WARNING:
        return upsample, [f"slide is {mpp:g} um/px: patches upsampled {upsample:.2f}x to {params.mpp:g} um/px"]
    return upsample, []


def mask_scale(mask: np.ndarray, info: dict[str, Any], size: tuple[int, int], path: Path) -> tuple[float, float]:
    """Level-0 pixels per mask pixel: from mask.json, checked against the slide's size."""
    derived = (size[0] / mask.shape[1], size[1] / mask.shape[0])
    stored = (info.get("scale_x"), info.get("scale_y"))
    if None in stored:
        return derived
    if info.get("level0_width", size[0]) != size[0] or info.get("level0_height", size[1]) != size[1]:
        raise StoreError(f"{path}: made for a {info['level0_width']}x{info['level0_height']} slide, "
                         f"but this slide is {size[0]}x{size[1]}; rerun `bd segment`")
    if not np.allclose(stored, derived, rtol=1e-6):
        raise StoreError(f"{path}: mask scale {stored} does not match the mask's shape; rerun `bd segment`")
    return float(stored[0]), float(stored[1])


def tile_slide(
    slide: Any,
    mask: np.ndarray,
    scale: tuple[float, float],
    params: TileParams,
    slide_id: str,
    annotations: list[np.ndarray] | None = None,
    artefacts: np.ndarray | None = None,
) -> PatchGrid:
    """The patch grid of ``slide`` (a ``bd.slides.slide`` Slide) from its tissue mask (and the
    segmentation's artefact mask, which drops patches above ``max_artefact_fraction``)."""
    size = tuple(int(v) for v in slide.dimensions)
    upsample, warnings = check_upsample(float(slide.mpp), params, str(getattr(slide, "path", slide_id)))
    if annotations is not None:
        mask = np.minimum(mask, rasterise(annotations, mask.shape, scale))
    coords, geom = tile_mask(mask, scale, size, float(slide.mpp), list(slide.level_downsamples), params,
                             artefacts)
    meta: dict[str, Any] = {
        "tissue_threshold": params.tissue_threshold,
        "max_patches": params.max_patches,
        "seed": params.seed,
        "annotations": None if annotations is None else len(annotations),
        "mpp_source": getattr(slide, "mpp_source", "metadata"),
        "grid_shape": [geom.rows, geom.columns],
        "upsample": upsample,
        "artefact_filter": None if artefacts is None else params.max_artefact_fraction,
        "warnings": warnings,
    }
    if len(coords) == 0:
        meta["warnings"].append("no patch reaches the tissue threshold: empty grid")
    return PatchGrid(
        coords=coords, slide_id=slide_id, slide_width=size[0], slide_height=size[1],
        mpp=float(slide.mpp), target_mpp=params.mpp, patch_size=params.patch_size,
        patch_size_level0=geom.patch_size_level0, read_level=geom.read_level,
        read_downsample=geom.read_downsample, read_size=geom.read_size, meta=meta,
    )


def qc_image(thumbnail: np.ndarray, grid: PatchGrid, title: str) -> np.ndarray:
    """Thumbnail (BGR) with kept patches shaded and outlined."""
    from bd.slides.qc_draw import caption as _caption

    image = cv2.cvtColor(np.ascontiguousarray(thumbnail[..., :3]), cv2.COLOR_RGB2BGR)
    fx, fy = image.shape[1] / max(grid.slide_width, 1), image.shape[0] / max(grid.slide_height, 1)
    overlay = image.copy()
    side = grid.patch_size_level0
    for x, y in grid.coords:
        p0 = (int(round(x * fx)), int(round(y * fy)))
        p1 = (int(round((x + side) * fx)) - 1, int(round((y + side) * fy)) - 1)
        cv2.rectangle(overlay, p0, p1, (0, 200, 0), -1)
        cv2.rectangle(image, p0, p1, (0, 120, 0), 1)
    image = cv2.addWeighted(overlay, 0.3, image, 0.7, 0)
    lines = [
        title,
        f"{len(grid)} patches of {grid.patch_size}px at {grid.target_mpp:.3g} um/px "
        f"({side:.1f} px level 0, read level {grid.read_level} as {grid.read_size}px)",
    ]
    lines += [f"WARNING: {w}" for w in grid.meta.get("warnings", [])]
    return _caption(image, lines)


def _annotation_polygons(
    params: TileParams, annotations_dir: str, slide_path: Path, slide_id: str
) -> list[np.ndarray] | None:
    """The slide's annotation polygons when ``use_annotations``; None means 'whole tissue'."""
    if not params.use_annotations:
        return None
    if not annotations_dir:
        raise ConfigError("tiling.use_annotations is true but cohort.annotations_dir is not set")
    for name in (slide_id, slide_path.stem):
        path = Path(annotations_dir) / f"{name}.json"
        if path.is_file():
            return load_annotations(path, tuple(params.annotation_keys))
    log.warning("%s: no annotation file %s/%s.json; tiling the whole tissue", slide_id, annotations_dir, slide_id)
    return None


def read_artefacts(path: Path, shape: tuple[int, ...], params: TileParams) -> np.ndarray | None:
    """The segmentation's artefact mask (None when the filter is off); a mask from an older
    ``bd segment`` without one is warned about and tiled without the filter."""
    from bd.slides.segment import read_mask

    if params.max_artefact_fraction is None:
        return None
    if not path.is_file():
        log.warning("%s: no artefact mask (segmented by an older bd?); ink and debris are not "
                    "filtered out of patches; rerun `bd segment`", path)
        return None
    artefacts, _ = read_mask(path)
    if artefacts.shape != tuple(shape):
        raise StoreError(f"{path}: artefact mask {artefacts.shape} differs from the tissue mask {tuple(shape)}; "
                         "rerun `bd segment`")
    return artefacts


def _write_unread(args: argparse.Namespace, params: TileParams, slide_id: str, reason: str,
                  stage: str = "segment") -> int:
    """A slide that ``stage`` could not read (``--on-error skip``) gets an empty grid that says
    why, so extraction writes an empty store recording it and its patient counts as missing the
    slide."""
    from bd.slides.qc_draw import error_image, write_png

    log.warning("%s: slide was not read by %s (%s); writing an empty grid", slide_id, stage, reason)
    grid = PatchGrid(
        coords=np.zeros((0, 2), np.int64), slide_id=slide_id, slide_width=0, slide_height=0,
        mpp=float("nan"), target_mpp=params.mpp, patch_size=params.patch_size,
        patch_size_level0=float("nan"), read_level=0, read_downsample=1.0, read_size=params.patch_size,
        meta={"error": reason, "error_stage": stage, "warnings": [f"slide not read: {reason}"]},
    )
    save_grid(grid, args.out)
    if args.qc is not None:
        write_png(args.qc, error_image(f"{slide_id} ({args.slide.name})", reason))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slide", required=True, type=Path, help="slide file")
    parser.add_argument("--mask", required=True, type=Path, help="mask.png written by `bd segment`")
    parser.add_argument("--out", required=True, type=Path, help="patch grid (.npz)")
    parser.add_argument("--qc", type=Path, default=None, help="QC thumbnail with the grid (.png)")
    parser.add_argument("--params", default=None, help="tiling parameters (JSON or a YAML/JSON file)")
    parser.add_argument("--fallback-mpp", type=float, default=None, help="um/px for slides without MPP metadata")
    parser.add_argument("--mpp", type=float, default=None,
                        help="um/px of this slide (the sample sheet's; overrides the metadata)")
    parser.add_argument("--artefacts", type=Path, default=None,
                        help="artefacts.png written by `bd segment` (default: next to --mask, when there)")
    parser.add_argument("--annotations-dir", default="", help="folder of annotation JSON files ('' for none)")
    parser.add_argument("--slide-id", default=None, help="slide id stored in the grid (default: the --out file stem)")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="skip: a slide that cannot be read gets an empty grid recording why (exit 0)")


def run(args: argparse.Namespace) -> int:
    from bd.slides.segment import read_mask

    params = params_mod.build(TileParams, args.params)
    slide_id = args.slide_id or args.out.name.removesuffix(".npz")
    mask, info = read_mask(args.mask)
    if info.get("error"):
        return _write_unread(args, params, slide_id, str(info["error"]), info.get("error_stage", "segment"))
    try:
        return _tile(args, params, slide_id, mask, info)
    except SlideError as exc:
        if args.on_error == "fail":
            raise
        return _write_unread(args, params, slide_id, str(exc), "tile")


def _tile(args: argparse.Namespace, params: TileParams, slide_id: str, mask: np.ndarray,
          info: dict[str, Any]) -> int:
    """Tile a readable slide: the grid and its QC image."""
    from bd.slides.qc_draw import write_png
    from bd.slides.slide import open_slide

    with open_slide(args.slide, fallback_mpp=args.fallback_mpp, mpp=args.mpp) as slide:
        size = tuple(int(v) for v in slide.dimensions)
        scale = mask_scale(mask, info, size, args.mask)
        polygons = _annotation_polygons(params, args.annotations_dir, args.slide, slide_id)
        artefacts = read_artefacts(args.artefacts or args.mask.with_name("artefacts.png"), mask.shape, params)
        grid = tile_slide(slide, mask, scale, params, slide_id, polygons, artefacts)
        for warning in grid.meta["warnings"]:
            log.warning("%s: %s", slide_id, warning)
        save_grid(grid, args.out)
        if args.qc is not None:
            factor = min(1.0, QC_MAX_SIDE / max(size))
            thumb = slide.get_thumbnail((max(1, round(size[0] * factor)), max(1, round(size[1] * factor))))
            write_png(args.qc, qc_image(np.asarray(thumb), grid, f"{slide_id} ({args.slide.name})"))
    log.info("%s: %d patches (%.1f level-0 px each, read level %d)", slide_id, len(grid),
             grid.patch_size_level0, grid.read_level)
    return 0
