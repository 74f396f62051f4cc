"""Cohort inference: a trained run applied to many slides at once (``bd predict --samples``), and
the external-cohort target of the workflow.

The model and the encoder are loaded once. Each slide of the sample sheet (``slide_id``,
``patient_id``, ``path``, optional ``mpp``) is segmented, tiled and encoded with the run's own
feature settings into ``OUT/features/{slide}.zarr`` (a complete store with the same settings is
kept, so an interrupted run resumes), unless ``--feature-index`` (a feature index, or a folder of
stores) already gives its store (Zarr, or a CLAM/TRIDENT ``.h5`` with its identity file). Either
way ``OUT/features/index.tsv`` lists the store of every slide that was read, the feature index
``bd evaluate`` takes. The optional clinical table (raw, as the training
table: CSV, TSV or XLSX, the run's id and feature columns) goes through the run's saved scaler;
a patient without a row, or without any value, is predicted without clinical data, and one with
neither a slide with tissue nor clinical data is listed without a prediction (branch ``none``). Writes
``predictions.tsv`` (one row per patient: slides, probability of N+, branch that answered, its
validation threshold, prediction, label where the table has one), every slide's per-patch attention
(``attention/<slide>.attention.tsv`` and QuPath ``.geojson``, see :mod:`bd.exports`), and, where
labels are given,
``samples.tsv`` and ``clinical.tsv`` of the labelled patients in the layout ``bd evaluate`` reads
(split ``test``), so that the external cohort is evaluated like the test split.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.errors import ConfigError, SlideError, StoreError, TableError
from bd.params import param

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["patient_id", "slides", "prob_n_plus", "branch", "threshold", "prediction",
                      "clinical_present", "slide_present", "label", "method", "run"]


@dataclass
class ExternalParams:
    """Target external: a trained run on another cohort (bd predict --samples, then bd evaluate)."""

    run: str | None = param(None, description="checkpoint.pt, or experiment/seedN under results/train (e.g. bd/seed0)")
    sample_sheet: str | None = param(None, description="TSV: slide_id, patient_id, path (optional mpp)")
    clinical_table: str | None = param(None, description="raw clinical table (CSV, TSV, XLSX) with the training "
                                                         "columns; null: none")
    features_dir: str | None = param(None, description="existing stores ({slide}.zarr or .h5); null: extract")
    fallback_mpp: float | None = param(None, exclusive_minimum=0,
                                       description="microns per pixel of slides without any in their metadata")
    evaluate: bool = param(True, description="evaluate like the test split where the table has labels")

    def checkpoint(self, results: str) -> str:
        """The run's checkpoint path: a file, or ``experiment/seedN`` under ``results/train``."""
        if not self.run:
            raise ConfigError("external.run: give the trained run (checkpoint.pt, or e.g. 'bd/seed0')")
        if self.run.endswith(".pt"):
            return self.run
        return os.path.join(results, "train", self.run, "checkpoint.pt")


# ---------------------------------------------------------------- inputs


def read_sheet(path: Path) -> pd.DataFrame:
    """The external sample sheet, checked (paths relative to the sheet's folder)."""
    from bd.cohort.samples import check_sample_sheet, read_sample_sheet

    sheet = check_sample_sheet(read_sample_sheet(path), str(path)).reset_index(drop=True)
    if sheet.empty:
        raise TableError(f"{path}: the sample sheet lists no slide")
    return sheet


def clinical_rows(run: Any, table_path: Path | None, scaler: str | None,
                  clinical_params: dict[str, Any] | None) -> tuple[dict[str, np.ndarray | None], dict[str, int | None]]:
    """Per patient of the raw table: the run's model-input vector (None: no value) and the label
    (None: blank or no label column). Errors name the table, row and column."""
    from bd.cohort.clinical import load_transform
    from bd.cohort.table import ClinicalParams, find_column, parse_label, read_table
    from bd.identity import scaler_path
    from bd.cohort.values import ValueParseError, is_missing, normalise_id

    if table_path is None:
        return {}, {}
    path = scaler_path(run, scaler)
    transform = load_transform(path)
    params = ClinicalParams(**{k: v for k, v in (clinical_params or {}).items()
                               if k in {"id_column", "label_column", "positive_values", "negative_values"}})
    id_name = transform.meta.get("id_column") or params.id_column
    label_name = transform.meta.get("label_column") or params.label_column
    frame = read_table(table_path)
    id_col = find_column(frame, id_name, table_path, "id column (the training table's)")
    label_col = next((c for c in frame.columns if c == label_name or c.lower() == label_name.lower()), None)
    vectors: dict[str, np.ndarray | None] = {}
    labels: dict[str, int | None] = {}
    for row, cells in frame.iterrows():
        pid = normalise_id(cells[id_col])
        if not pid:
            raise TableError(f"{table_path}: row {row}, column {id_col!r}: the patient id is empty")
        if pid in vectors:
            raise TableError(f"{table_path}: row {row}, column {id_col!r}: duplicate patient id {pid!r}")
        raw = {c: cells[c] for c in frame.columns if c not in (id_col, label_col)}
        source = f"{table_path}: row {row}"
        parsed = transform.parse_row(raw, source=source)
        vectors[pid] = None if all(v is None for v in parsed.values()) else \
            transform.transform_row(raw, source=source).astype(np.float32)
        if label_col is not None and not is_missing(cells[label_col]):
            try:
                labels[pid] = parse_label(cells[label_col], params)
            except ValueParseError as exc:
                raise TableError(f"{table_path}: row {row}, column {label_col!r}: {exc}") from exc
        else:
            labels[pid] = None
    return vectors, labels


def clinical_label_column(run: Any, scaler: str | None) -> str:
    """The label column the run's training table had (from its scaler)."""
    from bd.cohort.clinical import ClinicalParams, load_transform
    from bd.identity import scaler_path

    try:
        return str(load_transform(scaler_path(run, scaler)).meta.get("label_column") or ClinicalParams().label_column)
    except (ConfigError, TableError):
        return ClinicalParams().label_column


# ---------------------------------------------------------------- features


def slide_stores(run: Any, sheet: pd.DataFrame, out: Path, feature_index: Path | None,
                 overrides: dict[str, Any], fallback_mpp: float | None, on_slide_error: str) -> tuple[dict[str, Path], dict[str, str]]:
    """Every slide's feature store (given by ``feature_index``, or extracted here with the run's
    settings, the encoder loaded once); the stores by slide and the slides that could not be read
    (id -> reason)."""
    from bd.identity import check_identity
    from bd.features.store import read_store, store_paths

    if feature_index is not None:
        stores = store_paths(feature_index, list(sheet["slide_id"]))
        missing = [s for s, path in stores.items() if not path.exists()]
        if missing:
            raise StoreError(f"--feature-index {feature_index}: no store for slide(s) {', '.join(missing[:5])}"
                             + (", ..." if len(missing) > 5 else "") + " ({slide}.zarr or {slide}.h5)")
        for path in stores.values():
            check_identity(run.identity, read_store(path, with_features=False).attrs, f"feature store {path}")
        return stores, {}
    extract = SlideExtraction(run, out, overrides)
    failed: dict[str, str] = {}
    for rec in sheet.itertuples(index=False):
        mpp = float(rec.mpp) if "mpp" in sheet.columns and str(getattr(rec, "mpp", "")).strip() else None
        try:
            extract(Path(rec.path), rec.slide_id, fallback_mpp, mpp)
        except SlideError as exc:
            if on_slide_error == "fail":
                raise SlideError(f"sample sheet slide {rec.slide_id!r}: {exc}") from exc
            log.warning("slide %s: not read (%s); its patient counts as missing the slide", rec.slide_id, exc)
            failed[rec.slide_id] = str(exc)
    return {sid: out / "features" / f"{sid}.zarr" for sid in sheet["slide_id"] if sid not in failed}, failed


class SlideExtraction:
    """Segment, tile and encode slides with one run's settings; the encoder is built once."""

    def __init__(self, run: Any, out: Path, overrides: dict[str, Any]) -> None:
        from bd.features.extract import Extractor
        from bd.identity import check_identity, planned_attrs, stage_params

        self.seg, self.tile, feat = stage_params(run.identity, overrides)
        check_identity(run.identity, planned_attrs(self.tile, feat), "--params")
        self.extractor = Extractor(feat)
        check_identity(run.identity, {"weights_sha256": self.extractor.weights_id,
                                      "feature_dim": self.extractor.feature_dim},
                       f"encoder {feat.encoder} (weights {feat.weights or 'random'})")
        self.out = out

    def __call__(self, slide_path: Path, slide_id: str, fallback_mpp: float | None, mpp: float | None) -> Path:
        from bd.features.extract import SlideJob
        from bd.slides.grid import save_grid
        from bd.slides.segment import segment_slide, write_segmentation
        from bd.slides.slide import open_slide
        from bd.slides.tiling import tile_slide

        store = self.out / "features" / f"{slide_id}.zarr"
        grid_path = self.out / "tiles" / f"{slide_id}.npz"
        if store.exists() and grid_path.exists():  # resume: the extractor keeps an identical store
            return self.extractor.run(SlideJob(str(slide_path), str(grid_path), str(store)), resume=True)
        with open_slide(slide_path, fallback_mpp=fallback_mpp, mpp=mpp) as slide:
            seg = segment_slide(slide, self.seg)
            write_segmentation(seg, self.seg, self.out / "segment" / slide_id, f"{slide_id} ({slide_path.name})")
            grid = tile_slide(slide, seg.mask, seg.scale, self.tile, slide_id, artefacts=seg.artefacts)
        if len(grid) == 0:  # an empty store, as bd extract writes: the patient counts as missing the slide
            log.warning("%s: no patch reaches tiling.tissue_threshold (%s); counted as missing the slide (see %s)",
                        slide_path, self.tile.tissue_threshold, self.out / "segment" / slide_id / "qc.png")
        save_grid(grid, grid_path)
        log.info("%s: %d patches", slide_id, len(grid))
        return self.extractor.run(SlideJob(str(slide_path), str(grid_path), str(store)), resume=True)


# ---------------------------------------------------------------- the cohort


def cohort_tables(run: Any, sheet: pd.DataFrame, vectors: dict[str, np.ndarray | None],
                  labels: dict[str, int | None], failed: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sample sheet and the normalised clinical table (split ``test``) of the cohort, in the
    layout :func:`bd.mil.bags.load_cohort` reads; unlabelled patients get label 0 here (not evaluated)."""
    from bd.cohort.values import normalise_id

    patients = list(dict.fromkeys(normalise_id(p) for p in sheet["patient_id"]))
    unknown = sorted(set(vectors) - set(patients))
    if unknown:
        log.warning("%d patient(s) of the clinical table have no slide in the sample sheet and are left out, e.g. %s",
                    len(unknown), ", ".join(unknown[:5]))
    no_row = [p for p in patients if vectors and p not in vectors]
    if no_row:
        log.warning("%d patient(s) have no row in the clinical table: predicted without clinical data, e.g. %s",
                    len(no_row), ", ".join(no_row[:5]))
    width = len(run.clinical_columns)
    rows = []
    for pid in patients:
        vec = vectors.get(pid)
        rows.append({"patient_id": pid, "split": "test", "label": int(labels.get(pid) or 0),
                     **dict(zip(run.clinical_columns, np.zeros(width, np.float32) if vec is None else vec)),
                     "clinical_present": int(vec is not None)})
    samples = sheet.loc[~sheet["slide_id"].isin(failed), ["slide_id", "patient_id", "path"]]
    return samples, pd.DataFrame(rows, columns=["patient_id", "split", "label", *run.clinical_columns,
                                                "clinical_present"])


def predict_cohort(run: Any, sheet: pd.DataFrame, vectors: dict[str, np.ndarray | None],
                   labels: dict[str, int | None], stores: dict[str, Path], failed: dict[str, str], out: Path) -> pd.DataFrame:
    """One row per patient (see :data:`PREDICTION_COLUMNS`); writes the cohort tables into ``out``."""
    from bd.mil.bags import load_cohort
    from bd.io import atomic_path

    from bd.features.store import write_feature_index

    samples, clinical = cohort_tables(run, sheet, vectors, labels, failed)
    index = write_feature_index(stores, out / "features" / "index.tsv")  # what bd evaluate takes
    cohort = load_cohort(index, samples, clinical, progress=False)
    has_clinical = np.asarray(cohort.has_clinical, bool)
    has_slide = np.asarray(cohort.has_slide, bool)
    result = run.predict(cohort, clinical_present=has_clinical, slide_present=has_slide)
    slides_of = samples.groupby("patient_id")["slide_id"].apply(lambda s: ";".join(s)).to_dict()
    frame = pd.DataFrame({
        "patient_id": result["patient_id"], "slides": [slides_of.get(p, "") for p in result["patient_id"]],
        "prob_n_plus": result["prob"].astype(float), "branch": result["branch"],
        "threshold": result["threshold"].astype(float),
        "prediction": np.where(result["prob"] >= result["threshold"], "N+", "N0"),
        "clinical_present": has_clinical, "slide_present": has_slide, "label": [labels.get(p) for p in result["patient_id"]],
        "method": run.method, "run": str(run.path),
    }, columns=PREDICTION_COLUMNS)
    nothing = ~has_clinical & ~has_slide  # no modality at all: no prediction rather than the model's prior
    if nothing.any():
        log.warning("%d patient(s) have neither a slide with tissue nor clinical data: not predicted, e.g. %s",
                    int(nothing.sum()), ", ".join(frame["patient_id"][nothing].head(5)))
        frame["prob_n_plus"] = frame["prob_n_plus"].where(~nothing)
        frame.loc[nothing, ["branch", "prediction"]] = ["none", ""]
    write_cohort_attention(run, cohort, stores, out / "attention")
    with atomic_path(out / "predictions.tsv") as tmp:
        frame.to_csv(tmp, sep="\t", index=False, na_rep="")
    labelled = clinical["patient_id"].isin([p for p, y in labels.items() if y is not None])
    if labelled.any():
        with atomic_path(out / "clinical.tsv") as tmp:
            clinical[labelled].to_csv(tmp, sep="\t", index=False)
        with atomic_path(out / "samples.tsv") as tmp:
            samples[samples["patient_id"].map(str).isin(set(clinical.loc[labelled, "patient_id"]))].to_csv(
                tmp, sep="\t", index=False)
    if failed:
        with atomic_path(out / "slide_errors.tsv") as tmp:
            pd.DataFrame({"slide_id": list(failed), "reason": list(failed.values())}).to_csv(tmp, sep="\t", index=False)
    return frame


def write_cohort_attention(run: Any, cohort: Any, stores: dict[str, Path], out_dir: Path) -> None:
    """Every slide's per-patch attention as a table and as QuPath GeoJSON (``<slide>.attention.*``)."""
    from bd.exports import attention_table, write_attention
    from bd.paper.heatmaps import patch_side_level0
    from bd.features.store import read_store

    out_dir.mkdir(parents=True, exist_ok=True)
    for i in np.flatnonzero(cohort.has_slide):
        att = run.attention(cohort, cohort.patient_ids[i])
        for sid, part in att.groupby("slide_id", sort=False):
            attrs = read_store(stores[str(sid)], with_features=False).attrs
            write_attention(out_dir, str(sid), attention_table(
                sid, part[["x", "y"]].to_numpy(), part["attention"].to_numpy(), patch_side_level0(attrs),
                attrs.get("patch_size"), attrs.get("target_mpp")))


def run_cohort(args: argparse.Namespace) -> int:
    """``bd predict --samples SHEET [--clinical-table TABLE]``."""
    from bd.params import read_mapping
    from bd.mil.runs import load_run

    if args.slide is not None or args.clinical is not None or args.features is not None:
        raise ConfigError("--samples predicts a cohort: leave out --slide, --clinical and --features "
                          "(give --clinical-table and --feature-index instead)")
    sheet_path = Path(args.samples)
    sheet = read_sheet(sheet_path)
    trained = load_run(args.run)
    table = Path(args.clinical_table) if args.clinical_table else None
    vectors, labels = clinical_rows(trained, table, args.scaler, read_mapping(args.clinical_params, "--clinical-params"))
    if args.require_labels and not any(y is not None for y in labels.values()):
        raise TableError(f"{table or '--clinical-table'}: no patient has a label (column "
                         f"{clinical_label_column(trained, args.scaler)!r}), so the cohort cannot be evaluated; "
                         "add the labels or set external.evaluate: false")
    out = Path(args.out_dir)
    feature_index = Path(args.feature_index) if args.feature_index else None
    stores, failed = slide_stores(trained, sheet, out, feature_index, read_mapping(args.params), args.fallback_mpp,
                                  args.on_slide_error)
    frame = predict_cohort(trained, sheet, vectors, labels, stores, failed, out)
    n_lab = int(frame["label"].notna().sum())
    print(f"{len(frame)} patients ({int(frame['clinical_present'].sum())} with clinical data, {n_lab} labelled, "
          f"{len(failed)} slide(s) not read): {int((frame['prediction'] == 'N+').sum())} N+, "
          f"{int((frame['prediction'] == 'N0').sum())} N0 -> {out / 'predictions.tsv'}")
    return 0
