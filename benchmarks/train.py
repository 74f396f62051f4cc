"""Training speed: one BD epoch on a BCNB-sized feature set, generated in memory.

The cohort: 1,058 patients with 1,000-3,000 patches each (about 2,000 on average, 2.1 million in
all), 1,024-d features, held packed in memory as bf16 (about 4.3 GB), five clinical columns. One
epoch = one SGD step per patient bag (``batch_size`` 1, as ``bd train`` runs by default) over all
1,058 patients (the real training split has 630, so a real epoch is ~40 % shorter), both BD
branches, all loss terms, backward and optimiser step; validation is not timed.

Reference, in the same run: the same epoch code with the patch-feature layer in fp32 (the usual
attention-MIL set-up) on a ``--reference-fraction`` subset of the patients, scaled to the whole
epoch by patch count. The ratio is the speed-up that the bf16 patch layer brings on this machine.
With CUDA, the epoch is also timed on the GPU (features moved to GPU memory once).

CPU threads: 1 by default. On this shared 2-core machine, two OpenMP threads stall whenever the
other core is busy (measured: one bag's forward + backward 6 ms with 1 thread, 71 ms with 2 while
another process ran); pass ``--threads 2`` on an idle machine.

Prints one JSON object per line: {"metric", "value", "unit", "target", "better"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bd.bags import Cohort, synthetic_cohort  # noqa: E402
from bd.models import create_model  # noqa: E402
from bd.train import TrainParams, run_epoch  # noqa: E402

TARGET_EPOCH_S = 60.0


def emit(metric: str, value: float, unit: str, target: object = None, better: str | None = None) -> None:
    print(json.dumps({"metric": metric, "value": round(float(value), 4), "unit": unit,
                      "target": target, "better": better}), flush=True)


def epoch_seconds(cohort: Cohort, idx: np.ndarray, precision: str, device: torch.device, seed: int = 0) -> float:
    """Wall time of one BD training epoch over the patients ``idx`` (after one warm-up step)."""
    torch.manual_seed(seed)
    params = TrainParams(method="bd", precision=precision)
    model = create_model("bd", cohort.feature_dim, cohort.n_clinical, **vars(params)).to(device)
    stage = model.stages()[0]
    optimizer = torch.optim.SGD(model.stage_parameters(stage), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    rng = np.random.default_rng(seed)
    run_epoch(model, cohort, idx[:2], stage, optimizer, rng, 1, device)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_epoch(model, cohort, idx, stage, optimizer, rng, 1, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1058)
    parser.add_argument("--patches", type=int, default=2000, help="mean patches per patient")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--reference-fraction", type=float, default=0.05,
                        help="share of the patients timed for the fp32 reference")
    parser.add_argument("--skip-cpu", action="store_true", help="GPU figure only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    cohort = synthetic_cohort(args.patients, args.patches, args.dim, 5, seed=0, signal=0.5, dtype=torch.bfloat16)
    n_patches = int(cohort.offsets[-1])
    emit("generate_s", time.perf_counter() - start, "s")
    emit("patches", n_patches, "patches")
    idx = np.arange(cohort.n_patients)

    if not args.skip_cpu:
        cpu = torch.device("cpu")
        emit("torch_threads", torch.get_num_threads(), "threads")
        bf16 = epoch_seconds(cohort, idx, "bf16", cpu)
        emit("bd_epoch_s_cpu", bf16, "s", TARGET_EPOCH_S, "lower")
        emit("bd_patches_per_s_cpu", n_patches / bf16, "patches/s")
        sub = idx[:: max(1, round(1 / args.reference_fraction))]
        share = float(cohort.lengths()[sub].sum()) / n_patches
        fp32 = epoch_seconds(cohort, sub, "fp32", cpu) / share
        emit("fp32_reference_epoch_s_cpu", fp32, "s (extrapolated)")
        emit("speedup_vs_fp32_reference_cpu", fp32 / bf16, "x", 1.0, "higher")

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        cohort.features = cohort.features.to(gpu)
        seconds = epoch_seconds(cohort, idx, "bf16", gpu)
        emit("bd_epoch_s_cuda", seconds, "s", TARGET_EPOCH_S, "lower")
        emit("bd_patches_per_s_cuda", n_patches / seconds, "patches/s")
        emit("gpu", 0, torch.cuda.get_device_name(0))


if __name__ == "__main__":
    main()
