"""Compact copies of the per-slide QC images for the Snakemake report.

The report embeds every item as base64 (4/3 of the file's size). The segmentation and tiling QC
PNGs (up to 1,024 px a side, a few hundred KB each) made 37 MB of a 55 MB report for 60 slides:
about 0.9 GB at BCNB's size. ``bd report-images`` writes one JPEG per slide and kind, at most
``--max-side`` px a side (default 360) and JPEG quality ``--quality`` (default 65), about 11 KB
each; the full-size PNGs stay in ``results/segment`` and ``results/tiles`` for review. One call
for the cohort (one workflow job), reading the sample sheet for the slide ids.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bd.errors import BDError
from bd.io import atomic_path

# QC image of a slide, relative to the results folder, per kind (what rules segment and tile write).
QC_SOURCES = {
    "segment": "segment/{slide}/qc.png",
    "tiles": "tiles/{slide}.qc.png",
}
MAX_SIDE = 360
QUALITY = 65


def slide_ids(samples: Path) -> list[str]:
    """Slide ids of the sample sheet (column ``slide_id``), in its order."""
    try:
        with samples.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise BDError(f"{samples}: {exc.strerror or exc}") from exc
    if rows and "slide_id" not in rows[0]:
        raise BDError(f"{samples}: no slide_id column")
    return [r["slide_id"] for r in rows]


def compact(source: Path, out: Path, max_side: int = MAX_SIDE, quality: int = QUALITY) -> int:
    """Write ``source`` shrunk to at most ``max_side`` px a side as a JPEG; its size in bytes."""
    import cv2

    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise BDError(f"{source}: not a readable image")
    factor = min(1.0, max_side / max(image.shape[:2]))
    if factor < 1.0:
        size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise BDError(f"could not encode {out} as JPEG")
    with atomic_path(out) as tmp:
        tmp.write_bytes(data.tobytes())
    return len(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, type=Path, help="sample sheet (samples.tsv)")
    parser.add_argument("--results", required=True, type=Path, help="the workflow's results folder")
    for kind in QC_SOURCES:
        parser.add_argument(f"--{kind}-out", type=Path, default=None,
                            help=f"folder for the {kind} QC JPEGs ({{slide}}.jpg); omitted: not written")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="longest side in px")
    parser.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality 1-100")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.quality <= 100 or args.max_side < 16:
        raise BDError("--quality must be 1-100 and --max-side at least 16")
    slides = slide_ids(args.samples)
    total = 0
    for kind, pattern in QC_SOURCES.items():
        out_dir = getattr(args, f"{kind}_out")
        if out_dir is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        for slide in slides:
            source = args.results / pattern.format(slide=slide)
            if source.exists():  # slides missing on disk (on_slide_error: skip) have no QC image
                total += compact(source, out_dir / f"{slide}.jpg", args.max_side, args.quality)
    print(f"{len(slides)} slides: report QC images {total / 1e6:.2f} MB")
    return 0
