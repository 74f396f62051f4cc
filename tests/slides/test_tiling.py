"""Patch tiling: grid geometry from the slide's MPP, exact vectorised tissue fractions (property
tests against a brute-force reference), real slides, holes, fallback MPP, annotations, the cap,
empty and unreadable slides, and the CLI contract."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bd import cli
from bd.slides.grid import load_grid
from bd.slides.segment import SegmentParams, segment_slide
from bd.slides.slide import SlideWarning, open_slide
from bd.slides.tiling import (
    GridGeometry, TileParams, cap_patches, cell_fractions, grid_geometry, select_cells, tile_mask, tile_slide,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CMU = DATA / "cmu-1-small-region.svs"


# --- geometry -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mpp, downsamples, params, expected",
    [
        (0.25, (1, 4, 16), TileParams(), (512.0, 0, 512)),  # 40x slide, 20x patches read at level 0
        (0.25, (1, 2, 4), TileParams(), (512.0, 1, 256)),  # a 2x level exists: read there
        (0.5, (1, 2.0004, 4.001), TileParams(target_mpp=1.0), (512.0, 1, 256)),  # odd-sized levels
        (0.2527, (1, 4.0002), TileParams(), (128 / 0.2527, 0, 507)),  # no integer truncation
        (0.5, (1, 4, 16), TileParams(target_mpp=2.0, patch_size=224), (896.0, 1, 224)),
        (0.25, (1, 4), TileParams(target_magnification=40), (256.0, 0, 256)),
    ],
)
def test_grid_geometry(mpp, downsamples, params, expected):
    geom = grid_geometry((10_000, 8_000), mpp, downsamples, params)
    ps0, level, read_size = expected
    assert geom.patch_size_level0 == pytest.approx(ps0, rel=1e-12)
    assert (geom.read_level, geom.read_size) == (level, read_size)
    assert geom.read_downsample == downsamples[level]
    assert geom.columns == int(10_000 // geom.patch_size_level0)
    assert geom.rows == int(8_000 // geom.patch_size_level0)


def test_grid_origins_are_rounded_once():
    geom = GridGeometry(100.4, 0, 1.0, 100, 10, 10)
    # k * 100.4 rounded: accumulating round(100.4) = 100 would drift by 4 px after 10 patches
    assert geom.origins(10).tolist() == [0, 100, 201, 301, 402, 502, 602, 703, 803, 904]


# --- exact fractions: property tests ----------------------------------------------------------

def reference_fractions(mask: np.ndarray, scale: tuple[float, float], geom: GridGeometry) -> np.ndarray:
    """Brute force: each cell's overlap with each mask pixel, one axis at a time."""
    def overlaps(starts: np.ndarray, length: float, n: int) -> np.ndarray:
        i = np.arange(n)
        return np.clip(np.minimum(starts[:, None] + length, i + 1) - np.maximum(starts[:, None], i), 0, None)

    w, h = geom.patch_size_level0 / scale[0], geom.patch_size_level0 / scale[1]
    ox = overlaps(geom.origins(geom.columns) / scale[0], w, mask.shape[1])
    oy = overlaps(geom.origins(geom.rows) / scale[1], h, mask.shape[0])
    return oy @ (mask > 0).astype(float) @ ox.T / (w * h)


@st.composite
def tiling_cases(draw):
    mask = draw(arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.sampled_from([0, 255])))
    scale_x = draw(st.floats(0.5, 64.0))
    scale_y = draw(st.one_of(st.just(scale_x), st.floats(0.5, 64.0)))
    width = max(1, round(mask.shape[1] * scale_x))
    height = max(1, round(mask.shape[0] * scale_y))
    scale = (width / mask.shape[1], height / mask.shape[0])
    mpp = draw(st.floats(0.1, 2.0))
    params = TileParams(target_mpp=draw(st.floats(0.25, 2.0)), patch_size=draw(st.integers(16, 512)))
    downsamples = (1.0, *sorted(draw(st.lists(st.floats(1.5, 64.0), max_size=3))))
    return mask, scale, (width, height), mpp, downsamples, params


@settings(max_examples=150, deadline=None)
@given(case=tiling_cases(), thresholds=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2))
def test_grid_properties(case, thresholds):
    mask, scale, size, mpp, downsamples, params = case
    geom = grid_geometry(size, mpp, downsamples, params)
    ps0 = geom.patch_size_level0
    assert ps0 == pytest.approx(params.patch_size * params.target_mpp / mpp)

    fractions = cell_fractions(mask, scale, geom)
    assert np.allclose(fractions, reference_fractions(mask, scale, geom), atol=1e-9)

    lo, hi = sorted(thresholds)
    kept = {}
    for t in (lo, hi):
        coords, _ = tile_mask(mask, scale, size, mpp, downsamples, dataclasses.replace(params, tissue_threshold=t))
        # alignment: every corner is round(k * ps0) for whole k, on one grid for the whole slide
        k = np.rint(coords / ps0)
        assert np.array_equal(np.rint(k * ps0), coords)
        # bounds: the whole patch lies on the slide
        assert (coords >= 0).all()
        assert (coords[:, 0] + ps0 <= size[0] + 0.5).all() and (coords[:, 1] + ps0 <= size[1] + 0.5).all()
        assert len({tuple(c) for c in coords.tolist()}) == len(coords)
        # the threshold means what it says
        cells = fractions[k[:, 1].astype(int), k[:, 0].astype(int)]
        assert (cells >= t - 1e-9).all()
        kept[t] = {tuple(c) for c in coords.tolist()}
    # monotone: a higher threshold keeps a subset
    assert kept[hi] <= kept[lo]


def test_fractions_when_cells_are_smaller_than_mask_pixels():
    mask = np.array([[255, 0], [0, 255]], np.uint8)
    geom = GridGeometry(25.0, 0, 1.0, 25, 4, 4)  # a mask pixel is 50 level-0 px: 2 x 2 cells each
    fractions = cell_fractions(mask, (50.0, 50.0), geom)
    assert fractions.tolist() == np.kron([[1, 0], [0, 1]], np.ones((2, 2))).tolist()


def test_cap_is_seeded_and_keeps_order():
    coords = np.stack([np.arange(100), np.zeros(100, int)], axis=1)
    a, b, c = cap_patches(coords, 10, 0), cap_patches(coords, 10, 0), cap_patches(coords, 10, 1)
    assert len(a) == 10 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert (np.diff(a[:, 0]) > 0).all()
    assert cap_patches(coords, 1000, 0) is coords


# --- real slides ------------------------------------------------------------------------------

class PaintedSlide:
    """A real slide with a white disk painted over it at level 0 (an artificial hole in tissue)."""

    def __init__(self, slide, centre: tuple[int, int], radius: int) -> None:
        self._slide, self._centre, self._radius = slide, centre, radius

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_level(self, level: int) -> np.ndarray:
        pixels = self._slide.read_level(level).copy()
        ds = self._slide.level_downsamples[level]
        cx, cy = (round(v / ds) for v in self._centre)
        cv2.circle(pixels, (cx, cy), round(self._radius / ds), (245, 244, 246), -1)
        return pixels


def _polygon_fraction(geojson: dict, coords: np.ndarray, ps0: float, size: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of each patch measured on the level-0 GeoJSON polygons (drawn at 1:4)."""
    canvas = np.zeros((size[1] // 4 + 1, size[0] // 4 + 1), np.uint8)
    for feature in geojson["features"]:
        rings = [np.round(np.asarray(r) / 4).astype(np.int32) for r in feature["geometry"]["coordinates"]]
        cv2.fillPoly(canvas, rings[:1], 1)
        cv2.fillPoly(canvas, rings[1:], 0)
    side = int(round(ps0 / 4))
    return np.array([canvas[y // 4:y // 4 + side, x // 4:x // 4 + side].mean() for x, y in coords])


def test_cmu_patches_are_on_the_slide_and_on_tissue(tmp_path):
    seg_dir, grid_path = tmp_path / "seg", tmp_path / "cmu.npz"
    assert cli.main(["segment", "--slide", str(CMU), "--out-dir", str(seg_dir)]) == 0
    argv = ["tile", "--slide", str(CMU), "--mask", str(seg_dir / "mask.png"), "--out", str(grid_path),
            "--qc", str(tmp_path / "cmu.qc.png"), "--params", json.dumps({"tissue_threshold": 0.6})]
    assert cli.main(argv) == 0
    grid = load_grid(grid_path)
    assert grid.slide_id == "cmu" and (grid.slide_width, grid.slide_height) == (2220, 2967)
    assert grid.patch_size_level0 == pytest.approx(256 * 0.5 / 0.499)
    assert (grid.read_level, grid.read_size) == (0, 257)
    assert 20 <= len(grid) <= 40  # the strip holds about 30 patches of 128 um
    assert (grid.coords >= 0).all()
    assert (grid.coords + grid.patch_size_level0 <= np.array([2220, 2967]) + 0.5).all()
    geo = json.loads((seg_dir / "contours.geojson").read_text())
    measured = _polygon_fraction(geo, grid.coords, grid.patch_size_level0, (2220, 2967))
    assert (measured >= 0.55).all()
    assert cv2.imread(str(tmp_path / "cmu.qc.png")) is not None


def test_patches_avoid_a_hole_in_the_tissue():
    centre, radius = (1200, 2500), 400  # inside the tissue strip; 125,000 um^2
    with open_slide(CMU) as slide:
        plain = segment_slide(slide, SegmentParams())
        painted = PaintedSlide(slide, centre, radius)
        holed = segment_slide(painted, SegmentParams())
        params = TileParams(tissue_threshold=0.9)
        before = tile_slide(slide, plain.mask, plain.scale, params, "cmu")
        after = tile_slide(painted, holed.mask, holed.scale, params, "cmu")
    # the hole is a hole of a tissue polygon
    rings = [h for p in holed.polygons for h in p[1:]]
    assert any(cv2.pointPolygonTest(r.astype(np.float32), centre, False) > 0 for r in rings)
    # cells well inside the disk were tissue before and are gone now; no patch overlaps the disk much
    ps0 = after.patch_size_level0
    def inside(c: np.ndarray) -> np.ndarray:  # patches wholly inside the disk
        return np.hypot(c[:, 0] + ps0 / 2 - centre[0], c[:, 1] + ps0 / 2 - centre[1]) < radius - ps0 * 0.71

    assert inside(before.coords).any()
    assert not inside(after.coords).any()
    ys, xs = np.mgrid[0:int(ps0), 0:int(ps0)]
    for x, y in after.coords:
        in_disk = np.hypot(xs + x - centre[0], ys + y - centre[1]) < radius
        assert in_disk.mean() <= 0.1 + 0.05  # threshold 0.9, plus the mask's resolution


def test_boxes_uses_the_fallback_mpp_with_a_warning():
    with pytest.warns(SlideWarning, match="fallback"):
        slide = open_slide(DATA / "boxes.tiff", fallback_mpp=8.0)
    with slide:
        seg = segment_slide(slide, SegmentParams())
        grid = tile_slide(slide, seg.mask, seg.scale, TileParams(max_upsample=None), "boxes")
        pixels = slide.read_level(0)
    assert slide.mpp_source == "fallback" and grid.mpp == 8.0 and grid.meta["mpp_source"] == "fallback"
    assert grid.meta["upsample"] == 16.0 and "upsampled 16.00x" in grid.meta["warnings"][0]
    assert grid.patch_size_level0 == pytest.approx(16.0)  # 256 px at 0.5 um/px over 8 um/px
    assert (grid.read_level, grid.read_size) == (0, 16)
    # the red box is tissue-coloured; the pure blue and green boxes are taken for ink
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert len(grid) > 15
    for x, y in grid.coords:
        assert red[y:y + 16, x:x + 16].mean() >= 0.45


def test_cli_boxes_records_the_fallback(tmp_path):
    seg_dir = tmp_path / "seg"
    with pytest.warns(SlideWarning, match="fallback") as caught:
        assert cli.main(["segment", "--slide", str(DATA / "boxes.tiff"), "--out-dir", str(seg_dir),
                         "--fallback-mpp", "8"]) == 0
        assert cli.main(["tile", "--slide", str(DATA / "boxes.tiff"), "--mask", str(seg_dir / "mask.png"),
                         "--out", str(tmp_path / "boxes.npz"), "--fallback-mpp", "8",
                         "--params", '{"max_upsample": 16}']) == 0
    assert len([w for w in caught if issubclass(w.category, SlideWarning)]) == 2  # segment and tile
    grid = load_grid(tmp_path / "boxes.npz")
    assert grid.mpp == 8.0 and grid.meta["mpp_source"] == "fallback" and len(grid) > 0


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_empty_slide_gives_an_empty_grid_and_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    blank = np.clip(238 + rng.integers(-5, 6, size=(900, 1200, 3)), 0, 255).astype(np.uint8)
    slide = tmp_path / "blank.png"
    cv2.imwrite(str(slide), blank)
    seg_dir, grid_path = tmp_path / "seg", tmp_path / "blank.npz"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["segment", "--slide", str(slide), "--out-dir", str(seg_dir), "--fallback-mpp", "0.5"]) == 0
        assert cli.main(["tile", "--slide", str(slide), "--mask", str(seg_dir / "mask.png"), "--out", str(grid_path),
                         "--qc", str(tmp_path / "blank.qc.png"), "--fallback-mpp", "0.5"]) == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no tissue" in messages and "empty grid" in messages
    grid = load_grid(grid_path)
    assert len(grid) == 0 and grid.coords.shape == (0, 2) and grid.meta["warnings"]
    assert cv2.imread(str(tmp_path / "blank.qc.png")) is not None


def test_unreadable_slide_skipped_gives_an_empty_grid(tmp_path):
    seg_dir, grid_path = tmp_path / "seg", tmp_path / "broken.npz"
    slide = str(DATA / "broken.svs")
    assert cli.main(["segment", "--slide", slide, "--out-dir", str(seg_dir), "--on-error", "skip"]) == 0
    assert cli.main(["tile", "--slide", slide, "--mask", str(seg_dir / "mask.png"), "--out", str(grid_path),
                     "--qc", str(tmp_path / "broken.qc.png")]) == 0
    grid = load_grid(grid_path)
    assert len(grid) == 0 and "broken.svs" in grid.meta["error"]


def test_annotations_restrict_the_grid(tmp_path, caplog):
    seg_dir = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(CMU), "--out-dir", str(seg_dir)]) == 0
    notes = tmp_path / "annotations"
    notes.mkdir()
    lower = [[0, 2000], [2220, 2000], [2220, 2967], [0, 2967]]
    upper = [[0, 0], [2220, 0], [2220, 1000], [0, 1000]]
    (notes / "cmu.json").write_text(json.dumps({"positive": [{"name": "t", "vertices": lower}],
                                                "negative": [{"name": "n", "vertices": upper}]}))
    tile = lambda out, params: cli.main(["tile", "--slide", str(CMU), "--mask", str(seg_dir / "mask.png"),  # noqa: E731
                                         "--out", str(out), "--params", json.dumps(params),
                                         "--annotations-dir", str(notes)])
    assert tile(tmp_path / "cmu.npz", {"use_annotations": True}) == 0
    assert tile(tmp_path / "all.npz", {}) == 0
    restricted, full = load_grid(tmp_path / "cmu.npz"), load_grid(tmp_path / "all.npz")
    assert 0 < len(restricted) < len(full)
    assert {tuple(c) for c in restricted.coords.tolist()} <= {tuple(c) for c in full.coords.tolist()}
    assert (restricted.coords[:, 1] >= 2000 - 0.5 * restricted.patch_size_level0).all()
    assert restricted.meta["annotations"] == 1
    # a slide without an annotation file is tiled whole, with a warning
    with caplog.at_level(logging.WARNING):
        assert tile(tmp_path / "other.npz", {"use_annotations": True}) == 0
    assert len(load_grid(tmp_path / "other.npz")) == len(full)
    assert any("no annotation file" in r.getMessage() for r in caplog.records)
    # use_annotations without a folder is a configuration error
    assert cli.main(["tile", "--slide", str(CMU), "--mask", str(seg_dir / "mask.png"), "--out",
                     str(tmp_path / "x.npz"), "--params", '{"use_annotations": true}']) == 2


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_mask_for_another_slide_is_refused(tmp_path, capsys):
    seg_dir = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(CMU), "--out-dir", str(seg_dir)]) == 0
    argv = ["tile", "--slide", str(DATA / "boxes.tiff"), "--mask", str(seg_dir / "mask.png"),
            "--out", str(tmp_path / "x.npz"), "--fallback-mpp", "8"]
    assert cli.main(argv) == 2
    assert "rerun `bd segment`" in capsys.readouterr().err


def test_select_cells_of_an_empty_mask_is_empty():
    assert select_cells(np.ones((0, 0)), 0.5, GridGeometry(1.0, 0, 1.0, 1, 0, 0)).shape == (0, 2)


# --- the demo cohort: known artefact positions ------------------------------------------------

@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory):
    from bd.demo import DemoParams, generate_cohort

    out = tmp_path_factory.mktemp("demo")
    generate_cohort(DemoParams(patients=8, slide_size=4096, seed=0, flat_jpeg_fraction=0.25), out, workers=1)
    return out, json.loads((out / "artefacts.json").read_text())


def _truth_tissue(truth: dict, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    for polygon in truth["tissue"]:
        cv2.fillPoly(canvas, [np.round(np.asarray(polygon) / np.asarray(scale) - 0.5).astype(np.int32)], 255)
    return canvas > 0


def _covers(coords: np.ndarray, side: float, points: np.ndarray) -> np.ndarray:
    """(patches x points) whether each patch's footprint contains each point."""
    inside_x = (points[None, :, 0] >= coords[:, None, 0]) & (points[None, :, 0] < coords[:, None, 0] + side)
    inside_y = (points[None, :, 1] >= coords[:, None, 1]) & (points[None, :, 1] < coords[:, None, 1] + side)
    return inside_x & inside_y


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_demo_cohort_pen_marks_dust_and_background_are_excluded(demo_cohort):
    out, truths = demo_cohort
    assert {t["pen"]["colour"] for t in truths.values()} >= {"black"} and len(truths) == 8
    saturated_ink_in_loose_mask = []
    for slide_id, truth in truths.items():
        with open_slide(out / truth["file"], fallback_mpp=truth["mpp"]) as slide:
            seg = segment_slide(slide, SegmentParams())
            grid = tile_slide(slide, seg.mask, seg.scale, TileParams(), slide_id)
            no_area = segment_slide(slide, SegmentParams(min_tissue_area_um2=0)).mask
            loose = segment_slide(slide, SegmentParams(pen_colors=[], dark_value=0, min_tissue_area_um2=0)).mask
        scale = np.asarray(seg.scale)
        to_mask = lambda pts: tuple(np.floor(np.asarray(pts) / scale).astype(int).T[::-1])  # noqa: E731
        tissue = _truth_tissue(truth, seg.mask.shape, seg.scale)
        near_tissue = cv2.dilate(tissue.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        pen = np.asarray(truth["pen"]["path"], dtype=float)
        dust = np.array([[d["x"], d["y"]] for d in truth["dust"]
                         if not near_tissue[to_mask([[d["x"], d["y"]]])].any()], dtype=float).reshape(-1, 2)
        # the mask: no ink, no dust on glass, no glass; the tissue is found
        assert not seg.mask[to_mask(pen)].any(), f"slide {slide_id}: {truth['pen']['colour']} pen in the mask"
        assert not no_area[to_mask(pen)].any(), f"slide {slide_id}: pen rejection alone misses the ink"
        assert len(dust) == 0 or not seg.mask[to_mask(dust)].any(), f"slide {slide_id}: dust in the mask"
        mask = seg.mask > 0
        assert (mask & ~near_tissue).sum() <= 0.01 * mask.sum(), f"slide {slide_id}: glass in the mask"
        assert (mask & tissue).sum() / (mask | tissue).sum() > 0.85, f"slide {slide_id}: tissue missed"
        # the grid: no patch on the ink or on dust, every patch mostly on true tissue
        assert len(grid) >= 10
        side = grid.patch_size_level0
        assert not _covers(grid.coords, side, pen).any()
        reach = 2 * int(np.ceil(side / scale.min())) + 1  # a patch away from any tissue
        far = cv2.dilate(tissue.astype(np.uint8), np.ones((reach, reach), np.uint8)) == 0
        far_dust = dust[far[to_mask(dust)]] if len(dust) else dust
        assert not _covers(grid.coords, side, far_dust).any()
        fine = _truth_tissue(truth, (truth["height"] // 8, truth["width"] // 8), (8.0, 8.0))
        k = int(round(side / 8))
        on_tissue = [fine[y // 8:y // 8 + k, x // 8:x // 8 + k].mean() for x, y in grid.coords]
        assert min(on_tissue) >= 0.35, f"slide {slide_id}: a patch is mostly off the tissue"
        if truth["pen"]["colour"] in ("green", "blue"):
            saturated_ink_in_loose_mask.append(loose[to_mask(pen)].mean() > 0.5 * 255)
    # without pen rejection (and area filter), green and blue ink would have been taken for tissue
    assert saturated_ink_in_loose_mask and all(saturated_ink_in_loose_mask)


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_coarse_slide_is_warned_then_follows_on_slide_error_beyond_max_upsample(tmp_path, caplog):
    seg_dir = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(CMU), "--out-dir", str(seg_dir), "--mpp", "0.75"]) == 0
    tile = lambda out, *extra: cli.main(["tile", "--slide", str(CMU), "--mask", str(seg_dir / "mask.png"),  # noqa: E731
                                         "--out", str(tmp_path / out), *extra])
    with caplog.at_level(logging.WARNING):  # 0.75 um/px: 1.5x upsampling, warned, tiled
        assert tile("warned.npz", "--mpp", "0.75") == 0
    grid = load_grid(tmp_path / "warned.npz")
    assert grid.mpp == 0.75 and grid.meta["mpp_source"] == "sample sheet" and len(grid) > 0
    assert grid.meta["upsample"] == pytest.approx(1.5) and "upsampled 1.50x" in caplog.text
    assert tile("fine.npz") == 0 and load_grid(tmp_path / "fine.npz").meta["warnings"] == []  # 0.499: none
    # 4 um/px (BCNB's preview JPEGs) is 8x: beyond max_upsample 2, a slide error
    assert tile("coarse.npz", "--mpp", "4") == 2 and not (tmp_path / "coarse.npz").exists()
    assert tile("coarse.npz", "--mpp", "4", "--on-error", "skip") == 0
    meta = load_grid(tmp_path / "coarse.npz").meta
    assert meta["error_stage"] == "tile" and "max_upsample" in meta["error"]
    assert tile("allowed.npz", "--mpp", "4", "--params", '{"max_upsample": 8}') == 0
    assert len(load_grid(tmp_path / "allowed.npz")) > 0


LARGE_JPEG_CHILD = r"""
import json, os, sys
from pathlib import Path
import cv2, numpy as np
import bd.slides.flat
from bd import cli
from bd.slides.grid import load_grid
from bd.slides.readers import open_reader, plan_reader

bd.slides.flat.STREAM_PIXELS, bd.slides.flat.BASE_PIXELS = 1 << 20, 1 << 18  # 'large' = above 1 MP here
jpg, work = Path(sys.argv[1]), Path(sys.argv[2])
try:  # OpenCV's pixel guard (set low by the parent) refuses the image whole
    guard = cv2.imread(str(jpg)) is None
except cv2.error:
    guard = True
assert cli.main(["segment", "--slide", str(jpg), "--out-dir", str(work / "seg"), "--fallback-mpp", "0.5"]) == 0
assert cli.main(["tile", "--slide", str(jpg), "--mask", str(work / "seg" / "mask.png"), "--out",
                 str(work / "g.npz"), "--qc", str(work / "g.png"), "--fallback-mpp", "0.5",
                 "--params", json.dumps({"max_patches": 24})]) == 0
grid = load_grid(work / "g.npz")
spec = plan_reader(str(jpg), grid.read_level, grid.read_downsample, grid.read_size, grid.mpp)
reader = open_reader(spec)
x, y = (int(v) for v in grid.coords[0])
patch = reader.read(x, y)
reader.close()
print(json.dumps({"guard": guard, "patches": len(grid), "kind": spec.kind, "copy": spec.read_path,
                  "x": x, "y": y, "patch": patch.astype(float).mean(axis=(0, 1)).tolist()}))
"""


def test_large_flat_jpeg_through_segment_tile_and_reader_in_a_clean_environment(tmp_path, make_rgb, monkeypatch):
    """The child process starts from a clean environment, with OpenCV's pixel guard set *below*
    the JPEG's size: no stage may decode the image whole (the bug conftest's variable hid).
    Then `bd extract` takes the same JPEG directly (here, in this process)."""
    import os
    import subprocess
    import sys

    import bd.slides.flat
    from bd.features.store import read_store

    rgb = make_rgb(3000, 2000, seed=7)
    jpg = tmp_path / "big.jpg"
    assert cv2.imwrite(str(jpg), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_", "BD_"))}
    env["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(2_000_000)  # 6 MP image: a whole decode would be refused
    out = subprocess.run([sys.executable, "-c", LARGE_JPEG_CHILD, str(jpg), str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["guard"] and result["kind"] == "tiff-jpeg" and result["patches"] == 24
    assert not Path(result["copy"]).exists()  # the pyramidal copy is gone with the process
    x, y = result["x"], result["y"]
    want = rgb[y:y + 256, x:x + 256].astype(float).mean(axis=(0, 1))
    np.testing.assert_allclose(result["patch"], want, atol=3)
    monkeypatch.setattr(bd.slides.flat, "STREAM_PIXELS", 1 << 20)
    monkeypatch.setattr(bd.slides.flat, "BASE_PIXELS", 1 << 18)
    params = {"encoder": "resnet18", "out_stage": "layer1", "random_weights": True, "input_size": 32,
              "batch_size": 8, "num_workers": 0, "device": "cpu"}
    assert cli.main(["extract", "--slide", str(jpg), "--grid", str(tmp_path / "g.npz"), "--out",
                     str(tmp_path / "f.zarr"), "--params", json.dumps(params)]) == 0
    store = read_store(tmp_path / "f.zarr")
    assert store.attrs["slide_path"] == str(jpg) and store.attrs["reader"] == "tiff-jpeg"
    assert store.features.shape[0] == 24


def _ink_outlined_slide(path: Path) -> np.ndarray:
    """A demo slide (20x) with blue marker outlines drawn around its tumour regions, as
    pathologists circle them on the glass; written as a flat JPEG. Returns the ink density."""
    from bd.demo.render import INK_OD, _transmit, render_slide

    rendered = render_slide(6000, 0.5, 0.3, np.random.default_rng(0))
    ink = np.zeros(rendered.rgb.shape[:2], np.uint8)
    for polygon in rendered.tumour_polygons:
        cv2.polylines(ink, [np.asarray(polygon, np.int32).reshape(-1, 1, 2)], True, 255, 40, cv2.LINE_AA)
    ink = cv2.GaussianBlur(ink, (0, 0), 40 / 6)
    rgb = cv2.multiply(rendered.rgb, _transmit(ink, INK_OD["blue"], unit=255.0), scale=1 / 255)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    return ink


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_patches_on_ink_outlines_are_dropped(tmp_path):
    """Issue 13: on an ink-outlined slide fewer than 2 % of kept patches hold more than 1 % ink
    (measured on the ink actually drawn, at full resolution); without the filter most do."""
    slide = tmp_path / "ink.jpg"
    ink = _ink_outlined_slide(slide) > 25  # pixels with more than 10 % ink density
    seg = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(slide), "--out-dir", str(seg), "--fallback-mpp", "0.5"]) == 0
    assert (seg / "artefacts.png").is_file()

    def inked(name: str, params: dict) -> tuple[int, float]:
        out = tmp_path / f"{name}.npz"
        assert cli.main(["tile", "--slide", str(slide), "--mask", str(seg / "mask.png"), "--out", str(out),
                         "--fallback-mpp", "0.5", "--params", json.dumps(params)]) == 0
        grid = load_grid(out)
        assert grid.meta["artefact_filter"] == params.get("max_artefact_fraction", 0.0)
        side = int(round(grid.patch_size_level0))
        share = np.array([ink[y:y + side, x:x + side].mean() for x, y in grid.coords])
        return len(grid), float((share > 0.01).mean())

    kept, with_ink = inked("filtered", {})
    kept_all, with_ink_all = inked("unfiltered", {"max_artefact_fraction": None})
    assert kept >= 15 and with_ink < 0.02
    assert with_ink_all > 0.3 and kept_all > kept  # the filter is what removes them


def test_workflow_passes_the_sample_sheets_mpp_to_segment_and_tile(tmp_path):
    """A dry run prints the commands: the slide with an `mpp` gets --mpp, the other does not."""
    import yaml
    from workflow_runs import check, snakemake

    (tmp_path / "slides").mkdir()
    rows = ["slide_id\tpatient_id\tpath\tmpp"]
    for sid, mpp in (("A", "4"), ("B", "")):
        (tmp_path / "slides" / f"{sid}.jpg").write_bytes(b"\xff\xd8\xff")
        rows.append(f"{sid}\t{sid}\t{tmp_path / 'slides' / f'{sid}.jpg'}\t{mpp}")
    (tmp_path / "samples.tsv").write_text("\n".join(rows) + "\n")
    table = ["Patient ID,Age(years),Tumour Size(cm),ER,PR,HER2,ALN status"]
    table += [f"{p},{50 + i},2.{i},Positive,Negative,Negative,{'N0' if i % 2 else 'N+(>2)'}" for i, p in enumerate("ABCDEF")]
    (tmp_path / "clinical.csv").write_text("\n".join(table) + "\n")  # a table the parse-time checks accept
    (tmp_path / "split").mkdir()
    for name, ids in (("train", "AB"), ("val", "CD"), ("test", "EF")):
        (tmp_path / "split" / f"{name}_id.txt").write_text("\n".join(ids) + "\n")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(results=str(tmp_path / "results"), segment_slides_per_job=1)  # one bd segment/tile job a slide
    config["demo"]["enabled"] = False
    config["cohort"].update(sample_sheet=str(tmp_path / "samples.tsv"), clinical_table=str(tmp_path / "clinical.csv"),
                            split_dir=str(tmp_path / "split"), annotations_dir=None)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [str(tmp_path / "results" / "tiles" / f"{s}.npz") for s in "AB"]
    text = check(snakemake(tmp_path, "-n", "-p", *targets)).stdout
    commands = [line.split("Shell command: ", 1)[1] for line in text.splitlines() if "Shell command: bd " in line]
    assert len(commands) == 4, text[-3000:]
    for line in commands:
        assert ("--mpp 4 " in line) == ("/A.jpg" in line), line
        assert "--artefacts" in line or line.startswith("bd segment")
