"""bd: bidirectional distillation for lymph-node metastasis prediction from WSIs + clinical data.

The pipeline's stages are subpackages that mirror the rule files (``workflow/rules``) and the
tests: ``bd.slides`` (reading, segmentation, patch grids), ``bd.features`` (encoders, feature
stores), ``bd.cohort`` (sample sheet, splits, clinical table), ``bd.mil`` (bags, models, training),
``bd.evaluation`` (missing-data masks, metrics), ``bd.paper`` (experiments, tables, figures) and
``bd.workflow`` (checks, QC, the results layout). The short public API below is imported lazily,
so ``import bd`` stays light.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__version__ = "0.1.0"

# numpy's OpenBLAS, which runs the patch layer's weight-gradient product on AMD CPUs
# (bd.mil.kernels), keeps its threads spinning for ~0.1 s after each call unless this is set when
# it loads; spinning, they took the cores that torch's next ops needed (benchmarks/train.py).
# Whether it was set in time decides whether that product may use OpenBLAS (a user's value wins).
OPENBLAS_THREADS_SLEEP = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# name -> module that defines it
_API = {
    "open_slide": "bd.slides.slide",  # read any slide (OpenSlide formats and flat images)
    "segment_slide": "bd.slides.segment",  # tissue mask and contours
    "tile_slide": "bd.slides.tiling",  # magnification-aware patch grid
    "create_encoder": "bd.features.encoders",  # timm encoders, local weights only
    "read_store": "bd.features.store",  # one slide's feature store
    "load_cohort": "bd.mil.bags",  # patient bags from feature stores
    "create_model": "bd.mil.models",  # BD and the baselines
    "load_run": "bd.mil.runs",  # a trained run, ready to predict
    "list_methods": "bd.methods",  # the registry of methods
    "get_method": "bd.methods",
    "generate_cohort": "bd.demo",  # the synthetic demo cohort in the BCNB layout
    "BDError": "bd.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
