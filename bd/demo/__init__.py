"""The synthetic demo cohort, written in the BCNB layout so that the demo and the real cohort share
one ingest path.

``bd demo --params JSON --out-dir DIR`` writes under DIR:

- ``WSIs/{i}.tif`` (pyramidal JPEG-tiled TIFF, Aperio layout, MPP and objective power in the
  metadata) or ``WSIs/{i}.jpg`` (flat JPEG, no metadata), as :func:`bd.cohort.samples.demo_slides` lists;
- ``patient-clinical-data.xlsx`` with BCNB's exact columns and messy values;
- ``dataset-splitting/{train,val,test}_id.txt`` (BCNB's ratio 630/210/218, stratified);
- ``latent_risk.csv`` (patient id, latent risk = oracle log odds of N+, label, and its parts);
- ``annotations/{i}.json`` (BCNB's tumour-annotation format) when ``annotations`` is on;
- ``artefacts.json``: per slide, the tissue outlines, pen mark, dust specks and blurred patch in
  level-0 pixels, so that tissue segmentation can be checked against the truth.

``bd demo-auc --out-dir DIR`` prints the clinical-only logistic-regression and oracle test AUCs.
See :mod:`bd.demo.patients` for the generative model and its calibration; the section's params,
:class:`DemoParams`, are in :mod:`bd.demo.params`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bd.demo.params import DemoParams

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SLIDE_NAME = re.compile(r"^\d+\.(tif|jpg)$")


@dataclass(frozen=True)
class SlideTask:
    """Everything one worker needs to render and write one slide (picklable)."""

    patient_id: int
    path: str
    slide_size: int
    mpp: float
    tumour_fraction: float
    seed: int
    jpeg_quality: int


def write_tables(out_dir: str | Path, params: DemoParams) -> pd.DataFrame:
    """Simulate the patients and write the clinical table, split files and latent risk; return
    the patients (a DataFrame, see :func:`bd.demo.patients.simulate_patients`)."""
    import pandas as pd

    from bd.demo.patients import bcnb_table, latent_table, official_split, simulate_patients
    from bd.io import atomic_path, write_text

    out_dir = Path(out_dir)
    patients = simulate_patients(params.patients, params.seed, params.slide_signal)
    with atomic_path(out_dir / "patient-clinical-data.xlsx") as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            bcnb_table(patients).to_excel(writer, index=False, sheet_name="Sheet1")
    for name, ids in official_split(patients, params.seed, params.test_patients).items():
        write_text(out_dir / "dataset-splitting" / f"{name}_id.txt", "".join(f"{i}\n" for i in ids))
    write_text(out_dir / "latent_risk.csv", latent_table(patients).to_csv(index=False))
    return patients


def make_slide(task: SlideTask) -> dict[str, Any]:
    """Render and write one slide; return its ground truth (JSON-ready)."""
    import numpy as np

    from bd.demo.render import render_slide
    from bd.demo.slidefile import write_slide

    rng = np.random.default_rng(np.random.SeedSequence([task.seed, 1 + task.patient_id]))
    slide = render_slide(task.slide_size, task.mpp, task.tumour_fraction, rng)
    write_slide(task.path, slide.rgb, task.mpp, task.jpeg_quality)
    h, w = slide.rgb.shape[:2]
    return {
        "slide_id": str(task.patient_id),
        "file": f"WSIs/{Path(task.path).name}",
        "width": w,
        "height": h,
        "mpp": task.mpp,
        "tumour_fraction": round(slide.tumour_fraction, 4),
        "tumour": slide.tumour_polygons,
        "tissue": slide.tissue_polygons,
        **slide.artefacts,
    }


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one slide per process; threads would only contend


def write_slides(tasks: list[SlideTask], workers: int) -> list[dict[str, Any]]:
    """Render and write the slides, ``workers`` processes in parallel, with a progress bar."""
    from tqdm import tqdm

    bar = dict(total=len(tasks), desc="demo slides", unit="slide", disable=None)
    if workers <= 1 or len(tasks) <= 1:
        return [make_slide(t) for t in tqdm(tasks, **bar)]
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        return list(tqdm(pool.map(make_slide, tasks, chunksize=1), **bar))


def _remove_stale_slides(wsi_dir: Path, planned: set[str]) -> None:
    """Slides of an earlier, different demo cohort (other ids or format) would be picked up by a
    slide pattern; remove the ones this cohort does not plan."""
    if not wsi_dir.is_dir():
        return
    for path in wsi_dir.iterdir():
        if SLIDE_NAME.match(path.name) and path.name not in planned:
            log.info("removing stale demo slide %s", path)
            path.unlink()


def write_annotations(folder: Path, truths: list[dict[str, Any]]) -> None:
    """``annotations/{slide}.json`` in BCNB's format, written as one directory atomically."""
    from bd.io import atomic_path

    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for truth in truths:
            positive = [{"name": f"tumour {k}", "vertices": poly} for k, poly in enumerate(truth["tumour"])]
            (tmp / f"{truth['slide_id']}.json").write_text(json.dumps({"positive": positive, "negative": []}))


def generate_cohort(params: DemoParams, out_dir: str | Path, workers: int = 1, slides: bool = True) -> dict[str, Any]:
    """Write the whole demo cohort under ``out_dir`` (see the module docstring); return a summary."""
    from bd.cohort.samples import demo_slides
    from bd.io import write_json

    out_dir = Path(out_dir)
    start = time.perf_counter()
    patients = write_tables(out_dir, params)
    summary: dict[str, Any] = {"patients": params.patients, "tables_s": round(time.perf_counter() - start, 2)}
    if not slides:
        return summary
    plan = demo_slides(dataclasses.asdict(params))
    names = [Path(p).name for p in plan["path"]]
    _remove_stale_slides(out_dir / "WSIs", set(names))
    fractions = dict(zip(patients["patient_id"].astype(int), patients["tumour_fraction"]))
    tasks = [
        SlideTask(int(pid), str(out_dir / "WSIs" / name), params.slide_size, params.mpp,
                  float(fractions[int(pid)]), params.seed, params.jpeg_quality)
        for pid, name in zip(plan["patient_id"], names)
    ]
    truths = write_slides(tasks, workers)
    if params.annotations:
        write_annotations(out_dir / "annotations", truths)
    write_json(out_dir / "artefacts.json", {t["slide_id"]: {k: v for k, v in t.items() if k != "tumour"} for t in truths})
    summary.update(slides=len(tasks), flat_jpeg=sum(n.endswith(".jpg") for n in names),
                   seconds=round(time.perf_counter() - start, 2))
    return summary


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- command line ---------------------------------------------------------------------------


def add_arguments_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="the config's demo section (JSON or a YAML/JSON file)")
    parser.add_argument("--out-dir", required=True, help="folder to write the cohort to (BCNB layout)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="processes rendering slides")
    parser.add_argument("--tables-only", action="store_true", help="write the tables and split only, no slides")


def run_demo(args: argparse.Namespace) -> int:
    from bd.params import build

    params = build(DemoParams, args.params)
    summary = generate_cohort(params, args.out_dir, workers=max(1, args.workers), slides=not args.tables_only)
    print(json.dumps({"out_dir": str(args.out_dir), **summary}))
    return 0


def add_arguments_demo_auc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", required=True, help="a demo cohort folder (or any BCNB-layout folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run_demo_auc(args: argparse.Namespace) -> int:
    from bd.demo.auc import as_dict, cohort_auc, report

    result = cohort_auc(args.out_dir)
    print(json.dumps(as_dict(result)) if args.json else report(result, args.out_dir))
    return 0
