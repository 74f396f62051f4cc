"""Feature stores: one Zarr v3 store per slide, the contract between extraction and training.

Layout: ``features`` (N x D float16, chunked by rows), ``coords`` (N x 2 int64, level-0 x, y),
and attributes (encoder name, weights SHA-256, patch size, MPP, read level, versions, ...).
A store is written under a temporary name and renamed when complete; ``attrs['complete']`` is
set last, so a store without it is never taken as finished.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bd.errors import StoreError
from bd.features.featureset import FeatureSet
from bd.io import atomic_path

ROW_CHUNK = 4096


def write_store(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write a complete store in one go (atomic). For streaming writes see :func:`create_store`."""
    path = Path(path)
    features = np.asarray(features, dtype=np.float16)
    with atomic_path(path) as tmp:
        root = create_store(tmp, n=features.shape[0], dim=features.shape[1], attrs=attrs)
        if features.shape[0]:
            root["features"][:] = features
            root["coords"][:] = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        finish_store(root)
    return path


def create_store(path: str | os.PathLike[str], n: int, dim: int, attrs: dict[str, Any]) -> Any:
    """Create an empty store at ``path`` (a temporary path: the caller renames it when done)."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array(
        "features", shape=(n, dim), chunks=(min(ROW_CHUNK, max(n, 1)), dim), dtype="float16"
    )
    root.create_array("coords", shape=(n, 2), chunks=(min(ROW_CHUNK, max(n, 1)), 2), dtype="int64")
    root.attrs.update({**attrs, "complete": False, "n_patches": int(n), "feature_dim": int(dim)})
    return root


def finish_store(root: Any) -> None:
    """Mark a store complete: the last write before the rename."""
    root.attrs["complete"] = True


STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")


def store_path(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """The feature store of ``slide_id`` in ``features_dir``: ``{slide}.zarr`` (bd extract's), else a
    CLAM/TRIDENT ``{slide}.h5`` (:mod:`bd.features.h5store`); the ``.zarr`` path when neither exists."""
    for suffix in STORE_SUFFIXES:
        candidate = Path(features_dir) / f"{slide_id}{suffix}"
        if candidate.exists():
            return candidate
    return Path(features_dir) / f"{slide_id}.zarr"


def store_slide_id(path: str | os.PathLike[str]) -> str:
    """The slide id a store's file name carries."""
    name = Path(path).name
    return next((name[: -len(s)] for s in STORE_SUFFIXES if name.endswith(s)), name)


# read_store's memory while cached_reads() is open: (path, with_features, mtimes) -> what was read.
_READ_CACHE: dict[tuple[str, bool, int, int], FeatureSet] | None = None
READ_CACHE_BYTES = 1 << 30  # stores beyond this many cached bytes are read each time


@contextlib.contextmanager
def cached_reads() -> Iterator[None]:
    """While open, :func:`read_store` reads each store once and hands out copies. `bd batch` runs
    several trainings and evaluations of one cohort in one process, each of which reads every
    store (twice: attributes, then features; about 1 CPU s a run for the demo's 80 stores). The
    key holds the store's and its metadata file's modification times, so a rewritten store is
    read again; at most :data:`READ_CACHE_BYTES` of arrays are kept."""
    global _READ_CACHE
    saved, _READ_CACHE = _READ_CACHE, {}
    try:
        yield
    finally:
        _READ_CACHE = saved


def _cache_key(path: Path, with_features: bool) -> tuple[str, bool, int, int] | None:
    try:
        meta = path / "zarr.json"
        return (str(path.resolve()), with_features, path.stat().st_mtime_ns,
                meta.stat().st_mtime_ns if meta.exists() else 0)
    except OSError:
        return None  # missing: read_store names it


def _copied(fs: FeatureSet) -> FeatureSet:
    return FeatureSet(features=fs.features.copy(), coords=fs.coords.copy(), attrs=copy.deepcopy(fs.attrs))


def read_store(path: str | os.PathLike[str], with_features: bool = True) -> FeatureSet:
    """Read a complete store (Zarr, or a CLAM/TRIDENT .h5 file through :mod:`bd.features.h5store`); an
    incomplete or unreadable one raises :class:`StoreError`. Inside :func:`cached_reads`, once."""
    path = Path(path)
    key = _cache_key(path, with_features) if _READ_CACHE is not None else None
    if key is None:
        return _read_store(path, with_features)
    if key not in _READ_CACHE:
        fs = _read_store(path, with_features)
        used = sum(f.features.nbytes + f.coords.nbytes for f in _READ_CACHE.values())
        if used + fs.features.nbytes + fs.coords.nbytes > READ_CACHE_BYTES:
            return fs
        _READ_CACHE[key] = fs
    return _copied(_READ_CACHE[key])


def _read_store(path: Path, with_features: bool) -> FeatureSet:
    import zarr

    from bd.features.h5store import is_h5, read_h5_store

    if is_h5(path):
        return read_h5_store(path, with_features)
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
    except Exception as exc:  # zarr raises several types for a missing or damaged store
        raise StoreError(f"{path}: not a readable feature store ({exc})") from exc
    if not attrs.get("complete"):
        raise StoreError(f"{path}: feature store is incomplete (interrupted extraction?)")
    feats = root["features"][:] if with_features else np.zeros((0, 0), np.float16)
    return FeatureSet(features=feats, coords=root["coords"][:], attrs=attrs)


def store_paths(features: str | os.PathLike[str], slide_ids: list[str]) -> dict[str, Path]:
    """Each slide's feature store: from the feature index (``index.tsv``: slide_id, store, written
    by the workflow) or, given a folder, :func:`store_path` in it. A slide the index does not
    list gets the folder's path (it will be reported as missing, naming it)."""
    import pandas as pd

    features = Path(features)
    if not features.is_file():  # a folder of stores (one that does not exist holds none)
        return {sid: store_path(features, sid) for sid in slide_ids}
    try:
        index = pd.read_csv(features, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise StoreError(f"{features}: cannot read the feature index ({exc}); give the index or a folder of stores") from exc
    if not {"slide_id", "store"} <= set(index.columns):
        raise StoreError(f"{features}: a feature index needs columns slide_id and store (has {list(index.columns)})")
    listed = dict(zip(index["slide_id"], index["store"]))
    return {sid: Path(listed[sid]) if sid in listed else features.parent / f"{sid}.zarr" for sid in slide_ids}


def write_feature_index(stores: Mapping[str, str | os.PathLike[str]], path: str | os.PathLike[str]) -> Path:
    """The feature index (``slide_id``, ``store``: one row per slide, in the mapping's order) that
    :func:`store_paths` reads; written atomically."""
    from bd.io import write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, "slide_id\tstore\n" + "".join(f"{s}\t{p}\n" for s, p in stores.items()))


class RowWriter:
    """Appends feature rows to a store in whole chunks; skipped patches leave no row."""

    def __init__(self, root: Any, chunk: int) -> None:
        self.root = root
        self.chunk = chunk
        self.rows = 0
        self.feats: list[np.ndarray] = []
        self.coords: list[np.ndarray] = []
        self.pending = 0

    def add(self, feats: np.ndarray, coords: np.ndarray) -> None:
        self.feats.append(feats)
        self.coords.append(coords)
        self.pending += len(feats)
        if self.pending >= self.chunk:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        """Write pending rows: only whole chunks (no read-modify-write) unless at the end."""
        feats, coords = np.concatenate(self.feats), np.concatenate(self.coords)
        n = len(feats) - len(feats) % self.chunk if whole_chunks else len(feats)
        end = self.rows + n
        self.root["features"][self.rows : end] = feats[:n]
        self.root["coords"][self.rows : end] = coords[:n]
        self.rows = end
        self.feats, self.coords, self.pending = [feats[n:]], [coords[n:]], len(feats) - n

    def close(self) -> int:
        """Write what is left and shrink the arrays to the rows written (after skips)."""
        if self.pending:
            self.flush()
        for name in ("features", "coords"):
            array = self.root[name]
            if array.shape[0] != self.rows:
                array.resize((self.rows, array.shape[1]))
        return self.rows
