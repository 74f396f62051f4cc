"""Pre-run checks of a workflow config and its cohort: the config against its schema, the sample
sheet against the disk, and the sample sheet against the clinical table.

The workflow runs them once when it is parsed (``workflow/rules/common.smk``), before any job;
``bd check --config CONFIG`` runs the same checks for a user. Errors stop the run and name every
key, id or file at fault: an unknown config key or a value of the wrong type, a duplicate slide or
patient id, a slide file that does not exist (unless ``on_slide_error: skip``, which records it
and goes on). Everything else is counted and warned about, and ``bd qc`` puts the same counts in
the report: slides whose patient has no clinical row (left out), patients of the table without a
slide (they count as missing the slide), patients without a label (excluded from the split).
Cheap enough for a 5,000-slide cohort at parse time: one ``os.path.exists`` per slide and one
read of the clinical table.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bd.errors import BDError, ConfigError, SlideError, TableError

log = logging.getLogger(__name__)

# The config's and the sample sheet's JSON schemas ship inside the package (bd/schemas): an
# installed bd validates exactly as the checkout does.
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
SAMPLES_SCHEMA = SCHEMA.with_name("samples.schema.yaml")
EXAMPLES = 5  # ids or files named per finding in messages and in the report


@dataclass(frozen=True)
class CheckKind:
    """One kind of finding: how serious it is and what it means for the run."""

    level: str  # "error" stops the run; "warning" and "info" are counted
    meaning: str


# Every finding a check can report, in report order.
CHECKS: dict[str, CheckKind] = {
    "missing_slide_file": CheckKind("error", "slide files that do not exist"),
    "slide_not_read": CheckKind("warning", "slides that could not be read (on_slide_error: skip); their "
                                           "patient counts as missing the slide"),
    "slide_upsampled": CheckKind("warning", "slides coarser than tiling.target_mpp by more than 1.25x: "
                                            "their patches are upsampled (check their MPP)"),
    "duplicate_path": CheckKind("warning", "one file listed under several slide ids (its patches count twice)"),
    "slide_without_clinical_row": CheckKind("warning", "slides whose patient has no row in the clinical "
                                                       "table: left out of training and evaluation"),
    "patient_without_slide": CheckKind("warning", "patients of the clinical table with no slide in the "
                                                  "sample sheet: they count as missing the slide"),
    "patient_without_usable_slide": CheckKind("warning", "patients whose every slide is missing or was not "
                                                         "read: they count as missing the slide"),
    "patient_without_label": CheckKind("info", "patients without a label: excluded from the split, "
                                               "training and evaluation"),
    "patient_not_in_table": CheckKind("warning", "patient ids of the sample sheet that the clinical table does "
                                                "not have (ids are compared as text after normalising: "
                                                "001, 1 and 1.0 are the same id)"),
    "no_patient_matches": CheckKind("error", "no patient of the sample sheet is in the clinical table; "
                                             "sample-sheet ids vs table ids"),
    "clinical_value_unreadable": CheckKind("error", "clinical cells that `bd clinical` cannot parse"),
    "clinical_out_of_range": CheckKind("error", "clinical values outside their valid range (clinical.ranges; "
                                                "with clinical.out_of_range: missing they count as missing)"),
    "patient_without_clinical_values": CheckKind("warning", "patients whose every clinical feature is blank: "
                                                            "they count as missing clinical data"),
    "empty_split": CheckKind("error", "splits without any patient"),
}


@dataclass
class Finding:
    check: str  # a key of CHECKS
    items: list[str]  # the slide ids, patient ids or files concerned
    level: str = ""  # the kind's level unless a policy changes it (missing files under skip)

    def __post_init__(self) -> None:
        self.level = self.level or self.kind.level

    @property
    def kind(self) -> CheckKind:
        return CHECKS[self.check]

    def message(self) -> str:
        shown = ", ".join(self.items[:EXAMPLES]) + (", ..." if len(self.items) > EXAMPLES else "")
        return f"{len(self.items)} {self.kind.meaning}: {shown}"


@dataclass
class CohortCheck:
    """What the checks found in one cohort (sample sheet + clinical table)."""

    slides: int
    patients: int  # distinct patients of the sample sheet
    table_patients: int | None = None  # rows of the clinical table (None: not read)
    findings: dict[str, Finding] = field(default_factory=dict)
    levels: dict[str, str] = field(default_factory=dict)  # levels a policy changed
    missing_slides: list[str] = field(default_factory=list)  # slide ids whose file does not exist
    split: dict[str, str] | None = None  # patient -> train/val/test, as `bd split` will make it (None: unknown)

    def add(self, check: str, items: Iterable[str], level: str | None = None) -> None:
        if level:
            self.levels[check] = level
        items = sorted(set(map(str, items)), key=_natural)
        if items:
            self.findings[check] = Finding(check, items, self.levels.get(check, ""))

    def items(self, check: str) -> list[str]:
        return self.findings[check].items if check in self.findings else []

    def errors(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.level == "error"]

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.level != "error"]

    def table(self) -> pd.DataFrame:
        """One row per check (found or not): check, level, count, examples, meaning."""
        rows = [("slides", "info", self.slides, "", "slides in the sample sheet"),
                ("patients_with_slides", "info", self.patients, "", "patients with a slide in the sample sheet")]
        if self.table_patients is not None:
            rows.append(("patients_in_clinical_table", "info", self.table_patients, "",
                         "rows of the clinical table"))
        for name, kind in CHECKS.items():
            found = self.findings.get(name)
            items = found.items if found else []
            level = self.levels.get(name, kind.level)
            rows.append((name, level, len(items), " ".join(items[:EXAMPLES]), kind.meaning))
        return pd.DataFrame(rows, columns=["check", "level", "count", "examples", "meaning"])


def _natural(value: str) -> tuple[int, int | str]:
    """Sort key: numeric ids in numeric order, then the rest alphabetically."""
    return (0, int(value)) if value.isdigit() else (1, value)


# ---------------------------------------------------------------- the config


_FLOAT_TEXT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def _allows(node: dict[str, Any], kind: str) -> bool:
    """Whether a schema node (or one of its oneOf/anyOf branches) allows JSON type ``kind``."""
    types = node.get("type")
    if kind == types or (isinstance(types, list) and kind in types):
        return True
    return any(_allows(b, kind) for b in node.get("oneOf", []) + node.get("anyOf", []))


def coerce_numbers(value: Any, node: dict[str, Any]) -> Any:
    """``value`` with every text that spells a number (``1e-4``) turned into a float where the
    schema wants a number and not text: YAML 1.1 (Snakemake's and PyYAML's loader) reads ``1e-4``
    without a dot as a string."""
    if isinstance(value, str) and _allows(node, "number") and not _allows(node, "string"):
        return float(value) if _FLOAT_TEXT.match(value.strip()) else value
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = coerce_numbers(item, sub)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value[:] = [coerce_numbers(item, node["items"]) for item in value]
    return value


def load_schema(schema: Path = SCHEMA) -> dict[str, Any]:
    """The config schema; a package without it is broken, never a reason to skip the checks."""
    import yaml

    if not schema.is_file():
        raise ConfigError(f"{schema}: the config schema is missing from the bd package; reinstall bd")
    return yaml.safe_load(schema.read_text())


def config_errors(config: dict[str, Any], schema: Path = SCHEMA) -> list[str]:
    """Every schema violation of ``config`` as ``key: what is wrong`` (numbers written as text,
    such as ``1e-4``, are coerced first, in place)."""
    import jsonschema

    spec = load_schema(schema)
    coerce_numbers(config, spec)
    validator = jsonschema.Draft202012Validator(spec)
    problems = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.path))))
    return [_describe(e) for e in problems]


def validate_config(config: dict[str, Any], schema: Path = SCHEMA) -> None:
    """Check ``config`` against the workflow's JSON schema; the error names every key at fault (``a.b.c``)."""
    problems = config_errors(config, schema)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))


def check_config(config: dict[str, Any]) -> None:
    """The workflow's config checks at parse time: the schema and the input paths, every problem
    in one error."""
    from bd.cohort.samples import config_path_errors

    problems = config_errors(config)
    if not problems:
        problems = config_path_errors(config)
    if problems:
        raise ConfigError(format_problems(problems))


def format_problems(problems: list[str]) -> str:
    """One problem as itself; several as a count and one line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _describe(error: Any) -> str:
    """One schema violation as ``key: what is wrong``."""
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}))
        unknown = sorted(set(error.instance) - set(known))
        key = ".".join(filter(None, [where, unknown[0] if unknown else "?"]))
        return f"unknown key '{key}' (known keys{' of ' + where if where else ''}: {', '.join(known)})"
    if error.validator == "required":
        return f"{where or 'top level'}: {error.message}"
    if error.validator == "minItems":
        return f"key '{where}': the list is empty; give at least {error.validator_value} value(s)"
    if error.validator == "uniqueItems":
        seen: set[Any] = set()
        dup = None
        for item in error.instance:
            key = tuple(item) if isinstance(item, list) else item
            if key in seen:
                dup = item
                break
            seen.add(key)
        return f"key '{where}': {dup!r} is listed twice; each value may appear once"
    return f"key '{where}': {error.message}"


# ---------------------------------------------------------------- the cohort


def missing_files(sheet: pd.DataFrame) -> list[str]:
    """Slide ids whose file does not exist (one ``os.path.exists`` each)."""
    return [sid for sid, path in zip(sheet["slide_id"], sheet["path"]) if not os.path.exists(path)]


def check_sheet(sheet: pd.DataFrame, on_slide_error: str = "fail", paths: bool = True) -> CohortCheck:
    """Checks of the sample sheet alone (ids are already unique: :func:`bd.cohort.samples.check_sample_sheet`)."""
    result = CohortCheck(slides=len(sheet), patients=int(sheet["patient_id"].nunique()))
    if paths:
        result.missing_slides = missing_files(sheet)
        missing = sheet["path"][sheet["slide_id"].isin(set(result.missing_slides))]
        result.add("missing_slide_file", missing, "warning" if on_slide_error == "skip" else None)
    dup = sheet["path"].duplicated(keep=False)
    result.add("duplicate_path", sheet["slide_id"][dup])
    return result


def check_against_table(result: CohortCheck, sheet: pd.DataFrame, ids: list[str],
                        labels: list[int | None]) -> CohortCheck:
    """Add the checks that need the clinical table: patient ids and labels."""
    known = set(ids)
    result.table_patients = len(ids)
    result.add("slide_without_clinical_row", sheet["slide_id"][~sheet["patient_id"].isin(known)])
    unknown = set(sheet["patient_id"]) - known
    result.add("patient_not_in_table", unknown)
    if unknown and len(unknown) == sheet["patient_id"].nunique() and ids:
        sheet_ids = sorted(unknown, key=_natural)[:EXAMPLES]
        table_ids = sorted(known, key=_natural)[:EXAMPLES]
        result.add("no_patient_matches", [f"sample sheet: {', '.join(sheet_ids)}; table: {', '.join(table_ids)}"])
    result.add("patient_without_slide", known - set(sheet["patient_id"]))
    result.add("patient_without_label", [pid for pid, y in zip(ids, labels) if y is None])
    return result


def add_unusable(result: CohortCheck, sheet: pd.DataFrame, unusable: Iterable[str]) -> CohortCheck:
    """Patients whose every slide is in ``unusable`` (missing on disk or not read)."""
    bad = set(unusable)
    if bad:
        usable = sheet[~sheet["slide_id"].isin(bad)]["patient_id"]
        result.add("patient_without_usable_slide", set(sheet["patient_id"]) - set(usable))
    return result


def read_clinical(config: dict[str, Any]) -> Any:
    """The config's clinical table, read and checked once (:class:`bd.cohort.clinical.ClinicalTable`)."""
    from bd.cohort.clinical import ClinicalParams, load_table
    from bd.params import build

    return load_table(config["cohort"]["clinical_table"], build(ClinicalParams, config.get("clinical") or {}))


def read_clinical_ids(config: dict[str, Any]) -> tuple[list[str], list[int | None]]:
    """Patient ids and labels (None: blank) of the config's clinical table."""
    table = read_clinical(config)
    return table.ids, table.labels


def check_clinical_values(result: CohortCheck, config: dict[str, Any], table: Any = None) -> CohortCheck:
    """Parse every clinical feature cell as `bd clinical` does (same parsers, same ranges)."""
    from bd.cohort.clinical import ClinicalParams, feature_columns, parse_all
    from bd.params import build

    params = build(ClinicalParams, config.get("clinical") or {})
    table = read_clinical(config) if table is None else table
    try:
        kinds = feature_columns(table, params)
    except (ConfigError, TableError) as exc:  # e.g. a feature column the table does not have
        result.add("clinical_value_unreadable", [str(exc)])
        return result
    parsed = parse_all(table, kinds, params)
    level = "warning" if params.out_of_range == "missing" else "error"
    result.add("clinical_out_of_range", [f"row {r}, {c!r}: {v:g}" for r, c, v in parsed.out_of_range], level)
    result.add("clinical_value_unreadable", [e.split(": ", 1)[1] for e in parsed.errors if "outside the valid" not in e])
    result.add("patient_without_clinical_values", parsed.no_values)
    return result


def check_split(result: CohortCheck, config: dict[str, Any], ids: list[str], labels: list[int | None]) -> CohortCheck:
    """The split `bd split` will make (official files or the seeded random split): none empty."""
    from bd.params import build
    from bd.cohort.split import SplitParams, make_split

    params = build(SplitParams, config.get("split") or {})
    split, _ = make_split(ids, dict(zip(ids, labels)), params, config["cohort"].get("split_dir"),
                          str(config["cohort"]["clinical_table"]))
    result.split = dict(zip(split["patient_id"], split["split"]))
    result.add("empty_split", [name for name in ("train", "val", "test") if not (split["split"] == name).any()])
    return result


def check_cohort(config: dict[str, Any], sheet: pd.DataFrame | None = None) -> CohortCheck:
    """Every cohort check the config allows: the demo's slides and table are written by a job, so
    for the demo only the sample sheet is checked here (``bd qc`` checks the table afterwards)."""
    from bd.cohort.samples import build_sample_sheet

    sheet = build_sample_sheet(config) if sheet is None else sheet
    demo = bool((config.get("demo") or {}).get("enabled"))
    result = check_sheet(sheet, config.get("on_slide_error", "fail"), paths=not demo)
    table = config["cohort"].get("clinical_table")
    if table and not demo:
        clinical = read_clinical(config)
        check_against_table(result, sheet, clinical.ids, clinical.labels)
        check_clinical_values(result, config, clinical)
        check_split(result, config, clinical.ids, clinical.labels)
    add_unusable(result, sheet, result.missing_slides)
    return result


HINTS = {
    "missing_slide_file": "fix the paths, or set on_slide_error: skip to record these slides, count their "
                          "patients as missing the slide and go on",
    "no_patient_matches": "make the sample sheet's patient_id the clinical table's id column (clinical.id_column)",
}


def error_messages(result: CohortCheck) -> list[str]:
    """One line per error finding, with its hint."""
    return [f.message() + (f" ({HINTS[f.check]})" if f.check in HINTS else "") for f in result.errors()]


def raise_errors(result: CohortCheck) -> None:
    """Stop with every error found (missing files under on_slide_error: fail, ids, values), named."""
    errors = result.errors()
    if errors:
        kind = SlideError if all(f.check == "missing_slide_file" for f in errors) else TableError
        raise kind(format_problems(error_messages(result)))


def prerun(config: dict[str, Any], sheet: pd.DataFrame, warn: Callable[[str], None] = log.warning) -> CohortCheck:
    """The workflow's checks before any job: raise on errors, ``warn`` one line per other finding."""
    result = check_cohort(config, sheet)
    raise_errors(result)
    for finding in result.warnings():
        warn(f"cohort check: {finding.message()}")
    return result


# ---------------------------------------------------------------- command line


def merge_configs(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``, section by section (nested mappings merged, other values replaced)."""
    out = dict(base)
    for key, value in overlay.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_configs(out[key], value) if both else value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, nargs="+",
        help="workflow config file(s), merged in order as snakemake merges its configfiles "
             "(e.g. config/config.yaml config/bcnb.yaml)",
    )
    parser.add_argument("--out", default=None, help="also write the findings as a TSV (check, level, count, ...)")


def run(args: argparse.Namespace) -> int:
    from bd.cohort.samples import config_path_errors
    from bd.io import write_text
    from bd.params import read_mapping

    config: dict = {}
    for path in args.config:
        config = merge_configs(config, read_mapping(path, "--config"))
    problems = config_errors(config)
    problems += config_path_errors(config) if isinstance(config.get("cohort"), dict) else []
    result = None
    if not problems:  # the cohort checks need a valid config and its files
        try:
            result = check_cohort(config)
        except BDError as exc:
            problems.append(str(exc))
    if result is not None:
        for finding in result.warnings():
            print(f"{finding.level}: {finding.message()}")
        if args.out:
            write_text(args.out, result.table().to_csv(sep="\t", index=False))
        problems += error_messages(result)
    if problems:
        raise ConfigError(format_problems(problems))
    table = "" if result.table_patients is None else f", {result.table_patients} clinical rows"
    print(f"{' + '.join(args.config)}: {result.slides} slides, {result.patients} patients{table}: "
          f"{len(result.warnings())} warning(s), no error")
    return 0
