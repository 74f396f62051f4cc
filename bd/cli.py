"""The ``bd`` command line: one subcommand per workflow stage.

Subcommands live in a registry of ``name -> (module, summary)``; only the chosen one is imported,
so ``bd --help`` and light commands start fast. Each module provides ``add_arguments(parser)``
and ``run(args) -> int``. A :class:`bd.errors.BDError` ends the command with its message and
exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bd import __version__
from bd.errors import BDError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bd.demo", "write the synthetic demo cohort in the BCNB layout"),
    "demo-auc": ("bd.demo", "clinical-only logistic-regression AUC and oracle AUC of the demo cohort"),
    "slide-info": ("bd.slides.slide", "print a slide's size, levels and microns per pixel"),
    "samples": ("bd.cohort.samples", "write the sample sheet (slide -> patient -> path)"),
    "segment": ("bd.slides.segment", "tissue mask, contours and QC thumbnail of one slide"),
    "tile": ("bd.slides.tiling", "patch grid of one slide at a target magnification"),
    "extract": ("bd.features.extract", "encoder features of slides into Zarr stores"),
    "split": ("bd.cohort.split", "patient-level train/val/test split"),
    "clinical": ("bd.cohort.clinical", "normalise the clinical table (fit on the training split)"),
    "train": ("bd.mil.train", "train BD or a baseline"),
    "evaluate": ("bd.evaluation.evaluate", "evaluate a trained run at clinical/slide missing rates"),
    "aggregate": ("bd.paper.tables", "the paper's tables from all evaluations"),
    "figures": ("bd.paper.figures", "the paper's figures from all evaluations"),
    "runtime-summary": ("bd.workflow.runtime", "per-rule runtime and memory from Snakemake benchmark files"),
    "clinical-report": ("bd.evaluation.clinical_report", "calibration, decision-curve, operating-point and subgroup tables and figures"),
    "predict": ("bd.predict", "probability of N+ for a new slide (or a cohort: --samples), with or without clinical data"),
    "check": ("bd.workflow.check", "check a workflow config and its cohort before running (ids, files, clinical rows)"),
    "schema": ("bd.workflow.schema", "the config schema, generated from the params dataclasses (bd/schemas/config.schema.yaml)"),
    "report-table": ("bd.paper.report_tables", "a table (CSV, TSV or Markdown) as an HTML page for the Snakemake report"),
    "report-images": ("bd.paper.report_images", "compact JPEG copies of the slides' QC images for the Snakemake report"),
    "batch": ("bd.workflow.batch", "several bd commands in one process, each with its own log (the workflow's batch rules)"),
    "qc": ("bd.workflow.qc", "gather the slides that could not be read and the cohort checks into QC tables"),
}


def _command_function(module: object, name: str) -> str:
    """A module serving several commands names them ``run_<command>``; otherwise ``run``."""
    special = "run_" + name.replace("-", "_")
    return special if hasattr(module, special) else "run"


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = importlib.import_module(module_name)
            adder = getattr(module, "add_arguments_" + name.replace("-", "_"), None)
            (adder or module.add_arguments)(p)
            p.set_defaults(func=getattr(module, _command_function(module, name)))
    return parser


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
        datefmt=LOG_DATEFMT,
    )
    try:
        return int(args.func(args) or 0)
    except BDError as exc:
        print(f"bd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:  # never a slide error: the job fails, a retry with more memory can act
        print(f"bd {args.command}: error: out of memory; give the job more memory (the cluster profile's "
              "retries ask for more on each attempt)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
