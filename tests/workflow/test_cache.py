"""Between-workflow output cache: a second project on the same cohort and settings takes the
segmentation, tiles and features from Snakemake's cache (``--cache``, $SNAKEMAKE_OUTPUT_CACHE)
instead of recomputing them.

A small demo cohort is written once with ``bd demo``; two workflow folders read it through the
same sample sheet with identical settings. The first run computes and stores the outputs of
segment, tile and extract; in the second, every one of those jobs is served from the cache: its
command never runs (its log stays empty), and its feature stores are the cache's entries, with
the first run's values. A third folder with other encoder settings shares the cached tiles but
not the features.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workflow_runs import base_config, check, snakemake, write_config

pytestmark = pytest.mark.slow
SLIDES = 4
# Every feature store (and segmentation and tiles before them). Targets go before --cache, which
# takes rule names.
TARGET = "results/features/index.tsv"


def write_cohort(folder: Path) -> dict:
    """A 4-patient demo cohort in ``folder`` and the config of a project reading it (demo off)."""
    config = base_config()
    demo = {**config["demo"], "patients": SLIDES, "test_patients": None, "slide_size": 2048,
            "flat_jpeg_fraction": 0.25, "out_dir": str(folder)}
    subprocess.run([sys.executable, "-m", "bd", "demo", "--params", json.dumps(demo), "--out-dir", str(folder),
                    "--workers", "2"], check=True, capture_output=True, timeout=300)
    slides = sorted(p for p in (folder / "WSIs").iterdir())
    assert len(slides) == SLIDES
    sheet = folder / "samples.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\n" + "".join(f"{p.stem}\t{p.stem}\t{p}\n" for p in slides))
    config["results"] = "results"
    config["extract_slides_per_job"] = 1  # the cached rule extract, one job per slide
    config["segment_slides_per_job"] = 1  # the cached rules segment and tile, one job per slide
    config["train_runs_per_job"] = 1
    config["demo"]["enabled"] = False
    config["cohort"].update(sample_sheet=str(sheet), clinical_table=str(folder / "patient-clinical-data.xlsx"),
                            split_dir=str(folder / "dataset-splitting"), annotations_dir=None)
    config["features"].update(encoder="resnet18", out_stage="layer1", input_size=32, batch_size=16, num_workers=0)
    return config


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[dict, dict[str, str]]:
    """The shared cohort's project config, and the environment naming an empty cache folder."""
    config = write_cohort(tmp_path / "cohort")
    (tmp_path / "cache").mkdir()
    return config, {"SNAKEMAKE_OUTPUT_CACHE": str(tmp_path / "cache")}


def project(tmp_path: Path, name: str, config: dict) -> Path:
    work = tmp_path / name
    write_config(work, config)
    return work


def cache_lines(proc: subprocess.CompletedProcess, verb: str) -> list[str]:
    """Output files a dry run says it will obtain from / write to the cache (verb: 'obtained from'
    or 'written to')."""
    return [line.split("Output file ")[1].split(" will be")[0] for line in (proc.stdout + proc.stderr).splitlines()
            if line.startswith("Output file ") and f"will be {verb} global between-workflow cache" in line]


def stores(work: Path) -> list[Path]:
    return sorted((work / "results" / "features").glob("*.zarr"))


def test_second_project_takes_features_from_cache(cohort, tmp_path):
    from bd.features.store import read_store

    config, env = cohort
    first = project(tmp_path, "first", config)
    check(snakemake(first, TARGET, "--cores", "2", "--cache", env=env))
    computed = [p for p in (first / "results" / "logs" / "extract").glob("*.log") if "patches in" in p.read_text()]
    assert len(computed) == SLIDES  # computed here
    assert len(list(Path(env["SNAKEMAKE_OUTPUT_CACHE"]).glob("*.zarr"))) == SLIDES  # and stored

    second = project(tmp_path, "second", config)
    plan = check(snakemake(second, TARGET, "-n", "--cores", "2", "--cache", env=env))
    from_cache = cache_lines(plan, "obtained from")
    assert sorted(p for p in from_cache if p.endswith(".zarr")) == [f"results/features/{p.name}" for p in stores(first)]
    assert not cache_lines(plan, "written to")

    check(snakemake(second, TARGET, "--cores", "2", "--cache", env=env))
    # Snakemake creates each job's log file; the command (which logs to it) never ran: it is empty
    ran = [p for stage in ("segment", "tile", "extract") for p in (second / "results" / "logs" / stage).glob("*.log")
           if p.stat().st_size]
    assert not ran, f"cached jobs ran their command: {ran}"
    assert [p.name for p in stores(second)] == [p.name for p in stores(first)]
    cache = Path(env["SNAKEMAKE_OUTPUT_CACHE"]).resolve()
    for a, b in zip(stores(first), stores(second)):
        assert (b / "zarr.json").resolve().is_relative_to(cache)  # the second project's store lives in the cache
        fa, fb = read_store(a), read_store(b)
        assert fa.attrs["complete"] and fb.attrs["complete"]
        np.testing.assert_array_equal(fa.features, fb.features)
        np.testing.assert_array_equal(fa.coords, fb.coords)
    assert (second / TARGET).read_text().count(".zarr") == SLIDES

    # a project with another encoder stage: same cached segmentation and tiles, new features
    other = {**config, "features": {**config["features"], "out_stage": "layer2"}}
    plan = check(snakemake(project(tmp_path, "other", other), TARGET, "-n", "--cores", "2", "--cache", env=env))
    obtained, written = cache_lines(plan, "obtained from"), cache_lines(plan, "written to")
    assert sum(p.startswith("results/segment/") for p in obtained) == SLIDES
    assert sum(p.startswith("results/tiles/") for p in obtained) == SLIDES
    assert sorted(p for p in written if p.endswith(".zarr")) == [f"results/features/{p.name}" for p in stores(first)]
