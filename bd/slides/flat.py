"""Flat images (BCNB's JPEGs, PNG, untiled TIFF) as slides: a virtual pyramid of downsample-by-2
levels. A small image is decoded once, on first pixel access; a large one (more than
``STREAM_PIXELS``) is never held whole: coarse levels are decoded at reduced size by libvips, fine
levels read from a pyramidal JPEG-tiled TIFF copy written once per process (:func:`pyramid_copy`)."""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import JpegImagePlugin, PngImagePlugin

import cv2
from bd.errors import SlideError, slide_fault
from bd.slides.base import OpenSlideSlide, Slide, _float, resolve_mpp, sample_top, to_rgb

log = logging.getLogger(__name__)


MIN_LEVEL_SIDE = 512  # the virtual pyramid halves until the smaller side drops below this


_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre


# Flat images above this many pixels are streamed (never decoded whole): 2**26 is 200 MB as RGB,
# far below OpenCV's 2**30-pixel guard, so no decode ever depends on OPENCV_IO_MAX_IMAGE_PIXELS.
STREAM_PIXELS = 1 << 26


BASE_PIXELS = 1 << 25  # a streamed image's finest level decoded in memory is at most this big


# JPEG quality of the pyramidal copy's tiles: below 90 libvips writes YCbCr 4:2:0 tiles, as scanners
# do; from 90 on it writes RGB tiles, 4-5x larger and slower to write.
PYRAMID_QUALITY = 85


PYRAMID_TILE = 256


@dataclass(frozen=True)
class FlatFormat:
    """How to recognise, inspect and decode one flat image format."""

    magics: tuple[bytes, ...]
    header: Callable[[Path], tuple[int, int, float | None, dict[str, str]]]  # -> w, h, mpp, props
    decode: Callable[[Path], np.ndarray]  # -> decoded samples (any depth; BGR order from OpenCV)


def _pil_header(plugin: type) -> Callable[[Path], tuple[int, int, float | None, dict[str, str]]]:
    """Size and DPI from a PIL plugin's header parse (no pixel decode, no decompression-bomb cap)."""
    def header(path: Path) -> tuple[int, int, float | None, dict[str, str]]:
        try:
            with plugin(str(path)) as im:
                (w, h), dpi = im.size, im.info.get("dpi")
        except (SyntaxError, OSError, ValueError) as exc:
            raise SlideError(f"{path}: not a readable image header: {exc}") from exc
        dpi_x = _float(dpi[0]) if dpi else None
        props = {"flat.dpi-x": f"{dpi_x:g}"} if dpi_x else {}
        return w, h, 25400.0 / dpi_x if dpi_x else None, props
    return header


def _jpeg_header(path: Path) -> tuple[int, int, float | None, dict[str, str]]:
    """JPEG header; a file without an end-of-image marker near its end is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(size - min(size // 2, 1 << 20))
        if b"\xff\xd9" not in fh.read():
            raise SlideError(f"{path}: truncated JPEG (no end-of-image marker); re-copy the file")
    return _pil_header(JpegImagePlugin.JpegImageFile)(path)


def _cv2_decode(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise SlideError(f"{path}: OpenCV cannot decode the image (corrupt or truncated)")
    return pixels  # BGR(A) or grey, any depth: to_rgb(pixels, bgr=True)


def _tiff_header(path: Path) -> tuple[int, int, float | None, dict[str, str]]:
    """First page's size and resolution; strips or tiles past the end of file mean truncation."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            w, h, tags = page.imagewidth, page.imagelength, page.tags
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
            xres = tags.get("XResolution")
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
        raise SlideError(f"{path}: not a readable TIFF: {exc}") from exc
    if end > path.stat().st_size:
        raise SlideError(f"{path}: truncated TIFF (pixel data ends past the file's end); re-copy the file")
    per_unit = _float(xres.value[0] / xres.value[1]) if xres and xres.value[1] else None
    mpp = _UM_PER_UNIT[unit] / per_unit if per_unit and unit in _UM_PER_UNIT else None
    return w, h, mpp, {"flat.resolution-unit": str(unit)} if per_unit else {}


def _tiff_decode(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        pixels = page.asarray()
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            pixels = (page.colormap.T[pixels] >> 8).astype(np.uint8)
        elif page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and pixels.ndim == 3:
            pixels = np.moveaxis(pixels, 0, -1)
    return pixels


FLAT_FORMATS: dict[str, FlatFormat] = {
    "flat-jpeg": FlatFormat((b"\xff\xd8\xff",), _jpeg_header, _cv2_decode),
    "flat-png": FlatFormat((b"\x89PNG\r\n\x1a\n",), _pil_header(PngImagePlugin.PngImageFile), _cv2_decode),
    "flat-tiff": FlatFormat((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff_header, _tiff_decode),
}


def virtual_pyramid(width: int, height: int) -> tuple[tuple[int, int], ...]:
    """Level sizes halving (floor) from level 0 until the smaller side is below MIN_LEVEL_SIDE."""
    dims = [(width, height)]
    while min(dims[-1]) >= MIN_LEVEL_SIDE:
        dims.append((dims[-1][0] // 2, dims[-1][1] // 2))
    return tuple(dims)


class FlatSlide(Slide):
    """A flat image. Small: decoded once on first use, level k is level k-1 halved with
    INTER_AREA. Large (``streamed``): coarse levels decoded at reduced size by libvips, fine
    levels read from a pyramidal copy (:func:`pyramid_copy`); the whole image is never in memory."""

    def __init__(self, path: Path, format: str, fallback_mpp: float | None, mpp: float | None = None) -> None:
        self._spec = FLAT_FORMATS[format]
        w, h, metadata_mpp, props = self._spec.header(path)
        mpp, source = resolve_mpp(path, metadata_mpp, fallback_mpp, mpp)
        super().__init__(path, format, virtual_pyramid(w, h), mpp, source, None, props)
        self._levels: list[np.ndarray | None] = [None] * self.level_count
        self._lock = threading.Lock()
        self.streamed = w * h > STREAM_PIXELS
        self.base_level = _base_level(self.level_dimensions) if self.streamed else 0
        self.top: float | None = None  # white level of the samples, set by the first decode
        self._pyramid: Slide | None = None

    def level_pixels(self, level: int) -> np.ndarray:
        """The cached RGB array of one level (read-only; decodes and downsamples on first use)."""
        if level < self.base_level:
            raise SlideError(f"{self.path}: level {level} of this {self.dimensions[0]} x {self.dimensions[1]} "
                             "image is too large to hold in memory; it is read from the pyramidal copy")
        with self._lock:
            base = self.base_level
            if self._levels[base] is None:
                pixels = self._decode_base()
                if (pixels.shape[1], pixels.shape[0]) != self.level_dimensions[base]:
                    raise SlideError(f"{self.path}: decoded size {pixels.shape[1]} x {pixels.shape[0]} "
                                     f"differs from the header's {self.dimensions[0]} x {self.dimensions[1]}")
                pixels.flags.writeable = False
                self._levels[base] = pixels
            for k in range(base + 1, level + 1):
                if self._levels[k] is None:
                    smaller = cv2.resize(self._levels[k - 1], self.level_dimensions[k],
                                         interpolation=cv2.INTER_AREA)
                    smaller.flags.writeable = False
                    self._levels[k] = smaller
            return self._levels[level]

    def _decode_base(self) -> np.ndarray:
        """RGB of the base level: the whole image (small), or a libvips reduced decode (streamed)."""
        if not self.streamed:
            raw = self._spec.decode(self.path)
            self.top = sample_top(raw) if raw.dtype != np.uint8 else 255.0
            return to_rgb(raw, bgr=self._spec.decode is _cv2_decode, top=self.top)
        raw = vips_shrunk(self.path, 2**self.base_level)
        self.top = sample_top(raw)
        return fit_to(to_rgb(raw, top=self.top), self.level_dimensions[self.base_level])

    def pyramid_path(self) -> Path:
        """The pyramidal JPEG-tiled TIFF copy of this streamed image (written once per process)."""
        if self.top is None and self._needs_top():
            self.level_pixels(self.base_level)
        return pyramid_copy(self.path, self.mpp, self.top or 255.0)

    def _needs_top(self) -> bool:
        import pyvips

        return pyvips.Image.new_from_file(str(self.path)).format != "uchar"

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        if level < self.base_level:
            if self._pyramid is None:
                self._pyramid = OpenSlideSlide(self.pyramid_path(), "generic-tiff", self.mpp)
            return self._pyramid._read(x, y, level, w, h)
        pixels = self.level_pixels(level)
        ds = self.level_downsamples[level]
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, pixels.shape[1]), min(ly + h, pixels.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._levels = [None] * self.level_count
        if self._pyramid is not None:
            self._pyramid.close()
            self._pyramid = None


def _base_level(dims: tuple[tuple[int, int], ...]) -> int:
    """The finest level of a streamed image small enough to decode whole (at least level 1)."""
    return next((k for k, (w, h) in enumerate(dims) if k and w * h <= BASE_PIXELS), len(dims) - 1)


def fit_to(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` cropped or padded with white to ``size`` (w, h): reduced decodes round up."""
    w, h = size
    if abs(pixels.shape[1] - w) > 2 or abs(pixels.shape[0] - h) > 2:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    out = np.full((h, w, 3), 255, np.uint8)
    ch, cw = min(h, pixels.shape[0]), min(w, pixels.shape[1])
    out[:ch, :cw] = pixels[:ch, :cw]
    return out


def _vips_open(path: Path, shrink: int = 1) -> Any:
    """A libvips image of ``path`` for one sequential pass; JPEGs are shrunk on load (DCT scaling)."""
    import pyvips

    options: dict[str, Any] = {"access": "sequential", "fail_on": "error"}
    if shrink > 1 and flat_format(path) == "flat-jpeg":
        load = min(8, shrink)
        image = pyvips.Image.new_from_file(str(path), shrink=load, **options)
        shrink //= load
    else:
        image = pyvips.Image.new_from_file(str(path), **options)
    return image.shrink(shrink, shrink) if shrink > 1 else image


def vips_shrunk(path: Path, downsample: int) -> np.ndarray:
    """The image at 1/``downsample`` (box average), as decoded samples (any depth and bands)."""
    image = _vips_open(path, downsample)
    if image.format not in ("uchar", "ushort", "float", "double"):
        image = image.cast("ushort" if image.format in ("char", "short", "uint", "int") else "float")
    pixels = image.numpy()
    return pixels if pixels.ndim == 3 else pixels[..., None]


def _vips_rgb(image: Any, top: float) -> Any:
    """8-bit sRGB from any libvips image: alpha flattened onto white, depth scaled by ``top``."""
    if image.hasalpha():
        alpha_max = 255 if image.format == "uchar" else 65535 if image.format == "ushort" else 1.0
        image = image.flatten(background=[top] * (image.bands - 1), max_alpha=alpha_max)
    if image.format != "uchar" or top != 255.0:
        image = (image * (255.0 / top)).cast("uchar")
    if image.bands == 1:
        image = image.bandjoin([image, image])
    return image[:3].copy(interpretation="srgb")


_COPIES: dict[tuple[str, int, int], Path] = {}


_COPY_DIR: list[Path] = []


def _copy_dir() -> Path:
    if not _COPY_DIR:
        folder = Path(tempfile.mkdtemp(prefix="bd-pyramid-"))
        pid = os.getpid()
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(folder, ignore_errors=True))
        _COPY_DIR.append(folder)
    return _COPY_DIR[0]


def pyramid_copy(path: Path, mpp: float, top: float = 255.0) -> Path:
    """A pyramidal JPEG-tiled TIFF copy of a flat image, with its MPP, in a temporary folder
    (``$TMPDIR``). One copy is kept per process, the latest: slides are processed one after
    another, and a copy is as large as a compressed slide. Removed when the process exits."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _COPIES and _COPIES[key].is_file():
        return _COPIES[key]
    for old in _COPIES.values():
        old.unlink(missing_ok=True)
    _COPIES.clear()
    out = _copy_dir() / f"{path.stem}.{os.getpid()}.tif"
    write_pyramid(path, out, mpp, top)
    _COPIES[key] = out
    return out


def write_pyramid(src: Path, dst: Path, mpp: float, top: float = 255.0) -> None:
    """Write ``src`` as a pyramidal JPEG-tiled BigTIFF that OpenSlide opens as generic-tiff with
    MPP ``mpp``; one sequential pass, memory independent of the image size."""
    import pyvips

    log.info("%s: writing a pyramidal copy (%s)", src, dst)
    try:
        image = _vips_rgb(_vips_open(src), top)
        image.tiffsave(str(dst), tile=True, tile_width=PYRAMID_TILE, tile_height=PYRAMID_TILE,
                       pyramid=True, compression="jpeg", Q=PYRAMID_QUALITY, bigtiff=True,
                       xres=1000.0 / mpp, yres=1000.0 / mpp, resunit="cm")
    except pyvips.Error as exc:
        dst.unlink(missing_ok=True)
        raise slide_fault(f"{src}: cannot convert to a pyramidal TIFF", exc) from exc
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def flat_format(path: str | os.PathLike[str]) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return next((name for name, spec in FLAT_FORMATS.items() if head.startswith(spec.magics)), None)
