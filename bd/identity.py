"""Whether a slide's features fit a trained run, shared by ``bd predict`` and cohort predict
(:mod:`bd.external`): the run's feature identity against a store's attributes, the slide-stage
settings the run was trained with, and the run's own clinical scaler (checked by its SHA-256)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from bd.errors import ConfigError, StoreError, TableError
from bd.io import file_sha256
from bd.params import build



def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def identity_mismatches(run_identity: Mapping[str, Any], attrs: Mapping[str, Any]) -> list[str]:
    """Why features with ``attrs`` cannot go into a run trained on ``run_identity`` (empty: they
    can): every attribute of :data:`bd.mil.bags.IDENTITY_KEYS` that both record must agree."""
    from bd.mil.bags import IDENTITY_KEYS

    return [f"{key} is {attrs.get(key)!r}, the run's is {run_identity[key]!r}"
            for key in IDENTITY_KEYS if key in run_identity and key in attrs
            and not _same(run_identity[key], attrs.get(key))]


def check_identity(run_identity: Mapping[str, Any], attrs: Mapping[str, Any], what: str) -> None:
    problems = identity_mismatches(run_identity, attrs)
    if problems:
        raise StoreError(f"{what} does not match the run: " + "; ".join(problems)
                         + " (features must come from the same encoder and patch settings)")


# ---------------------------------------------------------------- settings from the run


def stage_params(identity: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Segmentation, tiling and feature parameters: the run's feature identity, then overrides."""
    from bd.features.params import FeatureParams
    from bd.slides.segment import SegmentParams
    from bd.slides.tiling import TileParams

    unknown = sorted(set(overrides) - {"segmentation", "tiling", "features"})
    if unknown:
        raise ConfigError(f"--params: unknown section '{unknown[0]}' (known: segmentation, tiling, features)")
    for key in ("encoder", "patch_size", "target_mpp"):
        if key not in identity:
            raise StoreError(f"the run records no '{key}' of its features; retrain it with this bd version")
    features = {"encoder": identity["encoder"], "out_stage": identity.get("out_stage"),
                "model_kwargs": dict(identity.get("model_kwargs") or {}), "pool": identity.get("pool"),
                "mean": identity.get("mean"), "std": identity.get("std"),
                "weights": identity.get("weights"), "random_weights": identity.get("weights_sha256") == "random",
                "input_size": int(identity.get("input_size", 224)), "num_workers": 0,
                **(overrides.get("features") or {})}
    if features.get("random_weights"):
        features["weights"] = None
    tiling = {"target_mpp": float(identity["target_mpp"]), "patch_size": int(identity["patch_size"]),
              **(overrides.get("tiling") or {})}
    return (build(SegmentParams, overrides.get("segmentation") or {}), build(TileParams, tiling),
            build(FeatureParams, features))


def planned_attrs(tile: Any, feat: Any) -> dict[str, Any]:
    """The identity attributes the planned extraction will give its store."""
    return {"encoder": feat.encoder, "out_stage": feat.out_stage, "model_kwargs": feat.model_kwargs,
            "input_size": feat.input_size, "patch_size": tile.patch_size, "target_mpp": tile.mpp}


# ---------------------------------------------------------------- clinical values



def scaler_path(run: Any, scaler: str | None) -> Path:
    """The run's clinical scaler: ``--scaler`` or the path the run records, checked by its SHA-256."""
    recorded = run.scaler or {}
    path = Path(scaler or recorded.get("path") or "")
    if not str(path) or str(path) == ".":
        raise ConfigError("the run records no clinical scaler: give --scaler (scaler.json of bd clinical)")
    if not path.is_file():
        raise ConfigError(f"clinical scaler {path} does not exist (give --scaler)")
    if recorded.get("sha256") and file_sha256(path) != recorded["sha256"]:
        raise TableError(f"{path}: not the scaler the run was trained with (SHA-256 differs from "
                         f"{recorded['sha256'][:12]}...); give the run's own scaler.json with --scaler")
    return path
