"""One slide's features as read from any store format (Zarr of ``bd extract``, CLAM/TRIDENT .h5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FeatureSet:
    """A slide's patch features, their level-0 coordinates and the store's attributes."""

    features: np.ndarray  # (N, D) float16
    coords: np.ndarray  # (N, 2) int64
    attrs: dict[str, Any]
