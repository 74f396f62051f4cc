"""The sample sheet: which slides belong to which patient, and where they are on disk.

Built once when the workflow is parsed, from (in order of preference) a TSV sample sheet, a path
pattern with ``{slide}``, or the demo cohort's planned file names. Light imports only: the
Snakefile imports this module.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bd.errors import ConfigError, TableError
from bd.params import param

SAMPLE_COLUMNS = ["slide_id", "patient_id", "path"]
OPTIONAL_COLUMNS = ["mpp"]  # level-0 microns per pixel of the slide (flat JPEGs carry none)
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm",
                    ".jpg", ".jpeg", ".png")
_SLIDE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(kw_only=True)
class CohortParams:
    """where the cohort's slides, clinical table, split files and annotations are (the workflow, bd samples, bd check)"""

    name: str = param(description="the cohort's name")
    slide_pattern: str = param("", description="path pattern with {slide}, e.g. data/BCNB/WSIs/{slide}.jpg")
    sample_sheet: str | None = param(
        None, description="TSV with slide_id, patient_id, path (optional mpp); instead of slide_pattern")
    clinical_table: str = param(description="the raw clinical table (CSV, TSV or XLSX)")
    split_dir: str | None = param(
        None, description="folder of train_id.txt, val_id.txt, test_id.txt (split.mode: official)")
    annotations_dir: str | None = param(
        None, description="folder of {slide}.json annotation polygons (read with tiling.use_annotations)")
    fallback_mpp: float = param(0.5, exclusive_minimum=0, description="microns per pixel of slides without any in "
                                                                      "their metadata (used with a warning)")


def demo_slides(demo: dict[str, Any]) -> pd.DataFrame:
    """The demo cohort's slides: patient ``i`` (1..N) has ``WSIs/i.tif`` (pyramidal TIFF) or, for a
    seeded ``flat_jpeg_fraction`` of patients, ``WSIs/i.jpg`` (flat JPEG, as in BCNB); the keys the
    section leaves out are DemoParams' defaults, as for ``bd demo``."""
    from bd.demo.params import DemoParams
    from bd.params import with_defaults

    demo = with_defaults(DemoParams, demo)
    n = int(demo["patients"])
    rng = np.random.default_rng(int(demo["seed"]))
    n_flat = int(round(n * float(demo["flat_jpeg_fraction"])))
    flat = set(rng.choice(np.arange(1, n + 1), size=n_flat, replace=False).tolist()) if n_flat else set()
    out_dir = Path(demo["out_dir"]) / "WSIs"
    rows = [
        {"slide_id": str(i), "patient_id": str(i), "path": str(out_dir / f"{i}.{'jpg' if i in flat else 'tif'}")}
        for i in range(1, n + 1)
    ]
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def slides_from_pattern(pattern: str) -> pd.DataFrame:
    """Slides matching ``pattern`` (a path with ``{slide}``); the patient id is the slide id."""
    if "{slide}" not in pattern:
        raise ConfigError(f"cohort.slide_pattern: {pattern!r} must contain '{{slide}}'")
    head, tail = pattern.split("{slide}", 1)
    regex = re.compile(re.escape(head) + r"(?P<slide>[^/]+?)" + re.escape(tail) + "$")
    rows = []
    for path in sorted(glob.glob(pattern.replace("{slide}", "*"))):
        match = regex.match(path)
        if match and Path(path).is_file():
            sid = match["slide"]
            rows.append({"slide_id": sid, "patient_id": sid, "path": path})
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def read_samples(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A sample sheet TSV as written (ids as text, "NA" kept); a missing column or an unreadable
    file is a TableError naming the file."""
    path = Path(path)
    try:
        sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise TableError(f"{path}: cannot read the sample sheet as a tab-separated table ({exc})") from exc
    missing = [c for c in SAMPLE_COLUMNS if c not in sheet.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; expected {SAMPLE_COLUMNS}")
    return sheet


def read_sample_sheet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and check a TSV sample sheet; errors name the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cohort.sample_sheet: file {path} does not exist")
    raw = read_samples(path)
    columns = SAMPLE_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in raw.columns]
    sheet = raw[columns].apply(lambda col: col.str.strip())
    base = path.parent
    sheet["path"] = [p if os.path.isabs(p) else str(base / p) for p in sheet["path"]]
    return sheet


def check_sample_sheet(sheet: pd.DataFrame, source: str = "sample sheet") -> pd.DataFrame:
    """Reject empty ids, ids unfit for file names, and duplicate slides (row numbers are 1-based
    data rows, as a spreadsheet shows them after the header). Patient ids are normalised as the
    clinical table's and the split files' are (:func:`bd.cohort.values.normalise_id`: ``001`` is ``1``)."""
    from bd.cohort.values import normalise_id

    sheet = sheet.copy()
    sheet["patient_id"] = [normalise_id(p) for p in sheet["patient_id"]]
    for row, rec in enumerate(sheet.itertuples(index=False), start=2):
        for col in ("slide_id", "patient_id", "path"):
            if not getattr(rec, col):
                raise TableError(f"{source}: row {row}: column '{col}' is empty")
        if not _SLIDE_ID.match(rec.slide_id):
            raise TableError(
                f"{source}: row {row}: slide_id {rec.slide_id!r} may use only letters, digits, '.', '_' and '-'"
            )
    for row, value in enumerate(sheet["mpp"] if "mpp" in sheet.columns else [], start=2):
        if value not in ("", None) and not _positive(value):
            raise TableError(f"{source}: row {row}: column 'mpp' must be a positive number of microns "
                             f"per pixel (or empty), got {value!r}")
    dup = sheet["slide_id"][sheet["slide_id"].duplicated()]
    if len(dup):
        rows = [i + 2 for i in range(len(sheet)) if sheet["slide_id"].iloc[i] == dup.iloc[0]]
        raise TableError(f"{source}: duplicate slide_id {dup.iloc[0]!r} in rows {rows}")
    return sheet.set_index("slide_id", drop=False)


def _positive(value: Any) -> bool:
    try:
        return 0 < float(value) < float("inf")
    except (TypeError, ValueError):
        return False


def mpp_option(sheet: pd.DataFrame, slide_id: str) -> str:
    """``--mpp VALUE`` for a slide with an ``mpp`` in the sample sheet, '' otherwise (rules)."""
    value = str(sheet.loc[slide_id, "mpp"]).strip() if "mpp" in sheet.columns else ""
    return f"--mpp {float(value):g}" if value else ""


def sheet_sha256(sheet: pd.DataFrame) -> str:
    """SHA-256 of the sheet as ``bd samples`` writes it: the workflow's rerun trigger for rule
    samples, and the check that the job built the sheet the workflow was parsed with."""
    import hashlib

    return hashlib.sha256(sheet.to_csv(sep="\t", index=False).encode()).hexdigest()


def build_sample_sheet(config: dict[str, Any]) -> pd.DataFrame:
    """The workflow's sample sheet from its config (see module docstring), indexed by slide_id."""
    cohort = config["cohort"]
    demo = config.get("demo") or {}
    if demo.get("enabled"):
        sheet, source = demo_slides(demo), "demo cohort"
    elif cohort.get("sample_sheet"):
        sheet, source = read_sample_sheet(cohort["sample_sheet"]), str(cohort["sample_sheet"])
    elif cohort.get("slide_pattern"):
        sheet, source = slides_from_pattern(cohort["slide_pattern"]), "cohort.slide_pattern"
        if sheet.empty:
            raise ConfigError(f"cohort.slide_pattern: no file matches {cohort['slide_pattern']!r}")
    else:
        raise ConfigError("cohort: set 'sample_sheet' or 'slide_pattern' (or enable 'demo')")
    return check_sample_sheet(sheet, source)


def config_path_errors(config: dict[str, Any]) -> list[str]:
    """Every input file or folder named in the config that does not exist (none for the demo,
    whose job writes them); the annotation folder only when tiling uses it."""
    if (config.get("demo") or {}).get("enabled"):
        return []
    cohort = config.get("cohort") or {}
    errors = [f"cohort.{key}: {cohort[key]} does not exist"
              for key in ("clinical_table", "sample_sheet") if cohort.get(key) and not Path(cohort[key]).exists()]
    if (config.get("tiling") or {}).get("use_annotations"):
        folder = cohort.get("annotations_dir")
        if not folder or not Path(folder).is_dir():
            errors.append(f"cohort.annotations_dir: {folder} is not a folder (tiling.use_annotations is true)")
    if _split_mode(config) == "official":
        split_dir = cohort.get("split_dir")
        if not split_dir or not Path(split_dir).is_dir():
            errors.append(f"cohort.split_dir: {split_dir} is not a folder (split.mode is 'official')")
    weights = (config.get("features") or {}).get("weights")
    if weights and not Path(weights).is_file():
        errors.append(f"features.weights: {weights} does not exist")
    return errors + optional_path_errors(config)


def _split_mode(config: dict[str, Any]) -> str:
    """split.mode, SplitParams' default when the config leaves it out."""
    from bd.cohort.split import SplitParams

    return str((config.get("split") or {}).get("mode", SplitParams.mode))


def optional_path_errors(config: dict[str, Any]) -> list[str]:
    """Files and folders of the h5_features and external sections that do not exist (run is checked
    when the target external runs: it may be a checkpoint this workflow trains)."""
    h5_dir = (config.get("h5_features") or {}).get("dir")
    errors = [f"h5_features.dir: {h5_dir} is not a folder"] if h5_dir and not Path(h5_dir).is_dir() else []
    external = config.get("external") or {}
    errors += [f"external.{key}: {external[key]} does not exist" for key in
               ("sample_sheet", "clinical_table", "features_dir") if external.get(key) and not Path(external[key]).exists()]
    return errors


def check_config_paths(config: dict[str, Any]) -> None:
    """Input files named in the config must exist (unless the demo will write them): one
    ConfigError naming every one that does not."""
    errors = config_path_errors(config)
    if errors:
        raise ConfigError("; ".join(errors))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", help="a TSV sample sheet to check and normalise")
    parser.add_argument("--config", help="workflow config (YAML/JSON) to build the sheet from")
    parser.add_argument("--cohort", help="the config's cohort section (JSON or file): build the sheet from it")
    parser.add_argument("--demo", default=None, help="the config's demo section (JSON or file), with --cohort")
    parser.add_argument("--sha256", default=None,
                        help="expected SHA-256 of the sheet (the workflow's): refuse a sheet that differs")
    parser.add_argument("--out", required=True, help="sample sheet TSV to write")


def run(args: argparse.Namespace) -> int:
    from bd.io import write_text
    from bd.params import read_mapping

    if args.config:
        sheet = build_sample_sheet(read_mapping(args.config, "--config"))
    elif args.cohort:
        sheet = build_sample_sheet({"cohort": read_mapping(args.cohort, "--cohort"),
                                    "demo": read_mapping(args.demo, "--demo")})
    elif args.sheet:
        sheet = check_sample_sheet(read_sample_sheet(args.sheet), args.sheet)
    else:
        raise ConfigError("bd samples: give --cohort (and --demo), --config or --sheet")
    if args.sha256 and sheet_sha256(sheet) != args.sha256:
        raise ConfigError(
            "the slides changed since the workflow was parsed (the sample sheet built now differs from the "
            "one the workflow planned): run snakemake again"
        )
    write_text(args.out, sheet.to_csv(sep="\t", index=False))
    print(f"{len(sheet)} slides, {sheet['patient_id'].nunique()} patients -> {args.out}")
    return 0
