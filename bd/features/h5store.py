"""CLAM / TRIDENT ``.h5`` feature files read as bd feature stores, so earlier extraction is reused.

Both tools write one HDF5 file per slide with datasets ``features`` (N x D, or 1 x N x D) and
``coords`` (N x 2, level-0 top-left x, y). Attributes on ``coords`` say how the patches were cut:
CLAM's ``patch_size`` (pixels at ``patch_level``), ``patch_level`` and ``downsample``; TRIDENT's
``patch_size`` (pixels at the target magnification), ``patch_size_level0``,
``level0_magnification`` and ``target_magnification``. Neither records the encoder, so its
identity comes from the user: the config section ``h5_features`` (encoder name, weights label,
patch size and microns per pixel), which the workflow writes beside the files as
``h5_identity.json`` (:data:`IDENTITY_FILE`); a folder of ``.h5`` files used from the command
line carries the same file. With it, an ``.h5`` file stands in for a Zarr store wherever bd reads
one (:func:`bd.features.store.read_store`): training, evaluation, ``bd predict`` and the figures.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bd.errors import ConfigError, StoreError
from bd.params import param

IDENTITY_FILE = "h5_identity.json"
SUFFIXES = (".h5", ".hdf5")
REQUIRED = ("features", "coords")


@dataclass
class H5FeatureParams:
    """CLAM/TRIDENT .h5 feature files used instead of extraction (bd/features/h5store.py)."""

    dir: str | None = param(None, description="folder of {slide}.h5 (datasets features, coords; CLAM's h5_files/, "
                                               "TRIDENT's features_<encoder>/); null: extract")
    encoder: str | None = param(None, description="name of the encoder that made them (e.g. uni, conch_v1); "
                                                   "required with dir")
    weights: str | None = param(None, description="label of the weights (version, checksum); compared like "
                                                   "weights_sha256")
    patch_size: int | None = param(None, minimum=1, description="px at target_mpp; null: the files' patch_size")
    target_mpp: float | None = param(None, exclusive_minimum=0,
                                     description="um/px the patches were encoded at (required with dir)")
    mpp: float | None = param(None, exclusive_minimum=0, description="level-0 um/px of the slides; null: from the slides")

    def identity(self) -> dict[str, Any]:
        """The store attributes the user vouches for (see :data:`bd.mil.bags.IDENTITY_KEYS`)."""
        if not self.encoder:
            raise ConfigError("h5_features.encoder: give the name of the encoder that made the .h5 features")
        if self.target_mpp is None:
            raise ConfigError("h5_features.target_mpp: give the microns per pixel the patches were encoded at")
        out: dict[str, Any] = {"encoder": self.encoder, "target_mpp": float(self.target_mpp),
                               "weights_sha256": self.weights or "unknown", "source_format": "h5"}
        if self.patch_size is not None:
            out["patch_size"] = int(self.patch_size)
        if self.mpp is not None:
            out["mpp"] = float(self.mpp)
        return out


def is_h5(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def write_identity(params: H5FeatureParams, out: str | os.PathLike[str]) -> Path:
    """Write the user's identity of a folder of .h5 files (``h5_identity.json``)."""
    from bd.io import write_json

    write_json(Path(out), {**params.identity(), "params": asdict(params)})
    return Path(out)


def read_identity(path: Path) -> dict[str, Any]:
    """The identity beside ``path`` (``h5_identity.json`` in its folder); the error says how to give one."""
    ident = path.parent / IDENTITY_FILE
    if not ident.is_file():
        raise StoreError(f"{path}: an .h5 feature file needs the encoder identity in {ident} (written by the "
                         "workflow from the config section h5_features; or write it yourself: "
                         '{"encoder": "uni", "target_mpp": 0.5, "patch_size": 256})')
    try:
        data = json.loads(ident.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{ident}: not a readable JSON identity ({exc})") from exc
    data.pop("params", None)
    for key in ("encoder", "target_mpp"):
        if key not in data:
            raise StoreError(f"{ident}: key '{key}' is missing (the encoder identity of the .h5 files)")
    return data


def _plain(value: Any) -> Any:
    """An HDF5 attribute as plain JSON-able Python."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _first(values: Any) -> float:
    return float(values[0] if isinstance(values, (list, tuple)) else values)


def patch_geometry(attrs: dict[str, Any]) -> dict[str, Any]:
    """Patch size at the encoding magnification and in level-0 pixels, from CLAM's or TRIDENT's
    attributes (absent ones stay absent)."""
    out: dict[str, Any] = {}
    if "patch_size" in attrs:
        out["patch_size"] = int(_first(attrs["patch_size"]))
    if "patch_size_level0" in attrs:  # TRIDENT
        out["patch_size_level0"] = float(_first(attrs["patch_size_level0"]))
    elif "patch_size" in attrs and "downsample" in attrs:  # CLAM: pixels at patch_level x its downsample
        out["patch_size_level0"] = _first(attrs["patch_size"]) * _first(attrs["downsample"])
    elif "patch_size" in attrs and int(_first(attrs.get("patch_level", -1))) == 0:
        out["patch_size_level0"] = float(_first(attrs["patch_size"]))
    return out


def read_h5_store(path: str | os.PathLike[str], with_features: bool = True) -> Any:
    """An .h5 feature file as a :class:`bd.features.store.FeatureSet`: its arrays, its patch attributes and the
    user's identity; a missing dataset or a shape that is not (N, D) / (N, 2) names the file."""
    import h5py

    from bd.features.featureset import FeatureSet

    path = Path(path)
    identity = read_identity(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with handle as f:
        missing = [name for name in REQUIRED if name not in f]
        if missing:
            raise StoreError(f"{path}: dataset '{missing[0]}' is missing (a CLAM/TRIDENT feature file holds "
                             f"'features' (N x D) and 'coords' (N x 2); it has {sorted(f.keys())})")
        feats, coords = f["features"], f["coords"]
        fshape = tuple(feats.shape)
        if len(fshape) == 3 and fshape[0] == 1:  # TRIDENT/CLAM variants save a leading batch axis
            fshape = fshape[1:]
        if len(fshape) != 2:
            raise StoreError(f"{path}: dataset 'features' has shape {tuple(feats.shape)}, expected (N, D)")
        cshape = tuple(coords.shape)
        if len(cshape) == 3 and cshape[0] == 1:
            cshape = cshape[1:]
        if len(cshape) != 2 or cshape[1] != 2 or cshape[0] != fshape[0]:
            raise StoreError(f"{path}: dataset 'coords' has shape {tuple(coords.shape)}, expected ({fshape[0]}, 2) "
                             "level-0 x, y of each patch")
        raw = {**{k: _plain(v) for k, v in f.attrs.items()}, **{k: _plain(v) for k, v in feats.attrs.items()},
               **{k: _plain(v) for k, v in coords.attrs.items()}}
        values = np.asarray(feats[()]).reshape(fshape) if with_features else np.zeros((0, 0), np.float16)
        xy = np.asarray(coords[()]).reshape(cshape).astype(np.int64)
    geometry = patch_geometry(raw)
    if "patch_size" in identity and "patch_size" in geometry and identity["patch_size"] != geometry["patch_size"]:
        raise StoreError(f"{path}: attribute patch_size is {geometry['patch_size']}, "
                         f"{path.parent / IDENTITY_FILE} says {identity['patch_size']}")
    attrs = {**{f"h5_{k}": v for k, v in raw.items() if isinstance(v, (int, float, str, list))},
             **geometry, **identity, "complete": True, "n_patches": int(fshape[0]), "feature_dim": int(fshape[1]),
             "slide_id": path.stem, "store_path": str(path)}
    if "patch_size" not in attrs:
        raise StoreError(f"{path}: no patch_size attribute on 'coords'; give h5_features.patch_size")
    if "patch_size_level0" not in attrs and "mpp" in attrs:
        attrs["patch_size_level0"] = attrs["patch_size"] * attrs["target_mpp"] / attrs["mpp"]
    return FeatureSet(features=values, coords=xy, attrs=attrs)
