"""Drawing for the QC images of segmentation and tiling: fit to a size, caption band, tinted
marks, a colour legend, the "slide not read" image, and atomic PNG writing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import numpy as np

from bd.errors import BDError
from bd.io import atomic_path

QC_MAX_SIDE = 1024


def fit(image: np.ndarray, max_side: int = QC_MAX_SIDE) -> tuple[np.ndarray, float]:
    factor = min(1.0, max_side / max(image.shape[:2]))
    if factor < 1.0:
        size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, factor


def caption(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """Stack a white caption band with ``lines`` of text above ``image`` (BGR)."""
    width = max(image.shape[1], 360)
    band = np.full((18 * len(lines) + 8, width, 3), 255, np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(band, text, (4, 18 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    canvas = np.full((image.shape[0], width, 3), 255, np.uint8)
    canvas[:, : image.shape[1]] = image
    return np.vstack([band, canvas])


def mark(image: np.ndarray, where: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.6) -> None:
    """Tint the pixels of ``where`` (any size; resized to the image) with ``colour``, in place."""
    if where.shape[:2] != image.shape[:2]:
        where = cv2.resize(where.astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    image[where] = ((1 - alpha) * image[where] + alpha * np.asarray(colour)).astype(np.uint8)


def legend(image: np.ndarray, items: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """Bands under ``image`` with a colour swatch and label per item (as many rows as they need)."""
    width = max(image.shape[1], 360)
    rows: list[list[tuple[int, str, tuple[int, int, int]]]] = [[]]
    x = 4
    for label, colour in items:
        step = 24 + cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
        if x + step > width and rows[-1]:
            rows.append([])
            x = 4
        rows[-1].append((x, label, colour))
        x += step
    band = np.full((22 * len(rows), width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for x, label, colour in row:
            cv2.rectangle(band, (x, 22 * r + 5), (x + 12, 22 * r + 17), colour, -1)
            cv2.putText(band, label, (x + 16, 22 * r + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    canvas = np.full((image.shape[0], width, 3), 255, np.uint8)
    canvas[:, : image.shape[1]] = image
    return np.vstack([canvas, band])


def error_image(title: str, reason: str) -> np.ndarray:
    """A QC image (BGR) that says the slide could not be read."""
    body = np.full((200, 480, 3), 235, np.uint8)
    cv2.putText(body, "SLIDE NOT READ", (20, 110), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 200), 2, cv2.LINE_AA)
    return caption(body, [title, *textwrap.wrap(reason, 70)[:6]])


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a PNG atomically; a failure names the file."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise BDError(f"could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
