"""Segmentation and tiling time on a generated 51,200 x 51,200 px pyramidal slide, against a
CLAM-style per-contour point-in-polygon patch filter on the same mask, in the same run.

The slide is an in-memory object with the ``bd.slides.slide.Slide`` interface and levels at 1x, 4x,
16x and 32x (20x scan, 0.5 um/px). Only its 1,600 x 1,600 px 32x level holds pixels, stored as
JPEG bytes and decoded on every ``read_level`` call (so the decode is timed, as it would be for a
pyramidal TIFF); reading any other level raises, which shows that segmentation and tiling never
touch level 0. The tissue is several ragged core-needle-biopsy strips with tears (holes), a pen stroke
and dust, drawn once before timing.

Timed (median of ``--repeats``):
- segmentation: ``bd.slides.segment.segment_slide`` (decode the 32x level, threshold, artefacts,
  morphology, area filters, contours to level 0);
- tiling: ``bd.slides.tiling.tile_slide`` on that mask (geometry, exact per-cell tissue fractions for the
  whole slide, selection; 256 px patches at 0.5 um/px);
- CLAM-style filter: for each tissue contour, every grid point in its bounding box is tested with
  ``cv2.pointPolygonTest`` at four points around the patch centre (CLAM's ``four_pt`` check), then
  rejected if its centre lies in a hole. One process, like ours.

Prints one JSON object per line: {"metric", "value", "unit", "target", "better"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bd.slides.segment import SegmentParams, segment_slide  # noqa: E402
from bd.slides.tiling import TileParams, tile_slide  # noqa: E402

BACKGROUND = np.array([236, 234, 240])


class GeneratedSlide:
    """A slide-like object whose only stored level is the low-resolution one (JPEG bytes)."""

    def __init__(self, size: int, downsamples: tuple[int, ...], image: np.ndarray, mpp: float) -> None:
        self.level_dimensions = tuple((size // d, size // d) for d in downsamples)
        self.level_downsamples = tuple(float(d) for d in downsamples)
        self.dimensions = self.level_dimensions[0]
        self.level_count = len(downsamples)
        self.mpp, self.mpp_source, self.objective_power = mpp, "metadata", 20.0
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok and image.shape[:2] == self.level_dimensions[-1][::-1]
        self._jpeg = data

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return max(i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01 or i == 0)

    def read_level(self, level: int) -> np.ndarray:
        if level != self.level_count - 1:
            raise RuntimeError(f"level {level} has no pixels in this generated slide")
        return cv2.cvtColor(cv2.imdecode(self._jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _noise(side: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), sigma)
    return noise / noise.std()


def draw_tissue(side: int, seed: int) -> np.ndarray:
    """Biopsy-like strips (pink with purple blotches and texture), tears, a pen stroke and dust."""
    rng = np.random.default_rng(seed)
    image = np.clip(BACKGROUND + rng.normal(0, 2.5, (side, side, 3)), 0, 255).astype(np.uint8)
    strips = np.zeros((side, side), np.uint8)
    for i in range(6):
        centre = (int(side * (0.15 + 0.14 * i)), int(side * rng.uniform(0.35, 0.65)))
        axes = (int(rng.uniform(0.25, 0.4) * side), int(rng.uniform(0.025, 0.05) * side))
        cv2.ellipse(strips, centre, axes, rng.uniform(60, 120), 0, 360, 255, -1)
    for _ in range(8):  # tears inside the strips
        ys, xs = np.nonzero(strips)
        k = rng.integers(len(xs))
        cv2.ellipse(strips, (int(xs[k]), int(ys[k])), (int(rng.uniform(8, 20)), int(rng.uniform(4, 10))),
                    rng.uniform(0, 180), 0, 360, 0, -1)
    ragged = cv2.GaussianBlur(strips.astype(np.float32) / 255, (0, 0), 2) + 0.25 * _noise(side, 2.5, rng)
    near = cv2.dilate(strips, np.ones((9, 9), np.uint8)) > 0
    strips = np.where((ragged > 0.5) & near, 255, 0).astype(np.uint8)  # ragged edges, as real tissue has
    texture = cv2.GaussianBlur(rng.normal(0, 1, (side, side)).astype(np.float32), (0, 0), 3)
    texture /= texture.std()
    purple = cv2.GaussianBlur(rng.random((side, side)).astype(np.float32), (0, 0), 12) > 0.52
    pink, haem = np.array([222, 140, 188]), np.array([150, 88, 168])
    colour = np.where(purple[..., None], haem, pink) + 12 * texture[..., None]
    image[strips > 0] = np.clip(colour, 0, 255).astype(np.uint8)[strips > 0]
    cv2.line(image, (int(0.05 * side), int(0.1 * side)), (int(0.6 * side), int(0.2 * side)), (40, 150, 80), 6)
    for _ in range(20):
        cv2.circle(image, (int(rng.integers(side)), int(rng.integers(side))), int(rng.integers(1, 4)), (30, 28, 30), -1)
    return image


def clam_style_filter(polygons: list[list[np.ndarray]], ps0: float, size: tuple[int, int]) -> np.ndarray:
    """CLAM-style patch filter: per contour, per grid point in its bounding box, point-in-polygon
    tests at four points around the patch centre, then the centre against every hole."""
    kept = []
    half, shift = ps0 / 2, ps0 / 4
    for polygon in polygons:
        outer = polygon[0].astype(np.float32).reshape(-1, 1, 2)
        holes = [h.astype(np.float32).reshape(-1, 1, 2) for h in polygon[1:]]
        x0, y0, w, h = cv2.boundingRect(outer)
        xs = np.rint(np.arange(int(x0 // ps0), int((x0 + w) // ps0) + 1) * ps0)
        ys = np.rint(np.arange(int(y0 // ps0), int((y0 + h) // ps0) + 1) * ps0)
        for y in ys:
            for x in xs:
                if x + ps0 > size[0] + 0.5 or y + ps0 > size[1] + 0.5:
                    continue
                cx, cy = x + half, y + half
                corners = ((cx - shift, cy - shift), (cx + shift, cy - shift),
                           (cx - shift, cy + shift), (cx + shift, cy + shift))
                if not any(cv2.pointPolygonTest(outer, p, False) >= 0 for p in corners):
                    continue
                if any(cv2.pointPolygonTest(hole, (cx, cy), False) > 0 for hole in holes):
                    continue
                kept.append((x, y))
    return np.asarray(kept, dtype=np.int64).reshape(-1, 2)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def emit(metric: str, value: float, unit: str, target: float | None = None, better: str | None = None) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 6), "unit": unit, "target": target, "better": better}),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=51_200, help="level-0 side in pixels (>= 50,000)")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clam-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    downsamples = (1, 4, 16, 32)
    slide = GeneratedSlide(args.size, downsamples, draw_tissue(args.size // downsamples[-1], args.seed), args.mpp)
    seg_params, tile_params = SegmentParams(), TileParams()

    seg_time, seg = timed(lambda: segment_slide(slide, seg_params), args.repeats)
    tile_time, grid = timed(lambda: tile_slide(slide, seg.mask, seg.scale, tile_params, "generated"), args.repeats)
    ps0 = grid.patch_size_level0
    clam_time, clam = timed(lambda: clam_style_filter(seg.polygons, ps0, slide.dimensions), args.clam_repeats)

    ours = {tuple(c) for c in grid.coords.tolist()}
    theirs = {tuple(c) for c in clam.tolist()}
    emit("slide_side_px", args.size, "px")
    emit("segmentation_level_side_px", seg.mask.shape[1], "px")
    emit("grid_cells", grid.meta["grid_shape"][0] * grid.meta["grid_shape"][1], "cells")
    emit("patches_kept", len(grid), "patches")
    emit("clam_style_patches_kept", len(clam), "patches")
    emit("patch_set_jaccard_vs_clam_style", len(ours & theirs) / max(len(ours | theirs), 1), "ratio")
    emit("segmentation_time", seg_time, "s", 1.0, "lower")
    emit("tiling_time", tile_time, "s", 0.2, "lower")
    emit("clam_style_filter_time", clam_time, "s")
    emit("tiling_speedup_vs_clam_style", clam_time / tile_time, "x", 10.0, "higher")
    return 0


if __name__ == "__main__":
    sys.exit(main())
