"""bd.slides.slide on real scanner files (tests/data) and on flat images written here."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from bd.cli import main as bd_main
from bd.errors import SlideError
from bd.slides.slide import SlideWarning, open_slide


def test_fixture_files_match_sha256sums(data_dir: Path) -> None:
    lines = (data_dir / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split()) for line in lines if line.strip())
    assert set(sums) == {"cmu-1-small-region.svs", "small.svs", "boxes.tiff", "unreadable.svs", "broken.svs"}
    for name, digest in sums.items():
        assert hashlib.sha256((data_dir / name).read_bytes()).hexdigest() == digest, name


def test_svs_opens_with_size_levels_mpp_and_objective(svs_path: Path) -> None:
    with open_slide(svs_path) as slide:
        assert slide.format == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1 and slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "metadata"
        assert slide.objective_power == 20.0
        assert slide.properties["openslide.vendor"] == "aperio"


def test_svs_read_region_equals_openslide(svs_path: Path) -> None:
    reference = openslide.OpenSlide(str(svs_path))
    with open_slide(svs_path) as slide:
        for location, size in [((0, 0), (64, 48)), ((1000, 1500), (256, 256)), ((2100, 2900), (120, 67))]:
            region = slide.read_region(location, 0, size)
            expected = np.asarray(reference.read_region(location, 0, size).convert("RGB"))
            assert region.dtype == np.uint8 and region.shape == (size[1], size[0], 3)
            np.testing.assert_array_equal(region, expected)
        thumb = slide.get_thumbnail((100, 100))
        assert thumb.shape == (100, 75, 3) and thumb.dtype == np.uint8
        assert 100 < thumb.mean() < 250  # tissue, not a blank image
    reference.close()


def test_tiled_tiff_levels_and_fallback_mpp(tiled_tiff_path: Path) -> None:
    with pytest.raises(SlideError, match=r"boxes\.tiff.*fallback_mpp"):
        open_slide(tiled_tiff_path)
    with pytest.warns(SlideWarning, match=r"boxes\.tiff"):
        slide = open_slide(tiled_tiff_path, fallback_mpp=0.25)
    with slide:
        assert slide.format == "generic-tiff"
        assert slide.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert slide.level_downsamples == (1.0, 2.0, 4.0, 300 / 37)
        assert (slide.mpp, slide.mpp_source, slide.objective_power) == (0.25, "fallback", None)
        assert [slide.get_best_level_for_downsample(d) for d in (0.5, 1, 1.9, 2, 3.99, 4.02, 8, 100)] == [
            0, 0, 0, 1, 2, 2, 2, 3]
        assert slide.read_level(3).shape == (31, 37, 3)
        edge = slide.read_region((250, 200), 0, (100, 100))  # 50 px inside, 50 px beyond each border
        inside = np.asarray(openslide.OpenSlide(str(tiled_tiff_path)).read_region((250, 200), 0, (50, 50)))
        np.testing.assert_array_equal(edge[:50, :50], inside[..., :3])
        assert (edge[:50, :50] != 255).any()  # the boxes reach into the corner
        assert (edge[50:, :] == 255).all() and (edge[:, 50:] == 255).all()


def test_small_svs(data_dir: Path) -> None:
    with open_slide(data_dir / "small.svs") as slide:
        assert slide.dimensions == (16, 16)
        assert slide.read_level(0).shape == (16, 16, 3)


def test_unreadable_svs_fails_on_read_naming_the_file(data_dir: Path) -> None:
    with open_slide(data_dir / "unreadable.svs") as slide:
        with pytest.raises(SlideError, match=r"unreadable\.svs.*Bogus marker length"):
            slide.read_region((0, 0), 0, (16, 16))


def test_non_slide_files_fail_at_open_naming_the_file(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"broken\.svs.*not a slide"):
        open_slide(data_dir / "broken.svs")
    (tmp_path / "empty.svs").touch()
    with pytest.raises(SlideError, match=r"empty\.svs.*empty"):
        open_slide(tmp_path / "empty.svs")
    with pytest.raises(SlideError, match=r"missing\.svs.*not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(SlideError, match=r"notes\.txt.*'\.txt'"):
        open_slide(tmp_path / "notes.txt", fallback_mpp=0.5)
    with pytest.raises(SlideError, match="positive"):
        open_slide(data_dir / "boxes.tiff", fallback_mpp=-1.0)


def test_flat_jpeg_reads_like_a_pyramid(flat_jpeg: Path, flat_rgb: np.ndarray) -> None:
    with pytest.warns(SlideWarning, match=r"1\.jpg"):
        slide = open_slide(flat_jpeg, fallback_mpp=0.5)
    decoded = cv2.cvtColor(cv2.imread(str(flat_jpeg)), cv2.COLOR_BGR2RGB)
    assert np.abs(decoded.astype(int) - flat_rgb).mean() < 6  # the file holds the synthetic image
    with slide:
        assert (slide.format, slide.mpp, slide.mpp_source) == ("flat-jpeg", 0.5, "fallback")
        assert slide.level_dimensions == ((3000, 2000), (1500, 1000), (750, 500))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(slide.read_region((1234, 567), 0, (300, 200)), decoded[567:767, 1234:1534])
        half = cv2.resize(decoded, (1500, 1000), interpolation=cv2.INTER_AREA)
        region = slide.read_region((1000, 600), 1, (256, 128)).astype(int)
        assert np.abs(region - half[300:428, 500:756]).max() <= 2
        assert slide.read_level(2).shape == (500, 750, 3)
        edge = slide.read_region((2900, 1950), 0, (200, 100))
        np.testing.assert_array_equal(edge[:50, :100], decoded[1950:, 2900:])
        assert (edge[50:] == 255).all() and (edge[:, 100:] == 255).all()
        assert (slide.read_region((-128, -128), 2, (32, 32)) == 255).all()  # level-2 px -32..-1
        corner = slide.read_region((-64, -64), 2, (32, 32))  # half before the top-left corner
        np.testing.assert_array_equal(corner[16:, 16:], slide.read_level(2)[:16, :16])
        assert (corner[:16] == 255).all() and (corner[:, :16] == 255).all()
        assert slide.get_thumbnail((300, 300)).shape == (200, 300, 3)
        assert slide.get_best_level_for_downsample(3.0) == 1


def test_flat_png_with_alpha_and_metadata_mpp(tmp_path: Path, make_rgb: Callable[..., np.ndarray]) -> None:
    rgb = make_rgb(700, 600, seed=1)
    alpha = np.full((600, 700, 1), 255, np.uint8)
    alpha[:100, :100] = 0
    path = tmp_path / "slide.png"
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(path, dpi=(50800, 50800))
    with open_slide(path) as slide:
        assert (slide.format, slide.mpp_source) == ("flat-png", "metadata")
        assert slide.mpp == pytest.approx(0.5, rel=1e-3)  # PNG stores pixels per metre
        assert slide.level_dimensions == ((700, 600), (350, 300))
        pixels = slide.read_level(0)
        assert (pixels[:100, :100] == 255).all()
        np.testing.assert_array_equal(pixels[100:, 100:], rgb[100:, 100:])


def test_flat_jpeg_dpi_and_flat_tiff(tmp_path: Path, make_rgb: Callable[..., np.ndarray]) -> None:
    rgb = make_rgb(640, 520, seed=2)
    Image.fromarray(rgb).save(tmp_path / "dpi.jpg", dpi=(50800, 50800), quality=95)
    with open_slide(tmp_path / "dpi.jpg") as slide:
        assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.5), "metadata")
    tifffile.imwrite(tmp_path / "flat.tif", rgb, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "flat.tif") as slide:  # untiled: OpenSlide refuses it
        assert (slide.format, slide.mpp, slide.mpp_source) == ("flat-tiff", 0.25, "metadata")
        np.testing.assert_array_equal(slide.read_level(0), rgb)
    grey = np.tile(np.linspace(0, 65535, 640).astype(np.uint16), (520, 1))  # 16-bit ramp
    tifffile.imwrite(tmp_path / "grey.tif", grey, resolution=(72, 72), resolutionunit="INCH")
    with pytest.warns(SlideWarning):  # 72 dpi is a default, not a scanner resolution
        slide = open_slide(tmp_path / "grey.tif", fallback_mpp=0.5)
    with slide:
        pixels = slide.read_level(0)
        assert pixels.shape == (520, 640, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        assert (pixels[:, 0] == 0).all() and (pixels[:, -1] == 255).all()
        assert (np.diff(pixels[0, :, 0].astype(int)) >= 0).all()


@pytest.mark.parametrize("name", ["cut.jpg", "cut.tif", "cut.png", "cut-tiled.tif"])
def test_truncated_files_raise(tmp_path: Path, name: str, make_rgb: Callable[..., np.ndarray]) -> None:
    rgb = make_rgb(600, 600, seed=3)
    whole = tmp_path / ("whole" + Path(name).suffix)
    if name == "cut.jpg":
        cv2.imwrite(str(whole), rgb)
    elif name == "cut.png":
        cv2.imwrite(str(whole), rgb)
    else:
        tile = {"tile": (128, 128), "compression": "jpeg"} if "tiled" in name else {}
        tifffile.imwrite(whole, rgb, resolution=(20000, 20000), resolutionunit="CENTIMETER", **tile)
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=name.replace(".", r"\.")), warnings.catch_warnings():
        warnings.simplefilter("ignore", SlideWarning)
        with open_slide(tmp_path / name, fallback_mpp=0.5) as slide:
            slide.read_level(0)


def test_slide_info_command(svs_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bd_main(["slide-info", "--slide", str(svs_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "aperio" and info["dimensions"] == [2220, 2967]
    assert (info["mpp"], info["mpp_source"], info["objective_power"]) == (0.499, "metadata", 20.0)
    with pytest.warns(SlideWarning):
        assert bd_main(["slide-info", "--slide", str(data_dir / "boxes.tiff"), "--fallback-mpp", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "generic-tiff" in out and "300 x 250" in out and "0.5 (fallback)" in out and "level 3" in out
    assert bd_main(["slide-info", "--slide", str(data_dir / "broken.svs")]) == 2
    assert "broken.svs" in capsys.readouterr().err


# --- large flat images, bit depth and colour, error kinds (issue 13) ---------------------------

@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make 'large' small: images above 2**20 pixels are streamed, never decoded whole."""
    import bd.slides.flat as slide_mod

    monkeypatch.setattr(slide_mod, "STREAM_PIXELS", 1 << 20)
    monkeypatch.setattr(slide_mod, "BASE_PIXELS", 1 << 18)


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
def test_large_flat_jpeg_is_streamed_and_read_through_a_pyramidal_copy(
        streamed: None, tmp_path: Path, make_rgb: Callable[..., np.ndarray]) -> None:
    rgb = make_rgb(3001, 2003, seed=5)
    path = tmp_path / "big.jpg"
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    with open_slide(path, fallback_mpp=0.5) as slide:
        assert slide.streamed and slide.base_level == 2 and slide.level_dimensions[2] == (750, 500)
        coarse = slide.read_level(2)  # a reduced decode (libjpeg DCT scaling)
        expected = cv2.resize(rgb, (750, 500), interpolation=cv2.INTER_AREA)
        assert coarse.shape == (500, 750, 3) and np.abs(coarse.astype(int) - expected).mean() < 3
        with pytest.raises(SlideError, match="too large to hold"):
            slide.level_pixels(0)
        patch = slide.read_region((1000, 700), 0, (256, 256))  # level 0: from the pyramidal copy
        assert np.abs(patch.astype(int) - rgb[700:956, 1000:1256]).mean() < 4
        copy = slide.pyramid_path()
    with openslide.OpenSlide(str(copy)) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert osr.level_dimensions[:3] == ((3001, 2003), (1500, 1001), (750, 500))


def _write(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.filterwarnings("ignore::bd.slides.slide.SlideWarning")
@pytest.mark.parametrize("kind", ["grey-jpeg", "palette-png", "16bit-png", "12bit-in-16bit-tiff",
                                  "12bit-tiled-tiff", "grey-alpha-png"])
def test_grey_palette_and_deep_slides_read_as_8bit_rgb(kind: str, tmp_path: Path,
                                                       make_rgb: Callable[..., np.ndarray]) -> None:
    rgb = make_rgb(640, 520, seed=3)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if kind == "grey-jpeg":
        path, want = _write(tmp_path / "g.jpg", grey), np.repeat(grey[..., None], 3, -1)
    elif kind == "palette-png":
        pal = Image.fromarray(rgb).quantize(64)
        pal.save(tmp_path / "p.png")
        path, want = tmp_path / "p.png", np.asarray(pal.convert("RGB"))
    elif kind == "16bit-png":
        path, want = _write(tmp_path / "d.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257), rgb
    elif kind == "grey-alpha-png":
        Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA").save(tmp_path / "la.png")
        path, want = tmp_path / "la.png", np.repeat(grey[..., None], 3, -1)
    else:  # 12-bit samples in 16-bit words: 4095 is white, not 1/16 of it
        twelve = ((rgb.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)
        path, want = tmp_path / f"{kind}.tif", rgb
        tile = {"tile": (256, 256)} if kind == "12bit-tiled-tiff" else {}
        tifffile.imwrite(path, twelve, photometric="rgb", **tile)
    with open_slide(path, fallback_mpp=0.5) as slide:
        pixels = slide.read_level(0)
    assert pixels.dtype == np.uint8 and pixels.shape == (520, 640, 3)
    assert np.abs(pixels.astype(int) - want).max() <= (12 if kind == "grey-jpeg" else 1)


def test_environment_errors_are_not_slide_errors(svs_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from bd.errors import ResourceError, environment_reason, slide_fault

    assert isinstance(slide_fault("x", OSError(errno.ENOSPC, "No space left on device")), ResourceError)
    assert isinstance(slide_fault("x", MemoryError()), ResourceError)
    assert isinstance(slide_fault("x", cv2.error("OpenCV(4.10) Insufficient memory")), ResourceError)
    assert type(slide_fault("x", OSError(errno.EINVAL, "bad JPEG marker"))) is SlideError
    assert environment_reason(ValueError("Not a JPEG file")) is None
    with open_slide(svs_path) as slide:
        def full(*_: object) -> np.ndarray:
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(slide, "_read", full)
        with pytest.raises(ResourceError, match="not a fault of the slide"):
            slide.read_region((0, 0), 0, (16, 16))
        monkeypatch.setattr(slide, "_read", lambda *_: (_ for _ in ()).throw(OSError(errno.EBADMSG, "corrupt")))
        with pytest.raises(SlideError):
            slide.read_region((0, 0), 0, (16, 16))


def test_out_of_memory_in_segmentation_fails_the_job_even_under_skip(
        svs_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import bd.slides.segment

    def oom(*_: object, **__: object) -> None:
        raise cv2.error("OpenCV(4.10.0) alloc.cpp:73: error: (-4:Insufficient memory) "
                        "Failed to allocate 6400000000 bytes")

    monkeypatch.setattr(bd.slides.segment, "tissue_mask", oom)
    out = tmp_path / "seg"
    assert bd_main(["segment", "--slide", str(svs_path), "--out-dir", str(out), "--on-error", "skip"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "give the job more memory" in err
    assert not (out / "mask.json").exists()  # not recorded as an unreadable slide
    monkeypatch.setattr(bd.slides.segment, "tissue_mask", lambda *_a, **_k: (_ for _ in ()).throw(MemoryError()))
    assert bd_main(["segment", "--slide", str(svs_path), "--out-dir", str(out), "--on-error", "skip"]) == 2
    assert "out of memory" in capsys.readouterr().err and not (out / "mask.json").exists()


def test_sample_sheet_mpp_overrides_metadata_with_a_warning(svs_path: Path) -> None:
    with pytest.warns(SlideWarning, match="sample sheet says 4"):
        slide = open_slide(svs_path, mpp=4.0)
    with slide:
        assert (slide.mpp, slide.mpp_source) == (4.0, "sample sheet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_slide(svs_path, mpp=0.5) as slide:  # agrees with the metadata's 0.499: no warning
            assert slide.mpp == 0.5
