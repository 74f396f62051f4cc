"""One way to open any slide: OpenSlide formats and flat images behind the same interface.

OpenSlide reads what it detects (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...). Flat images (BCNB's
large JPEGs, PNG, untiled TIFF) are decoded once, on first pixel access, and get a virtual
pyramid of downsample-by-2 levels, so segmentation, tiling and extraction treat both alike.
Pixels come back as ``H x W x 3`` uint8 RGB; transparent or out-of-slide pixels are white.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
from PIL import JpegImagePlugin, PngImagePlugin

from bd.errors import SlideError

# BCNB's JPEGs exceed OpenCV's default 2**30-pixel guard, which cv2 reads once, when it loads.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 40))
import cv2  # noqa: E402

log = logging.getLogger(__name__)

MPP_RANGE = (0.05, 10.0)  # plausible level-0 microns per pixel; 72/96/300 dpi defaults fall outside
MIN_LEVEL_SIDE = 512  # the virtual pyramid halves until the smaller side drops below this
DOWNSAMPLE_TOLERANCE = 0.01  # relative slack when choosing a level for a requested downsample
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre


class SlideWarning(UserWarning):
    """A slide opened, but with an assumption the user should know about (fallback MPP, ...)."""


class Slide:
    """A slide opened for reading; a context manager whose ``close()`` releases the file."""

    def __init__(self, path: Path, format: str, level_dimensions: tuple[tuple[int, int], ...],
                 mpp: float, mpp_source: str, objective_power: float | None,
                 properties: dict[str, str]) -> None:
        self.path = path
        self.format = format
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(self.dimensions[0] / w for w, _ in self.level_dimensions)
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.objective_power = objective_power
        self.properties = properties

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels of ``size`` at ``level`` whose top-left is ``location`` in level-0 pixels."""
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist ({self.level_count} levels)")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {w} x {h}")
        x, y = int(location[0]), int(location[1])
        try:
            return self._read(x, y, level, w, h)
        except SlideError:
            raise
        except (openslide.OpenSlideError, OSError, ValueError, cv2.error) as exc:
            raise SlideError(f"{self.path}: cannot decode pixels at level {level}, ({x}, {y}) "
                             f"{w} x {h}: {exc}") from exc

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one level as RGB (meant for the low-resolution levels)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def get_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        """RGB image fitting in ``max_size`` (width, height), aspect kept, never enlarged."""
        (w, h), (mw, mh) = self.dimensions, max_size
        scale = min(mw / w, mh / h, 1.0)
        out = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = self.read_level(self.get_best_level_for_downsample(1.0 / scale))
        if (pixels.shape[1], pixels.shape[0]) == out:
            return pixels
        return cv2.resize(pixels, out, interpolation=cv2.INTER_AREA)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1 % slack)."""
        limit = downsample * (1.0 + DOWNSAMPLE_TOLERANCE)
        return max(i for i, d in enumerate(self.level_downsamples) if d <= limit or i == 0)

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: format, size, levels, downsamples, MPP and objective."""
        return {"path": str(self.path), "format": self.format, "dimensions": list(self.dimensions),
                "level_count": self.level_count,
                "level_dimensions": [list(d) for d in self.level_dimensions],
                "level_downsamples": list(self.level_downsamples), "mpp": self.mpp,
                "mpp_source": self.mpp_source, "objective_power": self.objective_power}

    def close(self) -> None:
        """Release the file and any decoded pixels."""

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<Slide {self.path.name} {self.format} {w}x{h} levels={self.level_count} mpp={self.mpp:g}>"


def composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """RGB from RGBA (or grey+alpha), blending transparent pixels onto white like OpenSlide's viewers."""
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha.min() == 255:
        return np.ascontiguousarray(colour)
    a = alpha.astype(np.uint32)
    return ((colour * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(pixels: np.ndarray, bgr: bool = False) -> np.ndarray:
    """uint8 RGB from a decoded image of any depth and channel count (grey, RGB/BGR, with alpha)."""
    if pixels.dtype != np.uint8:
        top = np.iinfo(pixels.dtype).max if pixels.dtype.kind in "ui" else 1.0
        pixels = np.clip(pixels.astype(np.float32) * (255.0 / top), 0, 255).round().astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if bgr and pixels.shape[-1] in (3, 4):  # in place: a BCNB slide is gigabytes
        code = cv2.COLOR_BGR2RGB if pixels.shape[-1] == 3 else cv2.COLOR_BGRA2RGBA
        pixels = cv2.cvtColor(pixels, code, dst=pixels)
    channels = pixels.shape[-1]
    if channels in (2, 4):
        return composite_on_white(pixels)
    return np.ascontiguousarray(np.repeat(pixels, 3, axis=-1) if channels == 1 else pixels[..., :3])


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def resolve_mpp(path: Path, metadata_mpp: float | None, fallback_mpp: float | None) -> tuple[float, str]:
    """Level-0 MPP and its source: plausible metadata first, else the configured fallback (warned)."""
    if metadata_mpp is not None and MPP_RANGE[0] <= metadata_mpp <= MPP_RANGE[1]:
        return metadata_mpp, "metadata"
    if metadata_mpp is not None:
        log.info("%s: ignoring metadata MPP %.4g (outside %s, likely a DPI default)",
                 path, metadata_mpp, MPP_RANGE)
    if fallback_mpp is None:
        raise SlideError(f"{path}: no microns per pixel in the file's metadata; set cohort.fallback_mpp "
                         "in the config (or pass --fallback-mpp)")
    if _float(fallback_mpp) is None:
        raise SlideError(f"{path}: fallback MPP must be a positive number, got {fallback_mpp!r}")
    warnings.warn(f"{path}: no microns per pixel in the metadata; using the fallback "
                  f"{fallback_mpp:g} (cohort.fallback_mpp)", SlideWarning, stacklevel=4)
    return float(fallback_mpp), "fallback"


class OpenSlideSlide(Slide):
    """A slide in a format OpenSlide reads; RGBA is composited onto white."""

    def __init__(self, path: Path, vendor: str, fallback_mpp: float | None) -> None:
        self._osr = openslide.OpenSlide(str(path))
        try:
            props = dict(self._osr.properties)
            mpp_x, mpp_y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
            if mpp_x and mpp_y and abs(mpp_x - mpp_y) > 0.01 * mpp_x:
                warnings.warn(f"{path}: MPP differs between x ({mpp_x}) and y ({mpp_y}); using x",
                              SlideWarning, stacklevel=3)
            mpp, source = resolve_mpp(path, mpp_x, fallback_mpp)
            super().__init__(path, vendor, self._osr.level_dimensions, mpp, source,
                             _float(props.get("openslide.objective-power")), props)
        except BaseException:
            self._osr.close()
            raise

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return composite_on_white(np.asarray(self._osr.read_region((x, y), level, (w, h))))

    def close(self) -> None:
        self._osr.close()


@dataclass(frozen=True)
class FlatFormat:
    """How to recognise, inspect and decode one flat image format."""

    magics: tuple[bytes, ...]
    header: Callable[[Path], tuple[int, int, float | None, dict[str, str]]]  # -> w, h, mpp, props
    decode: Callable[[Path], np.ndarray]  # -> RGB uint8


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
    return to_rgb(pixels, bgr=True)


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
    return to_rgb(pixels)


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
    """A flat image, decoded once on first use; level k is level k-1 halved with INTER_AREA."""

    def __init__(self, path: Path, format: str, fallback_mpp: float | None) -> None:
        self._spec = FLAT_FORMATS[format]
        w, h, metadata_mpp, props = self._spec.header(path)
        mpp, source = resolve_mpp(path, metadata_mpp, fallback_mpp)
        super().__init__(path, format, virtual_pyramid(w, h), mpp, source, None, props)
        self._levels: list[np.ndarray | None] = [None] * self.level_count
        self._lock = threading.Lock()

    def level_pixels(self, level: int) -> np.ndarray:
        """The cached RGB array of one level (read-only; decodes and downsamples on first use)."""
        with self._lock:
            if self._levels[0] is None:
                pixels = self._spec.decode(self.path)
                if (pixels.shape[1], pixels.shape[0]) != self.dimensions:
                    raise SlideError(f"{self.path}: decoded size {pixels.shape[1]} x {pixels.shape[0]} "
                                     f"differs from the header's {self.dimensions[0]} x {self.dimensions[1]}")
                pixels.flags.writeable = False
                self._levels[0] = pixels
            for k in range(1, level + 1):
                if self._levels[k] is None:
                    smaller = cv2.resize(self._levels[k - 1], self.level_dimensions[k],
                                         interpolation=cv2.INTER_AREA)
                    smaller.flags.writeable = False
                    self._levels[k] = smaller
            return self._levels[level]

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
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


def _flat_format(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return next((name for name, spec in FLAT_FORMATS.items() if head.startswith(spec.magics)), None)


def open_slide(path: str | os.PathLike[str], fallback_mpp: float | None = None) -> Slide:
    """Open ``path`` with OpenSlide when it recognises the format, else as a flat image."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes)")
    flat = _flat_format(path) if path.is_file() else None
    reason = ""
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as exc:
        vendor, reason = None, f"; OpenSlide: {exc}"
    if vendor:
        try:
            return OpenSlideSlide(path, vendor, fallback_mpp)
        except openslide.OpenSlideError as exc:
            if flat is None:
                raise SlideError(f"{path}: OpenSlide cannot open this {vendor} slide: {exc}") from exc
            reason = f"; OpenSlide: {exc}"
    if flat:
        return FlatSlide(path, flat, fallback_mpp)
    raise SlideError(f"{path}: not a slide: OpenSlide does not recognise it and it is not a JPEG, PNG "
                     f"or TIFF image (extension {path.suffix or 'none'!r}{reason})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", type=Path, help="slide file (any OpenSlide format, JPEG, PNG, TIFF)")
    parser.add_argument("--fallback-mpp", type=float, default=None,
                        help="microns per pixel to assume when the metadata has none")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    with open_slide(args.slide, args.fallback_mpp) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info))
        return 0
    objective = "unknown" if info["objective_power"] is None else f"{info['objective_power']:g}x"
    print(f"path:        {info['path']}\nformat:      {info['format']}\n"
          f"size:        {info['dimensions'][0]} x {info['dimensions'][1]}\nlevels:      {info['level_count']}")
    for i, ((w, h), ds) in enumerate(zip(info["level_dimensions"], info["level_downsamples"])):
        print(f"  level {i}:   {w} x {h}  downsample {ds:.4g}")
    print(f"mpp:         {info['mpp']:g} ({info['mpp_source']})\nobjective:   {objective}")
    return 0
