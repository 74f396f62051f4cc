"""Patient bags: every patch feature of a cohort in memory, packed, so that an epoch does no I/O.

A patient's bag is the union of the patches of all its slides. The bags are held as one tensor
``features`` [sum N, D] with ``offsets`` [P + 1] (patient ``i`` owns rows
``offsets[i]:offsets[i + 1]``), beside the clinical matrix, labels and split of
``results/clinical/clinical.tsv``. A patient whose slides have no store, or only empty stores
(no tissue), has an empty bag and ``has_slide`` False: it counts as missing its slide.
:meth:`Cohort.batch` packs any set of patients into a :class:`Batch` for the models.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bd.cohort.samples import read_samples
from bd.errors import StoreError, TableError
from bd.cohort.values import normalise_id
from bd.cohort.split import SPLITS

log = logging.getLogger(__name__)

CLINICAL_KEYS = ("patient_id", "split", "label")
PRESENT_COLUMN = "clinical_present"  # written by bd clinical: 0 for a patient without any clinical value
NON_FEATURE_COLUMNS = frozenset({*CLINICAL_KEYS, "fold", "clinical_present"})
PACK_CHUNK_ROWS = 512  # Cohort.pack_into: rows converted and standardised at a time (~2 MB at 1,024-d fp32)
# Store attributes that say how features were made, and must agree across every store of a cohort
# and with a trained run: encoder, weights, preprocessing, patch size and magnification. Per-slide
# attributes (slide path, reader, read level, patch counts, extraction device, versions) are not.
IDENTITY_KEYS = ("encoder", "out_stage", "model_kwargs", "pool", "weights_sha256", "input_size", "mean", "std",
                 "resize", "patch_size", "target_mpp", "feature_dim")


def feature_identity(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes of a store that identify its features (see ``IDENTITY_KEYS``)."""
    return {k: attrs[k] for k in IDENTITY_KEYS if k in attrs}


@dataclass
class Batch:
    """Packed bags of ``B`` patients plus their clinical vectors, as the models take them."""

    features: torch.Tensor  # [n, D] patches of all B bags, concatenated
    offsets: torch.Tensor  # [B + 1] int64
    clinical: torch.Tensor  # [B, C] float32, zero where clinical data is absent
    clinical_present: torch.Tensor  # [B] bool
    slide_present: torch.Tensor  # [B] bool (False: empty bag)
    labels: torch.Tensor  # [B] int64

    @property
    def size(self) -> int:
        return int(self.offsets.numel() - 1)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class Cohort:
    """Every patient of a clinical table, with its packed bag, clinical vector, label and split."""

    patient_ids: list[str]
    labels: np.ndarray  # [P] int64, 0 = N0, 1 = N+
    split: np.ndarray  # [P] str: train / val / test
    clinical: np.ndarray  # [P, C] float32
    clinical_columns: list[str]
    features: torch.Tensor  # [sum N, D] float16 (or the dtype asked for)
    offsets: torch.Tensor  # [P + 1] int64
    coords: np.ndarray  # [sum N, 2] int64 level-0 x, y of each patch
    patch_slide: np.ndarray  # [sum N] int32 index into slide_ids
    slide_ids: list[str]
    has_slide: np.ndarray  # [P] bool
    identity: dict[str, Any] = field(default_factory=dict)  # feature/encoder identity (store attrs)
    has_clinical: np.ndarray | None = None  # [P] bool; False: no clinical value at all (None: all True)

    def __post_init__(self) -> None:
        if self.has_clinical is None:
            self.has_clinical = np.ones(len(self.patient_ids), bool)

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_clinical(self) -> int:
        return int(self.clinical.shape[1])

    def lengths(self) -> np.ndarray:
        """Patches per patient."""
        return np.diff(self.offsets.numpy())

    def index(self, patient_id: str) -> int:
        """Row of ``patient_id``; KeyError names the patient."""
        try:
            return self.patient_ids.index(str(patient_id))
        except ValueError:
            raise KeyError(f"patient {patient_id!r} is not in the cohort") from None

    def indices(self, split: str) -> np.ndarray:
        """Rows of the patients in ``split`` (train / val / test)."""
        return np.flatnonzero(self.split == split)

    def batch(
        self,
        indices: Sequence[int] | np.ndarray,
        clinical_present: np.ndarray | None = None,
        slide_present: np.ndarray | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        standardise: tuple[torch.Tensor, torch.Tensor] | None = None,
        with_features: bool = True,
    ) -> Batch:
        """Pack the patients at ``indices``. Absent clinical data is zeroed and absent slides give
        empty bags, so no model can read a modality it is told is missing; a patient without any
        clinical value or without a stored slide never has that modality. ``out``: a buffer to
        pack the features into (its dtype; reused across steps, see :mod:`bd.mil.packing`), with
        ``standardise`` = (mean, scale) applied while packing. Without ``with_features`` the
        features are a zero view of the right shape that costs no memory (for bags whose pooled
        features are cached, :class:`bd.mil.runs.PooledCache`)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        clin_on = np.ones(len(idx), bool) if clinical_present is None else np.asarray(clinical_present, bool)
        clin_on = clin_on & self.has_clinical[idx]
        slide_on = self.has_slide[idx] & (True if slide_present is None else np.asarray(slide_present, bool))
        starts = self.offsets[idx].numpy()
        stops = self.offsets[idx + 1].numpy()
        lengths = np.where(slide_on, stops - starts, 0)
        if not with_features:
            feats = torch.zeros((), dtype=dtype or self.features.dtype).expand(int(lengths.sum()), self.feature_dim)
        elif out is not None:
            feats = self.pack_into(out, starts.tolist(), lengths.tolist(), standardise)
        elif len(idx) == 1 or not slide_on.any():
            feats = self.features[int(starts[0]) : int(starts[0] + lengths[0])] if len(idx) else self.features[:0]
        else:  # packed straight into the dtype asked for: one pass over the rows, not two
            feats = self.features.new_empty((int(lengths.sum()), self.feature_dim), dtype=dtype or self.features.dtype)
            row = 0
            for a, n in zip(starts.tolist(), lengths.tolist()):
                feats[row : row + n].copy_(self.features[a : a + n])
                row += n
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        offsets[1:] = torch.from_numpy(np.cumsum(lengths))
        clinical = torch.from_numpy(self.clinical[idx] * clin_on[:, None].astype(np.float32))
        return Batch(
            features=feats.to(device=device, dtype=dtype or feats.dtype, non_blocking=True),
            offsets=offsets.to(device),
            clinical=clinical.to(device),
            clinical_present=torch.from_numpy(clin_on.copy()).to(device),
            slide_present=torch.from_numpy(slide_on.copy()).to(device),
            labels=torch.from_numpy(self.labels[idx].astype(np.int64)).to(device),
        )

    def pack_into(self, out: torch.Tensor, starts: list[int], lengths: list[int],
                  standardise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The rows ``starts[i]:starts[i] + lengths[i]`` one after another in ``out`` (converted to
        its dtype), z-scored as ``(x - mean) * scale`` in the same pass when ``standardise`` is
        given -- the ops :meth:`bd.mil.pooling.AttentionPool.standardised` applies, in chunks that stay
        in cache; returns the filled rows of ``out``."""
        need = sum(lengths)
        if out.shape[0] < need or out.shape[1] != self.feature_dim:
            raise ValueError(f"pack buffer {tuple(out.shape)} is too small for {need} x {self.feature_dim}")
        row = 0
        step = PACK_CHUNK_ROWS if standardise is not None else max(max(lengths, default=1), 1)
        for a, n in zip(starts, lengths):
            for c in range(0, n, step):  # a plain conversion copies whole bags (measured ~15 % faster)
                m = min(step, n - c)
                src, dst = self.features[a + c : a + c + m], out[row : row + m]
                dst.copy_(src)  # converted in one pass (a mixed-dtype sub would first copy src to a temporary)
                if standardise is not None:  # then, in cache, the ops the model applies in its dtype
                    dst.sub_(standardise[0]).mul_(standardise[1])
                row += m
        return out[:row]

    def select(self, indices: Sequence[int] | np.ndarray) -> Cohort:
        """A new cohort of the patients at ``indices`` (bags copied and repacked)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts, stops = self.offsets[idx].numpy(), self.offsets[idx + 1].numpy()
        rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)] or [np.zeros(0, np.int64)])
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        offsets[1:] = torch.from_numpy(np.cumsum(stops - starts))
        return replace(
            self,
            patient_ids=[self.patient_ids[i] for i in idx],
            labels=self.labels[idx],
            split=self.split[idx],
            clinical=self.clinical[idx],
            features=self.features[torch.from_numpy(rows)],
            offsets=offsets,
            coords=self.coords[rows],
            patch_slide=self.patch_slide[rows],
            has_slide=self.has_slide[idx],
            has_clinical=self.has_clinical[idx],
        )


# ---------------------------------------------------------------- reading the tables


def read_clinical(path: str | os.PathLike[str] | pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The normalised clinical table (a clinical.tsv, or its rows in memory) and its model-input
    columns; errors name file, row, column."""
    if isinstance(path, pd.DataFrame):
        table, path = path.assign(patient_id=path["patient_id"].astype(str)), Path("clinical table")
    else:
        path = Path(path)
        try:
            table = pd.read_csv(path, sep="\t", dtype={"patient_id": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise TableError(f"{path}: cannot read the clinical table ({exc})") from exc
    for col in CLINICAL_KEYS:
        if col not in table.columns:
            raise TableError(f"{path}: column '{col}' is missing (have: {', '.join(table.columns)})")
    table["patient_id"] = [normalise_id(p) for p in table["patient_id"]]
    dup = table["patient_id"][table["patient_id"].duplicated()]
    if len(dup):
        raise TableError(f"{path}: patient_id {dup.iloc[0]!r} appears more than once")
    if PRESENT_COLUMN in table.columns:
        present = pd.to_numeric(table[PRESENT_COLUMN], errors="coerce")
        if not present.isin([0, 1]).all():
            row = int(np.flatnonzero(~present.isin([0, 1]))[0])
            raise TableError(f"{path}: row {row + 2}, column '{PRESENT_COLUMN}': "
                             f"{table[PRESENT_COLUMN].iloc[row]!r} is not 0 or 1")
        table[PRESENT_COLUMN] = present.astype(bool)
    else:
        table[PRESENT_COLUMN] = True
    bad_split = ~table["split"].isin(SPLITS)
    if bad_split.any():
        row = int(np.flatnonzero(bad_split)[0])
        raise TableError(f"{path}: row {row + 2}, column 'split': {table['split'].iloc[row]!r} is not one of {SPLITS}")
    labels = pd.to_numeric(table["label"], errors="coerce")
    bad_label = ~labels.isin([0, 1])
    if bad_label.any():
        row = int(np.flatnonzero(bad_label)[0])
        raise TableError(f"{path}: row {row + 2}, column 'label': {table['label'].iloc[row]!r} is not 0 or 1")
    columns = [c for c in table.columns if c not in NON_FEATURE_COLUMNS]
    for col in columns:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(float))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise TableError(
                f"{path}: row {row + 2}, column '{col}': {table[col].iloc[row]!r} is not a finite number "
                "(model-input columns must be imputed and scaled by `bd clinical`)"
            )
        table[col] = values.astype(np.float32)
    table["label"] = labels.astype(np.int64)
    return table, columns


# ---------------------------------------------------------------- loading the cohort


@dataclass
class _Slide:
    slide_id: str
    path: Path
    n: int


def _check_consistent(first: tuple[Path, dict[str, Any]], path: Path, attrs: dict[str, Any]) -> None:
    """Feature dims and encoder identity must agree across stores; the error names both stores."""
    ref_path, ref = first
    if int(attrs.get("feature_dim", -1)) != int(ref.get("feature_dim", -1)):
        raise StoreError(
            f"feature stores disagree on the feature dimension: {ref_path} has {ref.get('feature_dim')}, "
            f"{path} has {attrs.get('feature_dim')} (re-extract the slides with one encoder)"
        )
    a, b = feature_identity(ref), feature_identity(attrs)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise StoreError(
                f"feature stores disagree on '{key}': {ref_path} has {a.get(key)!r}, {path} has "
                f"{b.get(key)!r} (re-extract the slides with one encoder and patch setting)"
            )


def _scan_stores(
    features: Path, stores: dict[str, Path], slides_of: dict[str, list[str]], paths: dict[str, str] | None = None
) -> tuple[dict[str, list[_Slide]], dict[str, Any], int]:
    """Attributes of every patient's stores (no features read): sizes, identity, consistency.

    A slide of the cohort without a complete store is an error naming the store: the workflow
    builds every store before training or evaluation, so a missing one was lost (moved, purged)
    and must be re-extracted, not silently counted as a missing slide. The one exception is a
    slide whose file is missing too (``on_slide_error: skip`` gives it no job): it counts as
    missing the slide, with a warning."""
    from bd.features.store import read_store

    found: dict[str, list[_Slide]] = {}
    first: tuple[Path, dict[str, Any]] | None = None
    absent, lost = [], []
    for pid, slide_ids in slides_of.items():
        for sid in slide_ids:
            path = stores[sid]  # .zarr, or a CLAM/TRIDENT .h5
            if not path.exists():
                slide_file = (paths or {}).get(sid)
                (absent if slide_file is not None and not os.path.exists(slide_file) else lost).append((sid, path))
                continue
            fs = read_store(path, with_features=False)  # an incomplete store is a StoreError naming it
            n = int(fs.attrs.get("n_patches", len(fs.coords)))
            if n == 0:
                if fs.attrs.get("error"):  # on_slide_error: skip (see bd/workflow/qc.py)
                    log.warning("slide %s: not read (%s: %s); counted as missing", sid,
                                fs.attrs.get("error_stage", "?"), fs.attrs["error"])
                else:
                    log.info("slide %s: empty feature store (no tissue); counted as missing", sid)
                continue
            if first is None:
                first = (path, fs.attrs)
            else:
                _check_consistent(first, path, fs.attrs)
            found.setdefault(pid, []).append(_Slide(sid, path, n))
    if lost:
        shown = ", ".join(str(p) for _, p in lost[:5]) + (", ..." if len(lost) > 5 else "")
        raise StoreError(
            f"{len(lost)} slide(s) of the cohort have no feature store: {shown}; extract them again "
            "(snakemake rebuilds missing stores) or remove the slides from the sample sheet"
        )
    if absent:
        log.warning("%d slide(s) whose file is missing have no feature store (counted as missing the slide), e.g. %s",
                    len(absent), ", ".join(s for s, _ in absent[:5]))
    if first is None:
        raise StoreError(f"{features}: no non-empty feature store for any patient of the cohort")
    return found, first[1], int(first[1].get("feature_dim", 0))


def load_cohort(
    features: str | os.PathLike[str],
    samples_tsv: str | os.PathLike[str] | pd.DataFrame,
    clinical_tsv: str | os.PathLike[str] | pd.DataFrame,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    split: str | None = None,
) -> Cohort:
    """Every patient of ``clinical_tsv`` (of one ``split`` when given: only its stores are read)
    with its slides' features (``samples_tsv`` maps slides to patients; both tables are files or
    their rows in memory; ``features`` is the feature index or a folder of stores), packed in
    memory as ``dtype``. Stores are read twice: attributes first (to size one preallocated tensor
    and check that all stores come from the same encoder), then features."""
    from tqdm import tqdm

    from bd.features.store import read_store, store_paths

    features = Path(features)
    table, columns = read_clinical(clinical_tsv)
    sheet = samples_tsv.copy() if isinstance(samples_tsv, pd.DataFrame) else read_samples(samples_tsv)
    sheet["patient_id"] = [normalise_id(p) for p in sheet["patient_id"]]
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
        if table.empty:
            raise TableError(f"{clinical_tsv}: no patient in the {split} split")
        sheet = sheet[sheet["patient_id"].isin(set(table["patient_id"]))].reset_index(drop=True)
    patients = table["patient_id"].tolist()
    known = set(patients)
    orphans = sorted(set(sheet["patient_id"]) - known)
    if orphans:
        log.warning("%d patient(s) of %s are not in %s and are left out, e.g. %s",
                    len(orphans), samples_tsv, clinical_tsv, ", ".join(orphans[:5]))
    slides_of: dict[str, list[str]] = {p: [] for p in patients}
    for sid, pid in zip(sheet["slide_id"], sheet["patient_id"]):
        if pid in known:
            slides_of[pid].append(sid)
    stores = store_paths(features, list(sheet["slide_id"]))
    found, attrs, dim = _scan_stores(features, stores, slides_of, dict(zip(sheet["slide_id"], sheet["path"])))

    counts = np.array([sum(s.n for s in found.get(p, [])) for p in patients], dtype=np.int64)
    total = int(counts.sum())
    features = torch.empty((total, dim), dtype=dtype)
    coords = np.zeros((total, 2), dtype=np.int64)
    patch_slide = np.zeros(total, dtype=np.int32)
    slide_ids: list[str] = []
    row = 0
    todo = [s for p in patients for s in found.get(p, [])]
    for slide in tqdm(todo, desc="loading feature stores", unit="slide", disable=not progress):
        fs = read_store(slide.path)
        n = fs.features.shape[0]
        if n != slide.n or fs.features.shape[1] != dim:
            raise StoreError(f"{slide.path}: holds {fs.features.shape} features, its attributes say ({slide.n}, {dim})")
        features[row : row + n] = torch.from_numpy(np.ascontiguousarray(fs.features)).to(dtype)
        coords[row : row + n] = fs.coords
        patch_slide[row : row + n] = len(slide_ids)
        slide_ids.append(slide.slide_id)
        row += n
    offsets = torch.zeros(len(patients) + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(np.cumsum(counts))
    has_slide = counts > 0
    log.info("cohort: %d patients (%d without a slide, %d without clinical data), %d patches, %d-d features, "
             "%d clinical columns", len(patients), int((~has_slide).sum()), int((~table[PRESENT_COLUMN]).sum()),
             total, dim, len(columns))
    return Cohort(
        patient_ids=[str(p) for p in patients],
        labels=table["label"].to_numpy(np.int64),
        split=table["split"].to_numpy(str),
        clinical=table[columns].to_numpy(np.float32).reshape(len(patients), len(columns)),
        clinical_columns=columns,
        features=features,
        offsets=offsets,
        coords=coords,
        patch_slide=patch_slide,
        slide_ids=slide_ids,
        has_slide=has_slide,
        identity=feature_identity(attrs),
        has_clinical=table[PRESENT_COLUMN].to_numpy(bool),
    )
