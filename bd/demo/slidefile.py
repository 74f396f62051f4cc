"""Write a rendered slide as BCNB or a scanner would: a pyramidal JPEG-tiled TIFF in the Aperio
layout (OpenSlide reads its MPP and objective power), or a flat JPEG without metadata (BCNB)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import tifffile

from bd.io import atomic_path

TILE = 256
MIN_LEVEL_SIDE = 512  # the pyramid stops once a level's longer side is at most this


def objective_power(mpp: float) -> int:
    """Nominal objective magnification for a pixel size (10x ~ 1.0, 20x ~ 0.5, 40x ~ 0.25 um/px)."""
    return max(1, int(round(10.0 / mpp)))


def aperio_description(width: int, height: int, mpp: float, quality: int, title: str) -> str:
    """An Aperio-style ImageDescription: OpenSlide maps AppMag and MPP to its standard properties."""
    return (
        f"Aperio Image Library v12.0.16 \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
        f"JPEG/RGB Q={quality}|AppMag = {objective_power(mpp)}|MPP = {mpp:g}|Title = {title}"
    )


def pyramid(rgb: np.ndarray) -> list[np.ndarray]:
    """Level 0 and its 2x reductions (area averaging) down to MIN_LEVEL_SIDE."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) > MIN_LEVEL_SIDE:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid_tiff(path: str | os.PathLike[str], rgb: np.ndarray, mpp: float, quality: int = 85) -> Path:
    """Write ``rgb`` (H x W x 3 uint8) as a tiled JPEG pyramid, one TIFF page per level."""
    h, w = rgb.shape[:2]
    resolution = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, level in enumerate(pyramid(rgb)):
            lh, lw = level.shape[:2]
            description = (aperio_description(w, h, mpp, quality, Path(path).stem) if i == 0
                           else f"Aperio Image Library v12.0.16 \r\n{w}x{h} -> {lw}x{lh} - |MPP = {mpp * w / lw:g}")
            tif.write(
                level, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                tile=(TILE, TILE), description=description, metadata=None, software=False,
                resolution=(resolution[0] * lw / w, resolution[1] * lh / h), resolutionunit="CENTIMETER",
                maxworkers=1,
            )
    return Path(path)


def write_flat_jpeg(path: str | os.PathLike[str], rgb: np.ndarray, mpp: float, quality: int = 85) -> Path:
    """Write ``rgb`` as one baseline JPEG; like BCNB's slides it records no pixel size (``mpp``
    is not stored: readers fall back to the configured one)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode {path} as JPEG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
    return Path(path)


WRITERS = {".tif": write_pyramid_tiff, ".jpg": write_flat_jpeg}


def write_slide(path: str | os.PathLike[str], rgb: np.ndarray, mpp: float, quality: int = 85) -> Path:
    """Write a slide in the format its extension names (``.tif`` pyramid or ``.jpg`` flat)."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITERS:
        raise ValueError(f"{path}: demo slides are .tif or .jpg, not {suffix!r}")
    return WRITERS[suffix](path, rgb, mpp, quality)
