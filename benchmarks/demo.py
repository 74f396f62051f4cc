"""Demo cohort: generation time of `bd demo` and the cohort's calibration (clinical-only and oracle AUC).

1. ``bd demo`` with the config's demo section (default: 60 patients, 4096 px slides) into a
   temporary folder with ``--workers`` processes: wall time, target at most 60 s on 2 cores.
   Reference, in the same run: one process writing one already-rendered slide as a pyramidal
   JPEG TIFF (encode + file I/O only), times the number of slides over the workers. The ratio
   says what drawing the slides costs on top of merely writing them.
2. That folder's ``bd demo-auc`` figures: clinical-only logistic-regression and oracle test AUC.
3. BCNB-sized cohorts (1,058 patients, tables only): the clinical-only test AUC for seed 0 and
   its mean and in-range share over ``--seeds`` seeds, and the mean oracle AUC.

Prints one JSON object per line: {"metric", "value", "unit", "target", "better"}. AUCs that must
lie in a range (the real cohort's 0.55-0.72) have that range as target and better "in range".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bd.demo import DemoParams, available_cpus, generate_cohort  # noqa: E402
from bd.demo.auc import cohort_auc, simulated_auc  # noqa: E402
from bd.demo.render import render_slide  # noqa: E402
from bd.demo.slidefile import write_pyramid_tiff  # noqa: E402
from bd.params import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUC_RANGE = [0.55, 0.72]


def emit(metric: str, value: float, unit: str, target: object = None, better: str | None = None) -> None:
    print(json.dumps({"metric": metric, "value": round(float(value), 4), "unit": unit,
                      "target": target, "better": better}), flush=True)


def write_only_seconds(params: DemoParams, folder: Path, repeats: int = 3) -> float:
    """Median time for one process to write one rendered slide as a pyramidal TIFF."""
    rgb = render_slide(params.slide_size, params.mpp, 0.3, np.random.default_rng(0)).rgb
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        write_pyramid_tiff(folder / f"ref{i}.tif", rgb, params.mpp, params.jpeg_quality)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=available_cpus())
    parser.add_argument("--seeds", type=int, default=20, help="BCNB-sized cohorts to average over")
    parser.add_argument("--patients", type=int, default=None, help="override the config's demo.patients")
    args = parser.parse_args()

    section = yaml.safe_load((ROOT / "config/config.yaml").read_text())["demo"]
    if args.patients:
        section["patients"] = args.patients
    params = build(DemoParams, section)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        generate_cohort(params, folder / "demo", workers=args.workers)
        seconds = time.perf_counter() - start
        reference = write_only_seconds(params, folder) * params.patients / max(1, min(args.workers, params.patients))
        emit(f"demo_{params.patients}_patients_{params.slide_size}px_seconds", seconds, "s", 60, "lower")
        emit("demo_vs_write_only_ratio", seconds / reference, "x", None, "lower")
        demo = cohort_auc(folder / "demo")
    emit(f"demo_{params.patients}_clinical_auc", demo.clinical_auc, "AUC", AUC_RANGE, "in range")
    emit(f"demo_{params.patients}_oracle_auc", demo.oracle_auc, "AUC", None, "higher")

    results = [simulated_auc(1058, seed, params.slide_signal) for seed in range(args.seeds)]
    clinical = [r.clinical_auc for r in results]
    emit("bcnb1058_clinical_auc_seed0", clinical[0], "AUC", AUC_RANGE, "in range")
    emit(f"bcnb1058_clinical_auc_mean_{args.seeds}_seeds", statistics.mean(clinical), "AUC", [0.60, 0.66], "in range")
    emit("bcnb1058_clinical_auc_in_range_share", np.mean([AUC_RANGE[0] <= a <= AUC_RANGE[1] for a in clinical]),
         "fraction", 0.9, "higher")
    emit(f"bcnb1058_oracle_auc_mean_{args.seeds}_seeds", statistics.mean(r.oracle_auc for r in results), "AUC",
         None, "higher")


if __name__ == "__main__":
    main()
