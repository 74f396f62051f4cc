"""The results folder's layout: where each stage writes a slide's outputs and the QC tables.

One definition, used by the rules (as patterns with a ``{slide}`` wildcard) and by the commands
that find a stage's records on disk (``bd qc``) or check what a finished run lost (the targets).
Light imports only: the Snakefile imports this module.
"""

from __future__ import annotations

from pathlib import Path

# Per-slide outputs, relative to the results folder, in pipeline order.
SLIDE_OUTPUTS: dict[str, str] = {
    "mask": "segment/{slide}/mask.png",
    "artefacts": "segment/{slide}/artefacts.png",
    "mask_info": "segment/{slide}/mask.json",  # the mask's scale; with on_slide_error: skip, its error
    "contours": "segment/{slide}/contours.geojson",
    "segment_qc": "segment/{slide}/qc.png",
    "grid": "tiles/{slide}.npz",
    "grid_qc": "tiles/{slide}.qc.png",
    "store": "features/{slide}.zarr",
}
FEATURES = "features"  # the folder of the stores and of their index
FEATURE_INDEX = "features/index.tsv"
QC_TABLES = ("qc/slide_errors.tsv", "qc/cohort_checks.tsv")


def slide_pattern(results: str, kind: str) -> str:
    """A rule's output pattern for one kind of per-slide output (``{slide}`` left as the wildcard)."""
    return f"{results}/{SLIDE_OUTPUTS[kind]}"


def slide_output(results: str | Path, kind: str, slide: str) -> str:
    """The path of one slide's output of one kind (spelt as the rules spell it)."""
    return f"{results}/{SLIDE_OUTPUTS[kind].format(slide=slide)}"
