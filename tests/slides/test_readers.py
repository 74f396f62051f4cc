"""Patch readers: the stored-JPEG-tile reader gives OpenSlide's pixels, decodes each tile once,
and falls back to bd.slides.slide for every other format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from bd.errors import SlideError
from bd.slides.readers import (
    ReadSpec,
    SlideReader,
    TiffJpegReader,
    fast_path_supported,
    open_reader,
    plan_reader,
)


def write_jpeg_pyramid(path: Path, rgb: np.ndarray, levels: int, tile: int, colorspace: str) -> Path:
    """A generic JPEG-tiled pyramidal TIFF (one page per level), as OpenSlide's generic-tiff."""
    with tifffile.TiffWriter(path) as tif:
        level = rgb
        for i in range(levels):
            tif.write(
                level, tile=(tile, tile), photometric="rgb", compression="jpeg",
                compressionargs={"level": 90, "outcolorspace": colorspace},
                subfiletype=1 if i else 0, maxworkers=1,
            )
            level = level[::2, ::2].copy()
    return path


def openslide_rgb(slide: openslide.OpenSlide, x: int, y: int, level: int, size: int) -> np.ndarray:
    rgba = np.asarray(slide.read_region((x, y), level, (size, size)))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255  # transparent (outside the slide) -> white, as bd.slides.slide
    return rgb


@pytest.fixture(scope="module", params=["ycbcr", "rgb"])
def pyramid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, make_rgb) -> Path:
    """1000 x 760 (odd level sizes), 3 levels, 128 px tiles, YCbCr- or RGB-coded JPEG."""
    path = tmp_path_factory.mktemp("pyr") / f"pyramid-{request.param}.tif"
    return write_jpeg_pyramid(path, make_rgb(1000, 760, seed=3), 3, 128, request.param)


def assert_same_pixels(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"max abs difference {diff.max()}"  # libjpeg-turbo builds may differ by 1
    assert diff.mean() < 0.01


def random_positions(rng: np.random.Generator, width: int, height: int, size: int, ds: int, n: int):
    """Level-aligned level-0 positions, some overlapping the borders."""
    xs = rng.integers(-size * ds // 2, width, n) // ds * ds
    ys = rng.integers(-size * ds // 2, height, n) // ds * ds
    return list(zip(xs.tolist(), ys.tolist()))


def test_svs_pixels_equal_openslide(svs_path: Path) -> None:
    """Aperio: abbreviated JPEG streams with shared tables, RGB-coded (APP14 needed)."""
    spec = plan_reader(str(svs_path), 0, 1.0, 300)
    assert spec.kind == "tiff-jpeg"
    reader, slide = open_reader(spec), openslide.OpenSlide(str(svs_path))
    rng = np.random.default_rng(0)
    for x, y in random_positions(rng, 2220, 2967, 300, 1, 25) + [(0, 0), (2100, 2900)]:
        assert_same_pixels(reader.read(x, y), openslide_rgb(slide, x, y, 0, 300))


def test_generic_tiff_pixels_equal_openslide_at_every_level(pyramid: Path) -> None:
    slide = openslide.OpenSlide(str(pyramid))
    assert openslide.OpenSlide.detect_format(str(pyramid)) == "generic-tiff"
    rng = np.random.default_rng(1)
    for level, ds in enumerate(slide.level_downsamples):
        ds_int = int(round(ds))
        reader = open_reader(plan_reader(str(pyramid), level, ds, 150))
        assert isinstance(reader, TiffJpegReader)
        for x, y in random_positions(rng, 1000, 760, 150, ds_int, 12):
            assert_same_pixels(reader.read(x, y), openslide_rgb(slide, x, y, level, 150))


def test_demo_slides_take_the_fast_path(tmp_path: Path, make_rgb) -> None:
    """The demo's Aperio-like pyramids are read from their stored tiles, with OpenSlide's pixels."""
    from bd.demo.slidefile import write_pyramid_tiff

    path = write_pyramid_tiff(tmp_path / "1.tif", make_rgb(1100, 900, seed=5), mpp=0.5)
    spec = plan_reader(str(path), 0, 1.0, 256)
    assert spec.kind == "tiff-jpeg"
    reader, slide = open_reader(spec), openslide.OpenSlide(str(path))
    for x, y in [(0, 0), (256, 512), (1000, 800), (-50, 10)]:
        assert_same_pixels(reader.read(x, y), openslide_rgb(slide, x, y, 0, 256))


def test_each_tile_is_decoded_once(pyramid: Path) -> None:
    """Patches of 200 px over 128 px tiles share tiles: every tile is decoded exactly once."""
    reader = open_reader(plan_reader(str(pyramid), 0, 1.0, 200))
    for y in range(0, 760, 200):
        for x in range(0, 1000, 200):
            reader.read(x, y)
    assert reader.decoded == 8 * 6  # ceil(1000 / 128) x ceil(760 / 128) tiles


def test_outside_the_slide_is_white(pyramid: Path) -> None:
    reader = open_reader(plan_reader(str(pyramid), 0, 1.0, 64))
    assert (reader.read(5000, 5000) == 255).all()
    edge = reader.read(980, 740)  # 20 x 20 pixels inside, the rest outside
    assert (edge[20:] == 255).all() and (edge[:, 20:] == 255).all()
    assert (edge[:20, :20] < 255).any()


def test_other_formats_fall_back_to_bd_slide(tiled_tiff_path: Path, flat_jpeg: Path) -> None:
    """boxes.tiff is deflate-tiled, the flat JPEG is no pyramid: both go through bd.slides.slide."""
    from bd.slides.slide import open_slide

    for path in (tiled_tiff_path, flat_jpeg):
        spec = plan_reader(str(path), 0, 1.0, 64, mpp=0.5)
        assert spec.kind == "slide"
        reader = open_reader(spec)
        assert isinstance(reader, SlideReader)
        ref = open_slide(path, fallback_mpp=0.5).read_region((10, 20), 0, (64, 64))
        np.testing.assert_array_equal(reader.read(10, 20), ref)


def test_level_without_matching_page_is_not_fast(pyramid: Path) -> None:
    assert fast_path_supported(str(pyramid), 1, 2.0)
    assert not fast_path_supported(str(pyramid), 1, 3.0)  # no page is a third of level 0
    with pytest.raises(SlideError, match="not a JPEG-tiled TIFF page"):
        TiffJpegReader(ReadSpec(str(pyramid), 1, 3.0, 64, kind="tiff-jpeg"))


def test_unreadable_tile_names_slide_and_region(data_dir: Path) -> None:
    path = str(data_dir / "unreadable.svs")
    for kind in ("auto", "slide"):
        reader = open_reader(plan_reader(path, 0, 1.0, 16, prefer=kind))
        with pytest.raises(SlideError) as info:
            reader.read(0, 0)
        message = str(info.value)
        assert path in message and "x=0, y=0, level=0" in message


def test_unknown_reader_is_an_error(svs_path: Path) -> None:
    with pytest.raises(SlideError, match="unknown reader"):
        plan_reader(str(svs_path), 0, 1.0, 64, prefer="nvjpeg")


# ---------------------------------------------------------------- tile decoding


def test_decode_tile_equals_libjpeg_turbo_through_opencv(make_rgb) -> None:
    """A complete YCbCr JPEG decodes to the same pixels as cv2.imdecode (both libjpeg-turbo)."""
    import cv2

    from bd.slides.readers import decode_tile

    rgb = make_rgb(96, 64, seed=1)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    ref = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ours = decode_tile(encoded.tobytes(), None, rgb=False)
    assert ours.shape == (64, 96, 3) and np.array_equal(ours, ref)


def test_svs_tiles_with_shared_tables_decode_like_tifffile(svs_path: Path) -> None:
    """Abbreviated Aperio streams (RGB-coded, tables in the page) read the same as tifffile's page."""
    with tifffile.TiffFile(svs_path) as tif:
        page = tif.pages[0]
        assert page.jpegtables and page.photometric == 2  # RGB-coded tiles with shared tables
        ref = page.asarray()
    reader = TiffJpegReader(ReadSpec(str(svs_path), 0, 1.0, 200, kind="tiff-jpeg"))
    for x, y in [(0, 0), (230, 470), (1000, 1200)]:
        np.testing.assert_array_equal(reader.read(x, y), ref[y : y + 200, x : x + 200])
    reader.close()


def test_truncated_and_corrupt_tiles_are_errors_naming_the_tile(tmp_path: Path, pyramid: Path) -> None:
    from bd.slides.readers import decode_tile

    with tifffile.TiffFile(pyramid) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
        tables = page.jpegtables
    data = pyramid.read_bytes()
    tile = data[offset : offset + count]
    with pytest.raises(SlideError, match="truncated"):
        decode_tile(tile[: count // 2], tables, rgb=False)  # libjpeg would pad it with grey
    with pytest.raises(SlideError, match="failed to decode"):
        decode_tile(b"\xff\xd8not a jpeg\xff\xd9", tables, rgb=False)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: offset + count // 2])  # the first tile runs past the end of the file
    reader = TiffJpegReader(ReadSpec(str(cut), 0, 1.0, 64, kind="tiff-jpeg"))
    with pytest.raises(SlideError, match=r"row 0, column 0.*truncated|truncated.*row 0, column 0") as info:
        reader.read(0, 0)
    assert str(cut) in str(info.value) and "x=0, y=0" in str(info.value)
    reader.close()
