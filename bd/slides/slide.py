"""One way to open any slide: OpenSlide formats and flat images behind the same interface.

OpenSlide reads what it detects (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...). Flat images (BCNB's
JPEGs, PNG, untiled TIFF) get a virtual pyramid of downsample-by-2 levels, so segmentation,
tiling and extraction treat both alike. A small flat image is decoded once, on first pixel
access. A large one (more than ``STREAM_PIXELS``, e.g. a 1-gigapixel BCNB JPEG) is never held
whole: its coarse levels are decoded at reduced size by libvips (libjpeg's DCT scaling for a
JPEG, a streamed box shrink otherwise), and its fine levels are read from a pyramidal
JPEG-tiled TIFF copy that libvips writes once per process into a temporary folder (streaming,
a few hundred MB), which OpenSlide and the stored-tile reader then read like any scanner file.
Pixels come back as ``H x W x 3`` uint8 RGB; transparent or out-of-slide pixels are white; grey,
palette and 10-16-bit images are expanded or rescaled to 8-bit RGB by the slide's own bit depth.
The interface and the OpenSlide formats are in :mod:`bd.slides.base`, flat images in
:mod:`bd.slides.flat`; this module opens either and serves ``bd slide-info``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import openslide
import tifffile

from bd.errors import SlideError, slide_fault
from bd.slides.base import OpenSlideSlide, Slide, SlideWarning  # noqa: F401  (re-exported: the interface's users import it here)
from bd.slides.flat import FlatSlide, flat_format  # noqa: F401

log = logging.getLogger(__name__)


def open_slide(path: str | os.PathLike[str], fallback_mpp: float | None = None,
               mpp: float | None = None) -> Slide:
    """Open ``path`` with OpenSlide when it recognises the format, else as a flat image; ``mpp``
    (the sample sheet's) overrides the metadata, ``fallback_mpp`` only stands in for it."""
    path = Path(path)
    try:
        return _open(path, fallback_mpp, mpp)
    except OSError as exc:  # permissions, I/O errors: the environment's fault unless classified otherwise
        raise slide_fault(f"{path}: cannot open", exc) from exc


def _deep_tiff(path: Path) -> bool:
    """Whether a TIFF stores more than 8 bits per sample (OpenSlide would drop the low bits)."""
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages.first.bitspersample > 8
    except (tifffile.TiffFileError, ValueError):
        return False


def _open(path: Path, fallback_mpp: float | None, mpp: float | None) -> Slide:
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes)")
    flat = flat_format(path) if path.is_file() else None
    reason = ""
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as exc:
        vendor, reason = None, f"; OpenSlide: {exc}"
    if vendor == "generic-tiff" and flat and _deep_tiff(path):
        vendor, reason = None, "; OpenSlide reads only 8 bits per sample"
    if vendor:
        try:
            return OpenSlideSlide(path, vendor, fallback_mpp, mpp)
        except openslide.OpenSlideError as exc:
            if flat is None:
                raise SlideError(f"{path}: OpenSlide cannot open this {vendor} slide: {exc}") from exc
            reason = f"; OpenSlide: {exc}"
    if flat:
        return FlatSlide(path, flat, fallback_mpp, mpp)
    raise SlideError(f"{path}: not a slide: OpenSlide does not recognise it and it is not a JPEG, PNG "
                     f"or TIFF image (extension {path.suffix or 'none'!r}{reason})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slide", type=Path, required=True, help="slide file (any OpenSlide format, JPEG, PNG, TIFF)")
    parser.add_argument("--fallback-mpp", type=float, default=None,
                        help="microns per pixel to assume when the metadata has none")
    parser.add_argument("--mpp", type=float, default=None, help="microns per pixel (overrides the metadata)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    with open_slide(args.slide, args.fallback_mpp, args.mpp) as slide:
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
