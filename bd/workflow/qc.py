"""``bd qc``: the slides a run could not read, and the cohort checks, as two report tables.

With ``on_slide_error: skip`` each per-slide stage records a slide it could not read in its own
output: ``segment/{slide}/mask.json`` and the patch grid's metadata (``error``, ``error_stage``),
then the feature store's attributes (an empty complete store). A slide file missing on disk gets
no job at all. This step gathers them into

* ``slide_errors.tsv``: ``slide_id, patient_id, stage, reason``, one row per slide not read
  (``stage`` is ``input`` for a missing file, else the first stage that failed);
* ``cohort_checks.tsv``: the counts of :mod:`bd.workflow.check` (slides without a clinical row, patients
  without a slide or label, missing files, slides not read, slides whose patches were upsampled
  by more than 1.25x, patients left without any usable slide), ``check, level, count, examples,
  meaning``.

It reads one record per slide (the store's attributes; the grid or mask only when a store is
missing), so it stays a few seconds for thousands of slides.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bd.cohort.samples import read_samples
from bd.errors import BDError, StoreError
from bd.workflow.layout import slide_output

log = logging.getLogger(__name__)

COLUMNS = ["slide_id", "patient_id", "stage", "reason"]
Record = tuple[str, str] | None  # (stage, reason) of a slide not read, None when read


def _mask_error(path: Path) -> Record:
    info = json.loads(path.read_text())
    return (info.get("error_stage", "segment"), str(info["error"])) if info.get("error") else None


def _grid_error(path: Path) -> Record:
    from bd.slides.grid import load_grid

    meta = load_grid(path).meta
    return (meta.get("error_stage", "tile"), str(meta["error"])) if meta.get("error") else None


def _store_error(path: Path) -> Record:
    from bd.features.store import read_store

    attrs = read_store(path, with_features=False).attrs
    return (attrs.get("error_stage", "extract"), str(attrs["error"])) if attrs.get("error") else None


def _store_of(results: Path, slide: str) -> Path:
    from bd.features.store import store_path

    return store_path(results / "features", slide)  # .zarr, or a linked CLAM/TRIDENT .h5


# Where each stage keeps a slide's record (results/ layout), latest stage first: a later stage
# carries an earlier stage's error forward, so the first record found answers.
STAGE_RECORDS: list[tuple[Callable[[Path, str], Path], Callable[[Path], Record]]] = [
    (lambda results, slide: _store_of(results, slide), _store_error),
    (lambda results, slide: Path(slide_output(results, "grid", slide)), _grid_error),
    (lambda results, slide: Path(slide_output(results, "mask_info", slide)), _mask_error),
]


def slide_record(results: Path, slide_id: str, path: str) -> Record:
    """(stage, reason) if the slide was not read (``input`` when its file is missing and no stage
    has a record of it), else None."""
    for where, read in STAGE_RECORDS:
        record_path = where(results, slide_id)
        if record_path.exists():
            try:
                return read(record_path)
            except (StoreError, OSError, ValueError, KeyError) as exc:
                raise BDError(f"{record_path}: cannot read the slide's record ({exc}); rerun its stage") from exc
    if not os.path.exists(path):
        return "input", f"{path}: file not found"
    return None


def slide_errors(samples: pd.DataFrame, results: Path) -> pd.DataFrame:
    """One row per slide of ``samples`` that was not read: slide_id, patient_id, stage, reason."""
    rows = []
    for sid, pid, path in zip(samples["slide_id"], samples["patient_id"], samples["path"]):
        record = slide_record(results, str(sid), str(path))
        if record is not None:
            rows.append((str(sid), str(pid), *record))
    return pd.DataFrame(rows, columns=COLUMNS)


def upsampled_slides(samples: pd.DataFrame, results: Path) -> list[str]:
    """Slides whose feature store records patches upsampled (slide MPP over target MPP) by more
    than tiling's warning level (1.25x)."""
    from bd.features.store import read_store
    from bd.slides.tiling import UPSAMPLE_WARNING

    out = []
    for sid in samples["slide_id"]:
        path = _store_of(results, str(sid))
        if not path.exists():
            continue
        attrs = read_store(path, with_features=False).attrs
        mpp, target = attrs.get("mpp"), attrs.get("target_mpp")
        if mpp and target and mpp / target > UPSAMPLE_WARNING:
            out.append(str(sid))
    return out


def cohort_checks(samples: pd.DataFrame, errors: pd.DataFrame, config: dict,
                  upsampled: list[str] | None = None) -> pd.DataFrame:
    """The cohort check table of :mod:`bd.workflow.check`, with the slides this run could not read."""
    from bd.workflow import check

    result = check.check_sheet(samples, config.get("on_slide_error", "fail"))
    if config["cohort"].get("clinical_table"):
        clinical = check.read_clinical(config)
        check.check_against_table(result, samples, clinical.ids, clinical.labels)
        check.check_clinical_values(result, config, clinical)
    result.add("slide_not_read", set(errors["slide_id"]) - set(result.missing_slides))  # missing: counted above
    result.add("slide_upsampled", upsampled or [])
    check.add_unusable(result, samples, errors["slide_id"])
    return result.table()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, type=Path, help="results/samples.tsv")
    parser.add_argument("--results", required=True, type=Path, help="the results folder (segment/, tiles/, features/)")
    parser.add_argument("--config", default=None,
                        help="config as JSON/YAML (on_slide_error, cohort.clinical_table, clinical): "
                             "adds the cohort checks")
    parser.add_argument("--out", required=True, type=Path, help="slide_errors.tsv to write")
    parser.add_argument("--checks-out", type=Path, default=None, help="cohort_checks.tsv to write (needs --config)")


def run(args: argparse.Namespace) -> int:
    from bd.io import write_text
    from bd.params import read_mapping

    samples = read_samples(args.samples)
    errors = slide_errors(samples, args.results)
    write_text(args.out, errors.to_csv(sep="\t", index=False))
    for stage, n in errors["stage"].value_counts().items():
        log.warning("%d slide(s) not read at stage %s (see %s)", n, stage, args.out)
    if args.checks_out is not None:
        if not args.config:
            raise BDError("--checks-out needs --config (the clinical table and its columns)")
        checks = cohort_checks(samples, errors, read_mapping(args.config, "--config"),
                               upsampled_slides(samples, args.results))
        write_text(args.checks_out, checks.to_csv(sep="\t", index=False))
    print(f"{len(samples)} slides, {len(errors)} not read -> {args.out}")
    return 0
