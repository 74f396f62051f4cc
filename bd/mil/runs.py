"""Trained runs for inference: :func:`load_run` reads a ``checkpoint.pt`` written by ``bd train``.

A :class:`TrainedRun` predicts any :class:`bd.mil.bags.Cohort` under any per-patient presence of the
clinical data and the slide (``predict``), and exposes the attention-pooled slide features
(``slide_embeddings``, for the t-SNE of Fig. 5) and the per-patch attention weights
(``attention``, for heatmaps). A cohort whose features come from another encoder or patch setting,
or whose clinical columns differ from the training table's, is refused with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bd.mil.bags import Cohort
from bd.device import resolve_device
from bd.errors import ConfigError, StoreError, TableError
from bd.mil.models import AttentionPool, MILModel, create_model, model_pools
from bd.mil.packing import Packer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: patch-feature standardisation and S->M teacher statistics in the state
MAX_PATCHES_PER_BATCH = 262_144  # inference batches: at most this many patches ...
MAX_PATIENTS_PER_BATCH = 64  # ... and patients


def patient_chunks(cohort: Cohort, indices: np.ndarray, slide_present: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive groups of ``indices`` (positions into it) small enough for one forward pass."""
    sizes = np.where(slide_present, cohort.lengths()[indices], 0)
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (total + n > MAX_PATCHES_PER_BATCH or i - start >= MAX_PATIENTS_PER_BATCH):
            yield np.arange(start, i)
            start, total = i, 0
        total += int(n)
    if start < len(sizes):
        yield np.arange(start, len(sizes))


def _presence(cohort: Cohort, values: np.ndarray | None, what: str, n: int) -> np.ndarray:
    if values is None:
        return np.ones(n, bool)
    values = np.asarray(values, dtype=bool).reshape(-1)
    if values.shape[0] != n:
        raise ConfigError(f"{what}: {values.shape[0]} values for {n} patients")
    return values


class PooledCache:
    """Each attention pool's slide feature per patient of one cohort, computed once for a fixed
    model. Under any presence mask a patient's bag is all its patches or none, and a bag is
    pooled on its own, so a run's pooled slide features do not depend on the masks: evaluating
    the missing-rate sweeps then runs the patch layer once per pool and patient, and only the
    clinical side is recomputed per mask. Valid while the model's weights do not change."""

    def __init__(self, n_patients: int):
        self.n_patients = n_patients
        self.tables: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # id(pool) -> (features [P, d], cached [P])
        self.rows: np.ndarray | None = None  # cohort rows of the batch being predicted

    @contextlib.contextmanager
    def serving(self, model: MILModel, rows: np.ndarray) -> Iterator[None]:
        """Within: ``model``'s pools look up and store the slide features of the patients at
        ``rows`` (the batch's bags, in order)."""
        pools = model_pools(model)
        self.rows = np.asarray(rows, np.int64)
        for pool in pools:
            pool.pooled_cache = self
        try:
            yield
        finally:
            for pool in pools:
                pool.pooled_cache = None
            self.rows = None

    def _bags(self, offsets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the batch, cohort rows) of the batch's non-empty bags."""
        if self.rows is None or offsets.numel() - 1 != len(self.rows):
            raise RuntimeError("PooledCache used outside serving() or with another batch")
        filled = np.flatnonzero((offsets[1:] - offsets[:-1]).cpu().numpy() > 0)
        return filled, self.rows[filled]

    def covers(self, model: MILModel, rows: np.ndarray) -> bool:
        """Whether every attention pool of ``model`` (if any: a clinical-only model reads no
        patches) has the slide features of the patients at ``rows``: then their batch needs no
        patch features."""
        pools = model_pools(model)
        return all(id(p) in self.tables and self.tables[id(p)][1][rows].all() for p in pools)

    def lookup(self, pool: AttentionPool, offsets: torch.Tensor) -> torch.Tensor | None:
        """The batch's pooled features [B, d] if every non-empty bag is cached (empty bags: zeros)."""
        filled, rows = self._bags(offsets)
        table = self.tables.get(id(pool))
        if table is None or not table[1][rows].all():
            return None
        out = table[0].new_zeros((len(self.rows), table[0].shape[1]))
        out[torch.from_numpy(filled).to(out.device)] = table[0][torch.from_numpy(rows).to(out.device)]
        return out

    def store(self, pool: AttentionPool, offsets: torch.Tensor, pooled: torch.Tensor) -> None:
        filled, rows = self._bags(offsets)
        if id(pool) not in self.tables:
            self.tables[id(pool)] = (pooled.new_zeros((self.n_patients, pooled.shape[1])),
                                     np.zeros(self.n_patients, bool))
        values, cached = self.tables[id(pool)]
        values[torch.from_numpy(rows).to(values.device)] = pooled.detach()[torch.from_numpy(filled).to(values.device)]
        cached[rows] = True


@torch.no_grad()
def predict_patients(
    model: MILModel,
    cohort: Cohort,
    indices: np.ndarray,
    clinical_present: np.ndarray | None = None,
    slide_present: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    cache: PooledCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """N+ probabilities and answering branches of the patients at ``indices`` (presence arrays
    are aligned with ``indices``; a patient without a stored slide never has one). ``cache``:
    the slide features pooled in earlier calls on the same cohort and model (see
    :class:`PooledCache`)."""
    indices = np.asarray(indices, dtype=np.int64)
    clin = _presence(cohort, clinical_present, "clinical_present", len(indices))
    slide = _presence(cohort, slide_present, "slide_present", len(indices)) & cohort.has_slide[indices]
    was_training = model.training
    model.eval()
    probs = np.zeros(len(indices), dtype=np.float64)
    branches = np.empty(len(indices), dtype=object)
    parts = list(patient_chunks(cohort, indices, slide))
    with Packer(model, cohort, device) as packer:
        needed = [cache is None or not cache.covers(model, indices[p][slide[p]]) for p in parts]  # cached: none
        batches = packer.batches([indices[p] for p in parts], [clin[p] for p in parts], [slide[p] for p in parts],
                                 needed)
        for part, batch in zip(parts, batches):
            with cache.serving(model, indices[part]) if cache is not None else contextlib.nullcontext():
                p, b = model.predict(batch)
            probs[part] = p.float().cpu().numpy()
            branches[part] = b
    model.train(was_training)
    return probs, branches.astype(str)


@dataclass
class TrainedRun:
    """A trained model plus what it was trained on (see the module docstring)."""

    model: MILModel
    method: str
    params: dict[str, Any]
    identity: dict[str, Any]
    clinical_columns: list[str]
    threshold: float  # pooled over the method's presence conditions
    epoch: int
    in_dim: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)  # per answering branch
    stage_epochs: dict[str, int] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    seed: int | None = None
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def check(self, cohort: Cohort) -> None:
        """Refuse a cohort this run cannot read: other features or other clinical columns."""
        if cohort.feature_dim != self.in_dim:
            raise StoreError(
                f"{self.path}: the run takes {self.in_dim}-d patch features, the feature stores "
                f"hold {cohort.feature_dim}-d ones (extracted with another encoder?)"
            )
        for key in sorted(set(self.identity) | set(cohort.identity)):
            if self.identity.get(key) != cohort.identity.get(key):
                raise StoreError(
                    f"{self.path}: the run was trained on features with {key}={self.identity.get(key)!r}, "
                    f"the feature stores have {key}={cohort.identity.get(key)!r}"
                )
        if list(cohort.clinical_columns) != list(self.clinical_columns):
            diff = sorted(set(cohort.clinical_columns) ^ set(self.clinical_columns)) or ["(order)"]
            raise TableError(
                f"{self.path}: the run was trained on clinical columns {self.clinical_columns}, the table "
                f"has {list(cohort.clinical_columns)} (differs in {', '.join(diff)})"
            )

    def predict(
        self, cohort: Cohort, clinical_present: np.ndarray, slide_present: np.ndarray | None = None,
        cache: PooledCache | None = None,
    ) -> pd.DataFrame:
        """One row per patient of ``cohort``: patient_id, prob (of N+), branch, label, split, and
        threshold (the validation threshold of the branch that answered). ``cache``: one
        :class:`PooledCache` per cohort across calls (the evaluation's sweeps)."""
        self.check(cohort)
        idx = np.arange(cohort.n_patients)
        probs, branches = predict_patients(self.model, cohort, idx, clinical_present, slide_present, self.device,
                                           cache)
        return pd.DataFrame({
            "patient_id": cohort.patient_ids, "prob": probs, "branch": branches,
            "label": cohort.labels.astype(int), "split": cohort.split,
            "threshold": [self.thresholds.get(b, self.threshold) for b in branches],
        })

    @torch.no_grad()
    def slide_embeddings(self, cohort: Cohort, branch: str | None = None) -> np.ndarray:
        """Attention-pooled slide features [P, dim] of ``branch`` (e.g. "multi" or "single" for BD,
        "image" for image_only); rows of patients without a slide are NaN."""
        self.check(cohort)
        pool = self.model.attention_pool(branch).eval()
        out = np.full((cohort.n_patients, pool.dim), np.nan, dtype=np.float32)
        idx = np.flatnonzero(cohort.has_slide)
        for part in patient_chunks(cohort, idx, np.ones(len(idx), bool)):
            batch = cohort.batch(idx[part], device=self.device)
            out[idx[part]] = pool(batch.features, batch.offsets)[0].float().cpu().numpy()
        return out

    @torch.no_grad()
    def attention(self, cohort: Cohort, patient: str, branch: str | None = None) -> pd.DataFrame:
        """Per-patch attention of one patient's bag (all its slides; weights sum to 1):
        slide_id, x, y (level-0 top-left), attention."""
        self.check(cohort)
        i = cohort.index(patient)
        if not cohort.has_slide[i]:
            raise StoreError(f"patient {patient!r} has no slide with features")
        pool = self.model.attention_pool(branch).eval()
        batch = cohort.batch([i], device=self.device)
        weights = pool(batch.features, batch.offsets)[1].float().cpu().numpy()
        rows = slice(int(cohort.offsets[i]), int(cohort.offsets[i + 1]))
        return pd.DataFrame({
            "slide_id": [cohort.slide_ids[s] for s in cohort.patch_slide[rows]],
            "x": cohort.coords[rows, 0], "y": cohort.coords[rows, 1], "attention": weights,
        })


def load_run(checkpoint_path: str | os.PathLike[str], device: str = "auto") -> TrainedRun:
    """Rebuild the model of a ``bd train`` checkpoint, ready for inference."""
    path = Path(checkpoint_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise StoreError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"{path}: not a bd checkpoint (format {CHECKPOINT_FORMAT}); retrain with `bd train`")
    model = create_model(ckpt["method"], ckpt["in_dim"], ckpt["clin_dim"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    dev = resolve_device(device, "training.device")
    model.to(dev).eval()
    return TrainedRun(
        model=model,
        method=ckpt["method"],
        params=dict(ckpt["params"]),
        identity=dict(ckpt["identity"]),
        clinical_columns=list(ckpt["clinical_columns"]),
        threshold=float(ckpt["threshold"]),
        thresholds={str(k): float(v) for k, v in ckpt.get("thresholds", {}).items()},
        epoch=int(ckpt["epoch"]),
        in_dim=int(ckpt["in_dim"]),
        stage_epochs=dict(ckpt["stage_epochs"]),
        scaler=ckpt.get("scaler"),
        seed=ckpt.get("seed"),
        path=path,
        device=dev,
    )
