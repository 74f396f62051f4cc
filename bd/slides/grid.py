"""The patch grid of one slide: the on-disk contract between tiling and feature extraction.

Coordinates are level-0 top-left corners. A patch covers ``patch_size_level0`` level-0 pixels
(a float: physical size over the slide's MPP, never an integer-truncated downsample); it is read
at pyramid level ``read_level`` as ``read_size`` pixels and resized to ``patch_size`` pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bd.errors import StoreError
from bd.io import atomic_path


@dataclass
class PatchGrid:
    coords: np.ndarray  # (N, 2) int64, level-0 x, y of each patch's top-left corner
    slide_id: str
    slide_width: int  # level-0 pixels
    slide_height: int
    mpp: float  # slide level-0 microns per pixel
    target_mpp: float
    patch_size: int  # output pixels per side, at target_mpp
    patch_size_level0: float  # level-0 pixels per side
    read_level: int
    read_downsample: float
    read_size: int  # pixels per side read at read_level (resized to patch_size)
    meta: dict[str, Any] = field(default_factory=dict)  # tissue threshold, cap, seed, warnings...

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def attrs(self) -> dict[str, Any]:
        """Everything but the coordinates, as JSON-ready values."""
        out = dataclasses.asdict(self)
        out.pop("coords")
        return out


def save_grid(grid: PatchGrid, path: str | os.PathLike[str]) -> Path:
    """Write ``grid`` as a compressed ``.npz`` (coords + JSON attributes), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, coords=grid.coords, attrs=np.array(json.dumps(grid.attrs())))
    return path


def load_grid(path: str | os.PathLike[str]) -> PatchGrid:
    """Read a grid written by :func:`save_grid`; a missing or malformed file names the path."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            attrs = json.loads(str(data["attrs"]))
            return PatchGrid(coords=data["coords"], **attrs)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"{path}: not a readable patch grid ({exc})") from exc
