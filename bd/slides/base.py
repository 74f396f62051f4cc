"""The slide interface every reader gives (:class:`Slide`), and what all formats share: RGB
conversion of any sample depth, compositing onto white, and the level-0 MPP's resolution
(sample sheet, metadata, fallback)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import openslide

import cv2
from bd.errors import SlideError, slide_fault

log = logging.getLogger(__name__)


MPP_RANGE = (0.05, 10.0)  # plausible level-0 microns per pixel; 72/96/300 dpi defaults fall outside


DOWNSAMPLE_TOLERANCE = 0.01  # relative slack when choosing a level for a requested downsample


MPP_DISAGREEMENT = 0.1  # a sample-sheet MPP this far from the metadata's is warned about


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
        except (openslide.OpenSlideError, OSError, ValueError, cv2.error, MemoryError, *_vips_errors()) as exc:
            raise slide_fault(f"{self.path}: cannot decode pixels at level {level}, ({x}, {y}) "
                              f"{w} x {h}", exc) from exc

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


def _vips_errors() -> tuple[type[BaseException], ...]:
    """libvips' exception type, when pyvips is installed (evaluated only while an error is matched)."""
    try:
        import pyvips
    except (ImportError, OSError):
        return ()
    return (pyvips.Error,)


def composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """RGB from RGBA (or grey+alpha), blending transparent pixels onto white like OpenSlide's viewers."""
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha.min() == 255:
        return np.ascontiguousarray(colour)
    a = alpha.astype(np.uint32)
    return ((colour * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def sample_top(pixels: np.ndarray) -> float:
    """The white level of an image's samples: 255 for 8 bit, ``2**bits - 1`` for the fewest bits
    (>= 8) that hold its largest value otherwise (12-bit scans stored in 16-bit samples are
    common; a brightfield slide's background is near white), 1.0 for floats."""
    if pixels.dtype == np.uint8:
        return 255.0
    if pixels.dtype.kind == "f":
        return 1.0
    if pixels.dtype.kind not in "ui":
        raise ValueError(f"unsupported sample type {pixels.dtype}")
    bits = max(8, int(pixels.max(initial=0)).bit_length())
    return float(2**bits - 1)


def to_rgb(pixels: np.ndarray, bgr: bool = False, top: float | None = None) -> np.ndarray:
    """uint8 RGB from a decoded image of any depth and channel count (grey, RGB/BGR, with alpha);
    samples above 8 bit are scaled by ``top`` (default: :func:`sample_top` of ``pixels``)."""
    if pixels.dtype != np.uint8:
        top = sample_top(pixels) if top is None else top
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


def resolve_mpp(path: Path, metadata_mpp: float | None, fallback_mpp: float | None,
                mpp: float | None = None) -> tuple[float, str]:
    """Level-0 MPP and its source: the sample sheet's ``mpp`` when given (warned if the metadata
    disagrees), else plausible metadata, else the configured fallback (warned)."""
    if mpp is not None:
        if _float(mpp) is None:
            raise SlideError(f"{path}: the sample sheet's mpp must be a positive number, got {mpp!r}")
        if metadata_mpp is not None and abs(metadata_mpp - mpp) > MPP_DISAGREEMENT * mpp:
            warnings.warn(f"{path}: the sample sheet says {mpp:g} um/px but the file's metadata says "
                          f"{metadata_mpp:g}; using the sample sheet's", SlideWarning, stacklevel=5)
        return float(mpp), "sample sheet"
    if metadata_mpp is not None and MPP_RANGE[0] <= metadata_mpp <= MPP_RANGE[1]:
        return metadata_mpp, "metadata"
    if metadata_mpp is not None:
        log.info("%s: ignoring metadata MPP %.4g (outside %s, likely a DPI default)",
                 path, metadata_mpp, MPP_RANGE)
    if fallback_mpp is None:
        raise SlideError(f"{path}: no microns per pixel in the file's metadata; give the slide an mpp in "
                         "the sample sheet or set cohort.fallback_mpp (or pass --mpp / --fallback-mpp)")
    if _float(fallback_mpp) is None:
        raise SlideError(f"{path}: fallback MPP must be a positive number, got {fallback_mpp!r}")
    warnings.warn(f"{path}: no microns per pixel in the metadata; using the fallback "
                  f"{fallback_mpp:g} (cohort.fallback_mpp)", SlideWarning, stacklevel=5)
    return float(fallback_mpp), "fallback"


class OpenSlideSlide(Slide):
    """A slide in a format OpenSlide reads; RGBA is composited onto white."""

    def __init__(self, path: Path, vendor: str, fallback_mpp: float | None, mpp: float | None = None) -> None:
        self._osr = openslide.OpenSlide(str(path))
        try:
            props = dict(self._osr.properties)
            mpp_x, mpp_y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
            if mpp_x and mpp_y and abs(mpp_x - mpp_y) > 0.01 * mpp_x:
                warnings.warn(f"{path}: MPP differs between x ({mpp_x}) and y ({mpp_y}); using x",
                              SlideWarning, stacklevel=4)
            mpp, source = resolve_mpp(path, mpp_x, fallback_mpp, mpp)
            super().__init__(path, vendor, self._osr.level_dimensions, mpp, source,
                             _float(props.get("openslide.objective-power")), props)
        except BaseException:
            self._osr.close()
            raise

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return composite_on_white(np.asarray(self._osr.read_region((x, y), level, (w, h))))

    def close(self) -> None:
        self._osr.close()
