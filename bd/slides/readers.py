"""Patch readers: the pixels of one patch (``size`` x ``size`` at a pyramid level) as RGB uint8.

Reading, not the encoder, decides extraction speed, and most of OpenSlide's cost is its own
pixel-format conversion, not the JPEG decode. So for TIFF-family slides whose tiles
are JPEG (SVS, generic tiled TIFF, the demo's slides) :class:`TiffJpegReader` reads the stored
tile bytes with ``os.pread`` and decodes each tile once with libjpeg-turbo
(``imagecodecs.jpeg8_decode`` with the page's shared JPEG tables and its colour space from the
TIFF photometric tag), keeping decoded tiles in an LRU cache sized for one row of patches. Every other format goes
through :class:`SlideReader` (``bd.slides.slide``: OpenSlide and flat images). Both give the same pixels
(white beyond the slide's borders); tests compare them with OpenSlide. A large flat image (a
BCNB JPEG) is read from its pyramidal JPEG-tiled copy (``bd.slides.flat.pyramid_copy``, written once
in the planning process), through the stored-tile reader.

A reader is described by a picklable :class:`ReadSpec` and opened with :func:`open_reader`, so
that each DataLoader worker opens its own file handles.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bd.errors import SlideError, slide_fault

log = logging.getLogger(__name__)

JPEG = 7  # TIFF compression code
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
FAST_FORMATS = ("aperio", "generic-tiff")  # OpenSlide vendors whose levels are plain TIFF pages


class PatchReader(Protocol):
    """Reads square patches at one pyramid level; ``x, y`` are level-0 top-left coordinates."""

    kind: str

    def read(self, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray: ...

    def share(self) -> bool:
        """Get ready for forked workers to use this same reader; False when it must not be."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReadSpec:
    """Everything a worker needs to open its own reader for one slide (picklable)."""

    path: str
    level: int
    downsample: float
    size: int
    kind: str = "slide"  # a key of READERS
    mpp: float | None = None  # fallback MPP for slides without metadata (flat images)
    read_path: str = ""  # the file actually read, when not ``path`` (a flat image's pyramidal copy)

    @property
    def file(self) -> str:
        """The file the pixels come from."""
        return self.read_path or self.path

    def region(self, x: int, y: int) -> str:
        """How errors name a patch: slide, level-0 position and level."""
        return f"{self.path}: region x={x}, y={y}, level={self.level}, size={self.size}"


def decode_tile(data: bytes, tables: bytes | None, rgb: bool) -> np.ndarray:
    """One stored JPEG tile as RGB uint8 (libjpeg-turbo, through imagecodecs).

    ``tables``: the page's shared JPEG tables (abbreviated SVS streams need them). The colour
    space comes from the TIFF photometric tag, as OpenSlide takes it: Aperio writes RGB-coded
    tiles (component ids 0, 1, 2, sometimes a JFIF marker) that libjpeg would otherwise take for
    YCbCr. A stream without its end-of-image marker (a truncated tile) is an error, not a tile
    padded with grey. Raises :class:`SlideError`."""
    import imagecodecs

    if data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0:
        raise SlideError("JPEG tile is truncated (no end-of-image marker)")
    try:
        return imagecodecs.jpeg8_decode(data, tables=tables or None, colorspace="RGB" if rgb else "YCBCR",
                                        outcolorspace="RGB")
    except imagecodecs.Jpeg8Error as exc:
        raise SlideError(f"JPEG tile failed to decode ({exc})") from None


def _level_page(tif: object, width: int, height: int, downsample: float) -> object | None:
    """The TIFF page holding the pyramid level of ``downsample`` (matched by its dimensions)."""
    want_w, want_h = width / downsample, height / downsample
    for page in tif.pages:  # type: ignore[attr-defined]
        if abs(page.imagewidth - want_w) <= 1 and abs(page.imagelength - want_h) <= 1:
            return page if _is_jpeg_tiled(page) else None
    return None


def _is_jpeg_tiled(page: object) -> bool:
    p = page
    return bool(
        p.is_tiled  # type: ignore[attr-defined]
        and p.compression == JPEG  # type: ignore[attr-defined]
        and p.photometric in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR)  # type: ignore[attr-defined]
        and p.samplesperpixel == 3  # type: ignore[attr-defined]
        and p.bitspersample == 8  # type: ignore[attr-defined]
        and p.planarconfig == 1  # type: ignore[attr-defined]
        and p.imagedepth == 1  # type: ignore[attr-defined]
    )


class TiffJpegReader:
    """Patches from a TIFF's stored JPEG tiles, each tile decoded once (LRU cache of one row)."""

    kind = "tiff-jpeg"

    def __init__(self, spec: ReadSpec) -> None:
        import tifffile

        self.spec = spec
        try:
            with tifffile.TiffFile(spec.file) as tif:
                base = tif.pages[0]  # level 0 in SVS and generic pyramidal TIFF
                width, height = base.imagewidth, base.imagelength  # type: ignore[union-attr]
                page = _level_page(tif, width, height, spec.downsample)
                if page is None:
                    raise SlideError(
                        f"{spec.path}: level {spec.level} (downsample {spec.downsample:g}) is not "
                        "a JPEG-tiled TIFF page; use the generic reader"
                    )
                self.width, self.height = page.imagewidth, page.imagelength
                self.tile_w, self.tile_h = page.tilewidth, page.tilelength
                self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                self.counts = np.asarray(page.databytecounts, dtype=np.int64)
                rgb = page.photometric == PHOTOMETRIC_RGB
                tables = page.jpegtables or None
        except (OSError, ValueError, tifffile.TiffFileError) as exc:
            raise slide_fault(f"{spec.path}: cannot read TIFF structure", exc) from exc
        self.rgb, self.tables = rgb, tables
        self.tiles_x = math.ceil(self.width / self.tile_w)
        self.tiles_y = math.ceil(self.height / self.tile_h)
        rows = math.ceil(spec.size / self.tile_h) + 1
        self.capacity = max(16, self.tiles_x * rows)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # tiles decoded (each once while cached): for tests and benchmarks
        self.fd = os.open(spec.file, os.O_RDONLY)

    def _tile(self, index: int) -> np.ndarray | None:
        """Decoded RGB tile ``index`` (None for a sparse, never-written tile: white)."""
        tile = self.cache.get(index)
        if tile is not None:
            self.cache.move_to_end(index)
            return tile
        count = int(self.counts[index])
        if count == 0:
            return None
        data = os.pread(self.fd, count, int(self.offsets[index]))
        row, col = divmod(index, self.tiles_x)
        if len(data) < count:
            raise SlideError(f"JPEG tile (row {row}, column {col}) lies past the end of the file (truncated slide)")
        try:
            tile = decode_tile(data, self.tables, self.rgb)
        except SlideError as exc:
            raise SlideError(f"{exc} (row {row}, column {col})") from None
        if tile.ndim != 3 or tile.shape[0] < self.tile_h or tile.shape[1] < self.tile_w:
            raise SlideError(f"JPEG tile (row {row}, column {col}) decoded to {tile.shape}, not {self.tile_h} x {self.tile_w}")
        self.decoded += 1
        self.cache[index] = tile
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return tile

    def inside(self, lx: int, ly: int) -> tuple[int, int, int, int] | None:
        """The part ``(x0, y0, x1, y1)`` of the patch at level ``(lx, ly)`` that lies on the slide,
        or None when none of it does."""
        size = self.spec.size
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + size, self.width), min(ly + size, self.height)
        return None if x0 >= x1 or y0 >= y1 else (x0, y0, x1, y1)

    def tiles_under(self, box: tuple[int, int, int, int]) -> Iterator[tuple[int, int]]:
        """(row, column) of every stored tile that the level box ``(x0, y0, x1, y1)`` touches."""
        x0, y0, x1, y1 = box
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                yield ty, tx

    def read(self, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray:
        """The patch at level-0 ``(x, y)``: ``size`` x ``size`` level pixels, white outside;
        written into ``out`` when given (a slot of a batch: no extra copy).

        Level coordinates are ``x / downsample`` rounded to the nearest pixel (OpenSlide blends
        sub-pixel offsets; at level 0, and on aligned reads, the pixels are identical)."""
        size = self.spec.size
        if out is None:
            out = np.empty((size, size, 3), dtype=np.uint8)
        lx = math.floor(x / self.spec.downsample + 0.5)
        ly = math.floor(y / self.spec.downsample + 0.5)
        box = self.inside(lx, ly)
        if box is None:
            out[:] = 255
            return out
        x0, y0, x1, y1 = box
        if box != (lx, ly, lx + size, ly + size):
            out[:] = 255  # partly outside the slide
        tw, th = self.tile_w, self.tile_h
        try:
            for ty, tx in self.tiles_under(box):
                tile = self._tile(ty * self.tiles_x + tx)
                sx0, sx1 = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                sy0, sy1 = max(y0, ty * th), min(y1, (ty + 1) * th)
                target = out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx]
                if tile is None:
                    target[:] = 255  # sparse tile: never written, white as in OpenSlide
                else:
                    target[:] = tile[sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw]
        except SlideError as exc:
            raise SlideError(f"{self.spec.region(x, y)}: {exc}") from None
        except OSError as exc:
            raise slide_fault(self.spec.region(x, y), exc) from exc
        return out

    def share(self) -> bool:
        """pread on one descriptor has no shared file offset; the tile cache is per process."""
        return True

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:  # __init__ may have failed before opening the file
            os.close(self.fd)
            self.fd = -1
        if hasattr(self, "cache"):
            self.cache.clear()

    def __del__(self) -> None:
        self.close()


class SlideReader:
    """Patches through ``bd.slides.slide`` (OpenSlide or a flat image): every format, slower."""

    kind = "slide"

    def __init__(self, spec: ReadSpec) -> None:
        from bd.slides.slide import SlideWarning, open_slide

        self.spec = spec
        with warnings.catch_warnings():  # MPP assumptions were reported when the grid was made
            warnings.simplefilter("ignore", SlideWarning)
            self.slide = open_slide(spec.file, fallback_mpp=spec.mpp)

    def read(self, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray:
        size = self.spec.size
        try:
            patch = self.slide.read_region((int(x), int(y)), self.spec.level, (size, size))
        except SlideError as exc:
            raise SlideError(f"{self.spec.region(x, y)}: {exc}") from None
        except Exception as exc:  # OpenSlideError and decoder errors of the flat-image path
            raise slide_fault(self.spec.region(x, y), exc) from exc
        if out is None:
            return np.ascontiguousarray(patch[..., :3], dtype=np.uint8)
        out[:] = patch[..., :3]
        return out

    def share(self) -> bool:
        """A flat image is decoded once here and inherited by forked workers (copy-on-write),
        instead of once per worker; OpenSlide handles are not fork-safe."""
        from bd.slides.slide import FlatSlide

        if not isinstance(self.slide, FlatSlide) or self.slide.streamed:
            return False
        try:
            self.slide.level_pixels(self.spec.level)
        except SlideError:
            raise
        except Exception as exc:  # decoder errors of a damaged image
            raise slide_fault(f"{self.spec.path}: cannot decode the image", exc) from exc
        return True

    def close(self) -> None:
        close = getattr(self.slide, "close", None)
        if close is not None:
            close()


READERS: dict[str, Callable[[ReadSpec], PatchReader]] = {
    TiffJpegReader.kind: TiffJpegReader,
    SlideReader.kind: SlideReader,
}


def fast_path_supported(path: str, level: int, downsample: float) -> bool:
    """Whether :class:`TiffJpegReader` reads this slide level with OpenSlide's exact pixels."""
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except Exception:  # noqa: BLE001 - any detection failure means "use the generic reader"
        return False
    if vendor not in FAST_FORMATS:
        return False
    try:
        TiffJpegReader(ReadSpec(path, level, downsample, size=1, kind="tiff-jpeg")).close()
    except SlideError as exc:
        log.debug("%s: fast reader unavailable (%s)", path, exc)
        return False
    return True


def plan_reader(
    path: str,
    level: int,
    downsample: float,
    size: int,
    mpp: float | None = None,
    prefer: str = "auto",
) -> ReadSpec:
    """The reader for one slide: stored JPEG tiles when exact and possible, else ``bd.slides.slide``."""
    if prefer not in ("auto", *READERS):
        raise SlideError(f"unknown reader {prefer!r} (known: auto, {', '.join(READERS)})")
    read_path = streamed_copy(str(path), mpp)
    kind = prefer
    if prefer == "auto":
        fast = fast_path_supported(read_path or str(path), level, downsample)
        kind = TiffJpegReader.kind if fast else SlideReader.kind
    return ReadSpec(str(path), int(level), float(downsample), int(size), kind, mpp, read_path)


def streamed_copy(path: str, mpp: float | None) -> str:
    """The pyramidal copy to read a large flat image from ('' for every other slide)."""
    from bd.slides.slide import FlatSlide, SlideWarning, flat_format, open_slide

    import openslide

    if not os.path.isfile(path) or flat_format(path) is None:
        return ""
    try:
        if openslide.OpenSlide.detect_format(path):
            return ""
    except openslide.OpenSlideError:
        pass
    with warnings.catch_warnings():  # MPP assumptions were reported when the grid was made
        warnings.simplefilter("ignore", SlideWarning)
        with open_slide(path, fallback_mpp=mpp) as slide:
            if not (isinstance(slide, FlatSlide) and slide.streamed):
                return ""
            log.info("%s: %d x %d flat image, read from a pyramidal copy", path, *slide.dimensions)
            return str(slide.pyramid_path())


def open_reader(spec: ReadSpec) -> PatchReader:
    """Open the reader ``spec`` describes (call it in the process that will read)."""
    return READERS[spec.kind](spec)
