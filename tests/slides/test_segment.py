"""Tissue segmentation: real slides (SVS, tiled TIFF, flat JPEG), pen and debris rejection, area
filters in square microns, holes, unreadable slides, and the params/config/schema contract."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from bd import cli
from bd.params import build
from bd.slides.segment import SegmentParams, read_mask, segment_slide, tissue_mask
from bd.slides.slide import open_slide

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CMU = DATA / "cmu-1-small-region.svs"

# Checked by eye once (QC image of the default settings): the mask follows the tissue strip,
# leaves out the loose fibres on the right, and covers 34 % of the 2220 x 2967 region.
CMU_TISSUE_FRACTION = (0.31, 0.37)
CMU_TISSUE_BBOX = ((150, 260), (1890, 2000), (40, 140), (2900, 2967))  # x0, x1, y0, y1 ranges


@pytest.fixture(scope="module")
def cmu_seg():
    with open_slide(CMU) as slide:
        return segment_slide(slide, SegmentParams())


def test_cmu_mask_covers_the_tissue(cmu_seg):
    seg = cmu_seg
    assert CMU_TISSUE_FRACTION[0] <= seg.tissue_fraction <= CMU_TISSUE_FRACTION[1]
    ys, xs = np.nonzero(seg.mask)
    sx, sy = seg.scale
    bbox = (xs.min() * sx, (xs.max() + 1) * sx, ys.min() * sy, (ys.max() + 1) * sy)
    for value, (lo, hi) in zip(bbox, CMU_TISSUE_BBOX):
        assert lo <= value <= hi
    hsv = cv2.cvtColor(seg.image, cv2.COLOR_RGB2HSV)
    assert (seg.mask[hsv[..., 1] > 60] > 0).mean() > 0.95  # stained pixels are in the mask
    assert (seg.mask[hsv[..., 1] < 10] > 0).mean() < 0.03  # glass is not
    assert seg.meta["mpp_source"] == "metadata" and seg.mpp == pytest.approx(0.499)
    # the mask's scale maps it exactly onto level 0
    assert seg.scale[0] * seg.mask.shape[1] == pytest.approx(2220)
    assert seg.scale[1] * seg.mask.shape[0] == pytest.approx(2967)


def test_cmu_at_32x_agrees_with_the_finer_mask(cmu_seg):
    with open_slide(CMU) as slide:
        coarse = segment_slide(slide, SegmentParams(min_size=16))
    assert coarse.mask.shape == (round(2967 / 32), round(2220 / 32))
    assert coarse.tissue_fraction == pytest.approx(cmu_seg.tissue_fraction, abs=0.03)


def test_cli_writes_mask_contours_and_qc(tmp_path):
    out = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(CMU), "--out-dir", str(out), "--params", "{}"]) == 0
    mask, info = read_mask(out / "mask.png")
    assert set(np.unique(mask)) <= {0, 255}
    assert info["scale_x"] * info["mask_width"] == pytest.approx(info["level0_width"])
    geo = json.loads((out / "contours.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert geo["properties"]["scale_y"] == info["scale_y"]
    # the level-0 polygons, drawn back at the mask's scale, are the mask
    redrawn = np.zeros_like(mask)
    scale = np.array([info["scale_x"], info["scale_y"]])
    for feature in geo["features"]:
        rings = [np.round(np.asarray(r) / scale - 0.5).astype(np.int32) for r in feature["geometry"]["coordinates"]]
        cv2.fillPoly(redrawn, [rings[0]], 255)
        for hole in rings[1:]:
            cv2.fillPoly(redrawn, [hole], 0)
            cv2.polylines(redrawn, [hole], True, 255)
        assert rings[0][0].tolist() == rings[0][-1].tolist()  # closed rings
    iou = np.logical_and(redrawn, mask).sum() / np.logical_or(redrawn, mask).sum()
    assert iou > 0.98
    qc = cv2.imread(str(out / "qc.png"))
    assert qc is not None and qc.shape[0] > mask.shape[0]


def test_flat_jpeg_is_segmented_through_its_virtual_pyramid(tmp_path, cmu_seg):
    with open_slide(CMU) as slide:
        pixels = slide.read_level(0)
    path = tmp_path / "flat.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    with pytest.warns(UserWarning, match="fallback"):
        slide = open_slide(path, fallback_mpp=0.499)
    with slide:
        seg = segment_slide(slide, SegmentParams())
    assert seg.meta["mpp_source"] == "fallback"
    assert seg.mask.shape == cmu_seg.mask.shape
    iou = np.logical_and(seg.mask, cmu_seg.mask).sum() / np.logical_or(seg.mask, cmu_seg.mask).sum()
    assert iou > 0.95


def _canvas(size: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-4, 5, size=(size, size, 3))
    return np.clip(np.array([238, 236, 240]) + noise, 0, 255).astype(np.uint8)


def test_pen_marks_and_dark_debris_are_cut_out():
    image = _canvas()
    cv2.ellipse(image, (200, 200), (150, 90), 0, 0, 360, (225, 140, 190), -1)  # eosin pink
    cv2.circle(image, (160, 200), 30, (150, 85, 170), -1)  # haematoxylin purple
    inks = {"green": (40, 150, 80), "blue": (40, 60, 170), "black": (45, 45, 50)}
    for i, colour in enumerate(inks.values()):
        cv2.line(image, (20, 60 + 110 * i), (380, 100 + 110 * i), colour, 9)  # across tissue and glass
    cv2.circle(image, (300, 200), 8, (22, 12, 12), -1)  # dark debris on tissue
    cv2.circle(image, (60, 330), 10, (18, 14, 14), -1)  # dark debris on glass
    mask, meta = tissue_mask(image, um_per_px=16.0, params=SegmentParams())
    for i in range(3):
        y = lambda x: round(60 + 110 * i + 40 * (x - 20) / 360)  # noqa: E731
        for x in (40, 120, 200, 280, 360):
            assert mask[y(x), x] == 0, f"ink {list(inks)[i]} at x={x} is in the mask"
    assert mask[200, 300] == 0 and mask[330, 60] == 0
    assert mask[200, 160] == 255 and mask[130, 250] == 255 and mask[260, 120] == 255
    assert 0.2 < (mask > 0).mean() < 0.4
    # without pen rejection the same inks are taken as tissue
    loose, _ = tissue_mask(image, 16.0, SegmentParams(pen_colors=[], dark_value=0))
    assert loose[round(60 + 110 + 40 * 100 / 360), 120] == 255


def test_blank_slide_gives_an_empty_mask():
    mask, meta = tissue_mask(_canvas(seed=3), um_per_px=16.0, params=SegmentParams())
    assert not mask.any()
    assert meta["threshold"] >= SegmentParams().min_saturation


@pytest.mark.parametrize("um_per_px", [2.0, 4.0, 8.0])
def test_area_filters_are_in_square_microns(um_per_px):
    """A 180 um square (32,400 um^2) stays and a 110 um square (12,100 um^2) goes, at any scale;
    a 60 um hole (3,600 um^2) is filled and a 150 um hole (22,500 um^2) is kept."""
    params = SegmentParams(median_blur=3, close_kernel=0)
    image = _canvas(size=int(round(1200 / um_per_px)))
    px = lambda um: int(round(um / um_per_px))  # noqa: E731
    cv2.rectangle(image, (px(50), px(50)), (px(230) - 1, px(230) - 1), (220, 130, 190), -1)
    cv2.rectangle(image, (px(400), px(50)), (px(510) - 1, px(160) - 1), (220, 130, 190), -1)
    cv2.rectangle(image, (px(50), px(500)), (px(1100) - 1, px(1100) - 1), (220, 130, 190), -1)
    cv2.rectangle(image, (px(200), px(650)), (px(260) - 1, px(710) - 1), (238, 236, 240), -1)
    cv2.rectangle(image, (px(600), px(650)), (px(750) - 1, px(800) - 1), (238, 236, 240), -1)
    mask, _ = tissue_mask(image, um_per_px, params)
    assert mask[px(140), px(140)] == 255
    assert mask[px(105), px(455)] == 0
    assert mask[px(680), px(230)] == 255  # small hole filled
    assert mask[px(725), px(675)] == 0  # large hole kept
    from bd.slides.segment import mask_polygons

    polygons = mask_polygons(mask, (um_per_px, um_per_px))
    assert sorted(len(p) for p in polygons) == [1, 2]  # the big piece has exactly one hole


def _main(argv: list[str], caplog) -> int:
    with caplog.at_level(logging.WARNING):
        return cli.main(argv)


@pytest.mark.parametrize("name", ["broken.svs", "unreadable.svs"])
def test_unreadable_slide_skip_writes_empty_outputs(name, tmp_path, caplog):
    out = tmp_path / "seg"
    argv = ["segment", "--slide", str(DATA / name), "--out-dir", str(out), "--on-error", "skip"]
    assert _main(argv, caplog) == 0
    assert any("skipping unreadable slide" in r.getMessage() for r in caplog.records)
    mask, info = read_mask(out / "mask.png")
    assert not mask.any() and name in info["error"]
    assert json.loads((out / "contours.geojson").read_text())["features"] == []
    assert cv2.imread(str(out / "qc.png")) is not None


@pytest.mark.parametrize("name", ["broken.svs", "unreadable.svs"])
def test_unreadable_slide_fail_names_the_file(name, tmp_path, capsys):
    out = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(DATA / name), "--out-dir", str(out)]) == 2
    assert name in capsys.readouterr().err
    assert not (out / "mask.png").exists()


def test_bad_params_name_the_key():
    from bd.errors import ConfigError

    with pytest.raises(ConfigError, match="pen_colors"):
        build(SegmentParams, {"pen_colors": ["purple"]})
    with pytest.raises(ConfigError, match="threshold"):
        build(SegmentParams, {"threshold": "triangle"})
    with pytest.raises(ConfigError, match="median_blur"):
        build(SegmentParams, {"median_blur": 4})


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_greyscale_scan_is_segmented_by_darkness_not_left_empty(tmp_path: Path, svs_path: Path) -> None:
    """A greyscale slide has no saturation: its tissue is found as what is dark (issue 13: never a
    silent empty bag), close to the colour slide's mask."""
    with open_slide(svs_path) as slide:
        colour = segment_slide(slide, SegmentParams())
        rgb = slide.read_level(0)
    grey_path = tmp_path / "grey.jpg"
    assert cv2.imwrite(str(grey_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    out = tmp_path / "seg"
    assert cli.main(["segment", "--slide", str(grey_path), "--out-dir", str(out), "--mpp", "0.499"]) == 0
    mask, info = read_mask(out / "mask.png")
    assert info["channel"] == "darkness" and colour.meta["channel"] == "saturation"
    a, b = mask > 0, colour.mask > 0
    assert a.mean() > 0.2 and (a & b).sum() / (a | b).sum() > 0.7
    grid = tmp_path / "grey.npz"
    assert cli.main(["tile", "--slide", str(grey_path), "--mask", str(out / "mask.png"), "--out", str(grid),
                     "--mpp", "0.499"]) == 0
    from bd.slides.grid import load_grid

    assert len(load_grid(grid)) > 20
