"""``bd predict``: the probability of N+ for a new slide, with or without clinical data.

The slide is segmented, tiled and encoded with the settings the run was trained on (encoder,
weights, input size, patch size and microns per pixel come from the run's feature identity;
``--params`` may change only what does not alter the features, such as the tissue threshold or
the batch size). A slide or feature store whose encoder or patch settings differ from the run's is
refused with the reason. Clinical values (raw, as in the clinical table) go through the run's
saved scaler; without them the model answers from its single-modal path, and the patient is
called N+ or N0 at the validation threshold of the branch that answered (as ``bd evaluate``).
``--features`` must come from this slide (level-0 size and MPP recorded by ``bd extract``); the
slide's MPP is then taken from the store when the file has none.
The patch features are standardised inside the model with the training patches' statistics saved in
the checkpoint (:class:`bd.mil.pooling.AttentionPool`), exactly as in training and evaluation. Writes
``prediction.json``, an attention heatmap (with a scale bar), the per-patch attention as a table
and as QuPath GeoJSON (``patches.attention.tsv`` / ``.geojson``, :mod:`bd.exports`) and the
intermediate segmentation, grid and features. ``--samples SHEET`` predicts a whole cohort instead,
with the model and the encoder loaded once (:mod:`bd.external`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.errors import ConfigError, SlideError, StoreError, TableError
from bd.io import write_json
from bd.identity import check_identity, planned_attrs, scaler_path, stage_params
from bd.params import read_mapping

log = logging.getLogger(__name__)

PATIENT = "new"



def parse_clinical(items: Sequence[str] | None) -> dict[str, Any] | None:
    """``--clinical``: one JSON object (or .json/.yaml file), or ``column=value`` pairs; None if absent."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0] or items[0].lstrip().startswith("{"):
        return dict(read_mapping(" ".join(items), "--clinical"))
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--clinical: {item!r} is not column=value (e.g. 'Age(years)=54')")
        out[key.strip()] = value.strip()
    return out


def clinical_vector(run: Any, raw: Mapping[str, Any], scaler: str | None) -> np.ndarray | None:
    """Raw clinical values -> the run's model-input vector, through the scaler it was trained with
    (None when no value is given: the patient has no clinical data)."""
    from bd.cohort.clinical import load_transform
    from bd.cohort.values import category_key

    path = scaler_path(run, scaler)
    transform = load_transform(path)
    if list(transform.columns) != list(run.clinical_columns):
        raise TableError(f"{path}: its columns {transform.columns} are not the run's {run.clinical_columns}")
    known = {category_key(f["column"]): f["column"] for f in transform.features}
    unknown = [k for k in raw if category_key(str(k)) not in known]
    if unknown:
        raise ConfigError(f"--clinical: unknown column {unknown[0]!r}; the run uses {list(known.values())}")
    absent = [c for k, c in known.items() if k not in {category_key(str(x)) for x in raw}]
    parsed = transform.parse_row(raw, source="--clinical")  # the training table's valid ranges apply
    if all(v is None for v in parsed.values()):
        log.warning("--clinical: no clinical value: predicted as a patient without clinical data")
        return None
    if absent:
        log.warning("clinical values missing for %s: imputed as in training", absent)
    return transform.transform_row(raw, source="--clinical").astype(np.float32)


# ---------------------------------------------------------------- the slide


def slide_id_of(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.stem) or "slide"


def store_slide_problems(attrs: Mapping[str, Any], slide: Any) -> list[str]:
    """Why a store with ``attrs`` was not made from the open ``slide`` (empty: it was): its level-0
    size and MPP must agree; a fallback MPP given for a slide without one must be the store's."""
    problems = []
    width, height = attrs.get("slide_width"), attrs.get("slide_height")
    if width is not None and (int(width), int(height)) != tuple(slide.dimensions):
        problems.append(f"level-0 size {width} x {height}, the slide's is {slide.dimensions[0]} x {slide.dimensions[1]}")
    mpp = attrs.get("mpp")
    if mpp and not math.isclose(float(mpp), slide.mpp, rel_tol=1e-3):
        given = "its metadata gives" if slide.mpp_source == "metadata" else "--fallback-mpp gives"
        problems.append(f"{mpp:g} um/px, {given} {slide.mpp:g}")
    return problems


@contextlib.contextmanager
def store_mpp_quiet(quiet: bool) -> Iterator[None]:
    """Silence bd.slides.slide's fallback-MPP warning when the MPP comes from the feature store (logged instead)."""
    from bd.slides.slide import SlideWarning

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", SlideWarning)
        yield


def check_store_slide(store: Path, attrs: Mapping[str, Any], slide_path: Path, fallback_mpp: float | None) -> float | None:
    """Refuse ``--features`` made from another slide, naming both; the MPP to open the slide with
    (the store's when the slide has none in its metadata and no --fallback-mpp was given)."""
    from bd.slides.slide import open_slide

    fallback = fallback_mpp if fallback_mpp is not None else attrs.get("mpp")
    with store_mpp_quiet(fallback_mpp is None), open_slide(slide_path, fallback_mpp=fallback) as slide:
        problems = store_slide_problems(attrs, slide)
        if slide.mpp_source != "metadata" and fallback_mpp is None:
            log.info("%s: no MPP in the file; %g um/px from the feature store %s", slide_path, slide.mpp, store)
    stored_id, slide_id = attrs.get("slide_id"), slide_id_of(slide_path)
    same_id = stored_id is None or str(stored_id) == slide_id
    has_facts = attrs.get("slide_width") is not None
    if problems or not same_id and not has_facts:
        what = f"slide '{stored_id}' ({attrs.get('slide_path', '?')})"
        raise StoreError(f"--features {store} was made from {what}, not from --slide {slide_path} "
                         f"(slide '{slide_id}'): " + ("; ".join(problems) or "other slide id"))
    if not same_id:
        log.warning("--features %s records slide id '%s', --slide %s is '%s'; same size and MPP: taken as "
                    "the same slide", store, stored_id, slide_path, slide_id)
    return fallback


def features_for_slide(slide_path: Path, out_dir: Path, slide_id: str, run: Any, overrides: Mapping[str, Any],
                       fallback_mpp: float | None) -> Path:
    """Segment, tile and encode ``slide_path`` with the run's settings; the feature store's path."""
    from bd.features.extract import Extractor, SlideJob
    from bd.slides.grid import save_grid
    from bd.slides.segment import segment_slide, write_segmentation
    from bd.slides.slide import open_slide
    from bd.slides.tiling import tile_slide

    seg_params, tile_params, feat_params = stage_params(run.identity, overrides)
    check_identity(run.identity, planned_attrs(tile_params, feat_params), "--params")
    extractor = Extractor(feat_params)
    check_identity(run.identity, {"weights_sha256": extractor.weights_id, "feature_dim": extractor.feature_dim},
                   f"encoder {feat_params.encoder} (weights {feat_params.weights or 'random'})")
    with open_slide(slide_path, fallback_mpp=fallback_mpp) as slide:
        seg = segment_slide(slide, seg_params)
        write_segmentation(seg, seg_params, out_dir / "segment", f"{slide_id} ({slide_path.name})")
        grid = tile_slide(slide, seg.mask, seg.scale, tile_params, slide_id, artefacts=seg.artefacts)
    if len(grid) == 0:
        raise SlideError(f"{slide_path}: no patch reaches tiling.tissue_threshold "
                         f"({tile_params.tissue_threshold}); see {out_dir / 'segment' / 'qc.png'}")
    grid_path = save_grid(grid, out_dir / "grid.npz")
    log.info("%s: %d patches of %d px at %.3g um/px", slide_id, len(grid), grid.patch_size, grid.target_mpp)
    return extractor.run(SlideJob(str(slide_path), str(grid_path), str(out_dir / "features" / f"{slide_id}.zarr")))


def one_patient_cohort(run: Any, store: Path, slide_path: Path, clinical: np.ndarray | None) -> Any:
    """A :class:`bd.mil.bags.Cohort` of the new patient: the store's patches and the clinical vector."""
    from bd.mil.bags import load_cohort
    from bd.features.store import read_store, store_slide_id

    attrs = read_store(store, with_features=False).attrs
    check_identity(run.identity, attrs, f"feature store {store}")
    if int(attrs.get("n_patches", 0)) == 0:
        raise StoreError(f"{store}: holds no patch (no tissue): nothing to predict from")
    slide_id = store_slide_id(store)
    values = clinical if clinical is not None else np.zeros(len(run.clinical_columns), np.float32)
    samples = pd.DataFrame({"slide_id": [slide_id], "patient_id": [PATIENT], "path": [str(slide_path)]})
    row = {"patient_id": PATIENT, "split": "test", "label": 0, **dict(zip(run.clinical_columns, values))}
    return load_cohort(store.parent, samples, pd.DataFrame([row]), progress=False)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="trained run (checkpoint.pt of bd train)")
    parser.add_argument("--slide", type=Path, default=None, help="the new slide (any format bd reads)")
    parser.add_argument("--samples", type=Path, default=None,
                        help="a cohort instead of one slide: TSV sample sheet (slide_id, patient_id, path[, mpp]); "
                             "writes predictions.tsv (see bd.external)")
    parser.add_argument("--clinical-table", type=Path, default=None,
                        help="with --samples: raw clinical table (CSV/TSV/XLSX) with the training table's columns")
    parser.add_argument("--clinical-params", default=None,
                        help="with --samples: the clinical section (JSON or file) for label values (default BCNB's)")
    parser.add_argument("--feature-index", type=Path, default=None,
                        help="with --samples: existing stores, as a feature index (index.tsv: slide_id, store) or a "
                             "folder of {slide}.zarr or CLAM/TRIDENT {slide}.h5 stores")
    parser.add_argument("--require-labels", action="store_true",
                        help="with --samples: refuse a clinical table without labels (the cohort is to be evaluated)")
    parser.add_argument("--on-slide-error", choices=["fail", "skip"], default="fail",
                        help="with --samples: a slide that cannot be read stops the run, or counts as missing")
    parser.add_argument("--clinical", nargs="*", default=None,
                        help="raw clinical values: column=value pairs (e.g. 'Age(years)=54' ER=Positive), "
                             "or one JSON object or file; leave out when there is none")
    parser.add_argument("--scaler", default=None, help="the run's scaler.json (default: the path it records)")
    parser.add_argument("--features", type=Path, default=None,
                        help="an existing feature store of this slide (skips segmentation, tiling, extraction)")
    parser.add_argument("--params", default=None,
                        help="overrides: {'segmentation': {...}, 'tiling': {...}, 'features': {...}} (JSON or file)")
    parser.add_argument("--fallback-mpp", type=float, default=None, help="microns per pixel if the slide has none")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="folder for prediction.json, heatmap.png, patches.attention.tsv/.geojson, ...")
    parser.add_argument("--object-type", choices=["tile", "detection"], default="tile",
                        help="QuPath object type of the patches in patches.attention.geojson")


def run(args: argparse.Namespace) -> int:
    from bd.exports import attention_table, write_attention
    from bd.paper.heatmaps import patch_side_level0, render_slide_heatmap
    from bd.mil.runs import load_run
    from bd.features.store import read_store

    if args.samples is not None:
        from bd.external import run_cohort

        return run_cohort(args)
    if args.slide is None:
        raise ConfigError("give --slide (one slide) or --samples (a sample sheet of many)")
    trained = load_run(args.run)
    raw = parse_clinical(args.clinical)
    clinical = clinical_vector(trained, raw, args.scaler) if raw is not None else None
    slide_id = slide_id_of(args.slide)
    out = Path(args.out_dir)
    fallback_mpp = args.fallback_mpp
    if args.features:
        store = args.features
        if not store.exists():
            raise StoreError(f"--features {store} does not exist")
        fallback_mpp = check_store_slide(store, read_store(store, with_features=False).attrs, args.slide, fallback_mpp)
    else:
        store = features_for_slide(args.slide, out, slide_id, trained, read_mapping(args.params), args.fallback_mpp)
    cohort = one_patient_cohort(trained, store, args.slide, clinical)
    result = trained.predict(cohort, clinical_present=np.array([clinical is not None]), slide_present=np.array([True]))
    prob, branch = float(result["prob"].iloc[0]), str(result["branch"].iloc[0])
    att = trained.attention(cohort, PATIENT)
    attrs = read_store(store, with_features=False).attrs
    with store_mpp_quiet(bool(args.features) and args.fallback_mpp is None):
        heatmap = render_slide_heatmap(
            args.slide, att[["x", "y"]].to_numpy(), patch_side_level0(attrs),
            att["attention"].to_numpy(), f"{args.slide.name}: P(N+) = {prob:.3f} ({branch} branch)",
            out / "heatmap.png", fallback_mpp=fallback_mpp)
    exports = write_attention(out, "patches", attention_table(
        slide_id, att[["x", "y"]].to_numpy(), att["attention"].to_numpy(), patch_side_level0(attrs),
        attrs.get("patch_size"), attrs.get("target_mpp")), args.object_type)
    threshold = float(result["threshold"].iloc[0])  # the answering branch's own, as in bd evaluate
    record = {
        "slide": str(args.slide), "run": str(args.run), "method": trained.method,
        "prob_n_plus": prob, "threshold": threshold, "prediction": "N+" if prob >= threshold else "N0",
        "pooled_threshold": float(trained.threshold), "branch": branch, "clinical_present": clinical is not None, "clinical_raw": raw,
        "clinical_input": None if clinical is None else dict(zip(trained.clinical_columns, clinical.tolist())),
        "patches": int(len(att)), "features": str(store), "heatmap": str(heatmap),
        "attention_table": str(exports[0]), "attention_geojson": str(exports[1]),
    }
    write_json(out / "prediction.json", record)
    print(f"{args.slide.name}: P(N+) = {prob:.3f} -> {record['prediction']} (validation threshold {threshold:.3f} "
          f"of the '{branch}' branch of {trained.method}, which answered) "
          f"({'with' if clinical is not None else 'without'} clinical data); "
          f"{len(att)} patches; heatmap {heatmap}")
    return 0
