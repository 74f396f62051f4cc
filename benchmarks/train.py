"""Training speed: one BD epoch on a BCNB-sized feature set, generated in memory, and the
evaluation of the seven methods x 3 seeds on its test split.

The cohort: 1,058 patients with 1,000-3,000 patches each (about 2,000 on average, 2.1 million in
all), 1,024-d features, held packed in memory as bf16 (about 4.3 GB), five clinical columns. One
epoch = one pass over all 1,058 patients (the real training split has 630, so a real epoch is
~40 % shorter), both BD branches, all loss terms, backward and optimiser steps, with
``bd train``'s defaults: ``precision: auto`` (bf16 only where the CPU or GPU computes it
natively), ``batch_size: auto`` (resolved on the 630-patient training split: 8 bags, ~16 k
patches a step) and all CPU cores; validation is not timed.

Reference, in the same run: the classic attention-MIL loop -- one bag per step, fp32, one thread
(``bd train``'s former default on CPU) -- on a ``--reference-fraction`` subset of the patients,
scaled to the whole epoch by patch count. Also on that subset: the epoch in bf16 with the same
packing, which shows what ``auto`` avoids on a CPU without native bf16.

Evaluation: ``bd evaluate``'s work (``bd.evaluation.evaluate.evaluate`` with the default settings: 10 masks
per rate, 1,000 bootstrap resamples) for each default method (the seven and modality dropout) x 3 seeds on the test split
(~210 patients x 2,000 patches), untrained models (the cost does not depend on the weights). A
run pools each test patient's slide once for all its masks (``bd.mil.runs.PooledCache``: the masks
change only what the clinical side sees), so the patch layer runs, and its patches are packed, once per
run.

OpenMP threads sleep when they wait (``OMP_WAIT_POLICY=PASSIVE``, as ``bd train`` sets it): on a
busy machine spinning threads steal the time slice their partner needs (measured: GOMP_SPINCOUNT=1e5
made a step's CPU time 1.6x under load). ``run_epoch`` keeps freed heap blocks for reuse
(``bd.device.retain_freed_memory``), as in ``bd train``. Figures from a shared
machine are inflated; the CPU line says which CPU and whether it has native bf16.

Six A/B figures, each alternating two ways of running the step in one process on every 7th
patient (so that the machine's drift hits both): ``--pooling-rounds`` (default 3), the CPU's
bag-wise attention pooling (``bd.mil.bagwise``) against the whole-step path that GPUs take;
``--backend-rounds`` (default 3), the patch layer's oneDNN product against MKL's
(``bd.mil.kernels.linear_relu``); ``--blas-rounds`` (default 3, on AMD CPUs), its weight
gradient through numpy's OpenBLAS against torch's MKL (``bd.mil.kernels.weight_gradient``);
``--fold-rounds`` (default 3, where the fp32 patch layer folds the z-scoring in), the packer
converting only against converting and z-scoring (``bd.mil.pooling.FOLD_MAX_RATIO``); and
``--chunk-thread-rounds`` (default 3, with 2+ threads), the bag-wise score path's chunks on one
Python thread per core against one chunk after another (``bd.mil.bagwise.PARALLEL_CHUNKS``); and
``--background-rounds`` (default 3), the next step's bags packed on an idle-priority thread while
this step runs against packing them at the start of the step
(``bd.mil.packing.BACKGROUND_PACKING``).
``--profile TOP`` prints where one epoch's time goes, op by op (torch.profiler).

Prints one JSON object per line: {"metric", "value", "unit", "target", "better", "device"};
``--save`` appends them to benchmarks/results/train-<device>.jsonl.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy loads OpenBLAS, as `import bd` sets it

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest.mock import patch  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import Recorder, device_slug  # noqa: E402

from bd.mil import bagwise  # noqa: E402
from bd.mil.bags import Cohort  # noqa: E402
from bd.synthetic import synthetic_cohort  # noqa: E402
from bd.device import cpu_info, cpu_summary  # noqa: E402
from bd.mil.models import create_model  # noqa: E402
from bd.mil.train import DEFAULT_METHODS, TrainParams, resolve_settings, run_epoch  # noqa: E402

TARGET_EPOCH_S = 30.0


LAST_CPU_S = [0.0]  # process CPU time of the last timed epoch (all threads)


def epoch_seconds(cohort: Cohort, idx: np.ndarray, params: TrainParams, device: torch.device,
                  seed: int = 0) -> float:
    """Wall time of one BD training epoch over the patients ``idx`` (after one warm-up step);
    its process CPU time goes to ``LAST_CPU_S`` (on a busy machine: the work, not the waiting)."""
    torch.manual_seed(seed)
    model = create_model("bd", cohort.feature_dim, cohort.n_clinical, **vars(params)).to(device)
    stage = model.stages()[0]
    optimizer = torch.optim.SGD(model.stage_parameters(stage), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay, foreach=True)  # as bd train's
    rng = np.random.default_rng(seed)
    run_epoch(model, cohort, idx[: params.batch_size], stage, optimizer, rng, params.batch_size, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    run_epoch(model, cohort, idx, stage, optimizer, rng, params.batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    LAST_CPU_S[0] = time.process_time() - cpu
    return time.perf_counter() - start


def evaluation_seconds(cohort: Cohort, precision: str, device: torch.device, seeds: int) -> float:
    """Wall time of ``bd evaluate``'s computation for every default method x ``seeds`` seeds
    (its process CPU time goes to ``LAST_CPU_S``)."""
    from bd.evaluation.evaluate import EvaluationParams, branch_thresholds, evaluate, run_info, run_predictor
    from bd.mil.runs import TrainedRun

    test = cohort.select(cohort.indices("test"))
    ids, labels = [str(p) for p in test.patient_ids], test.labels.astype(int)
    params = EvaluationParams()
    start, cpu = time.perf_counter(), time.process_time()
    for method in DEFAULT_METHODS:
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = create_model(method, cohort.feature_dim, cohort.n_clinical, precision=precision).to(device)
            model.setup(torch.from_numpy(cohort.clinical[cohort.indices("train")]).to(device))
            run = TrainedRun(model=model.eval(), method=method, params={"method": method}, identity=dict(test.identity),
                             clinical_columns=list(cohort.clinical_columns), threshold=0.5, epoch=0,
                             in_dim=cohort.feature_dim, device=device)
            evaluate(run_predictor(run, test), ids, labels, branch_thresholds(run), params.kinds(method),
                     params, run_info(run, method, seed))
    LAST_CPU_S[0] = time.process_time() - cpu
    return time.perf_counter() - start


def cpu_figures(emit: Recorder, cohort: Cohort, args: argparse.Namespace) -> None:
    cpu = torch.device("cpu")
    idx, n_patches = np.arange(cohort.n_patients), int(cohort.offsets[-1])
    info = cpu_info()
    emit("cpu", torch.get_num_threads(), "torch threads", model=info.model, capability=info.capability,
         native_bf16=info.native_bf16, bf16_flags=info.bf16_flags, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    params, resolved = resolve_settings(TrainParams(method="bd"), cohort, cohort.indices("train"), cpu)
    emit("auto_precision_cpu", None, params.precision, reason=resolved["precision_reason"])
    emit("auto_batch_size_cpu", params.batch_size, "bags per step", reason=resolved["batch_size_reason"])
    emit("weight_gradient_blas_cpu", None, resolved["weight_gradient_blas"],
         reason=resolved["weight_gradient_blas_reason"])
    seconds = epoch_seconds(cohort, idx, params, cpu)
    emit("bd_epoch_s_cpu", seconds, "s", TARGET_EPOCH_S, "lower", precision=params.precision,
         batch_size=params.batch_size, threads=torch.get_num_threads())
    emit("bd_patches_per_s_cpu", n_patches / seconds, "patches/s")
    emit("bd_epoch_cpu_time_s_cpu", LAST_CPU_S[0], "CPU s (all threads)",
         note="wall time on idle cores is about this over the threads when they scale")
    floor = gemm_floor_figures(emit, n_patches, cohort.feature_dim, 2 * params.hidden_dim, params.precision)
    emit("bd_epoch_over_patch_layer_floor_cpu", seconds / floor, "x", note="1.0: the epoch would be its patch layer's "
         "two products alone, at the speed this run measured for them")

    sub = idx[:: max(1, round(1 / args.reference_fraction))]
    share = float(cohort.lengths()[sub].sum()) / n_patches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    classic = TrainParams(method="bd", precision="fp32", batch_size=1)
    reference = epoch_seconds(cohort, sub, classic, cpu) / share
    reference_cpu = LAST_CPU_S[0] / share
    torch.set_num_threads(threads)
    emit("fp32_reference_epoch_s_cpu", reference, "s (extrapolated)", precision="fp32", batch_size=1, threads=1,
         patients=len(sub))
    emit("fp32_reference_epoch_cpu_time_s_cpu", reference_cpu, "CPU s (extrapolated)")
    emit("speedup_vs_fp32_reference_cpu", reference / seconds, "x", 1.0, "higher")
    other = "fp32" if params.precision == "bf16" else "bf16"
    alt = epoch_seconds(cohort, sub, TrainParams(method="bd", precision=other, batch_size=params.batch_size), cpu)
    emit(f"{other}_epoch_s_cpu", alt / share, "s (extrapolated)", precision=other, batch_size=params.batch_size,
         threads=threads, patients=len(sub), note="the precision auto did not choose")
    if args.profile:
        profile_figures(emit, cohort, sub, params, cpu, args.profile)
    if args.backend_rounds:
        backend_figures(emit, cohort, idx[::7], params, cpu, args.backend_rounds)  # ~150 of 1,058 patients
    if args.pooling_rounds:
        pooling_figures(emit, cohort, idx[::7], params, cpu, args.pooling_rounds)
    if args.blas_rounds:
        blas_figures(emit, cohort, idx[::7], params, cpu, args.blas_rounds)
    if args.fold_rounds:
        fold_figures(emit, cohort, idx[::7], params, cpu, args.fold_rounds)
    if args.chunk_thread_rounds:
        chunk_thread_figures(emit, cohort, idx[::7], params, cpu, args.chunk_thread_rounds)
    if args.background_rounds:
        background_figures(emit, cohort, idx[::7], params, cpu, args.background_rounds)
    if args.eval_seeds:
        test = cohort.indices("test")
        emit("evaluate_7x3_s_cpu", evaluation_seconds(cohort, params.precision, cpu, args.eval_seeds), "s",
             methods=len(DEFAULT_METHODS), seeds=args.eval_seeds, test_patients=len(test),
             test_patches=int(cohort.lengths()[test].sum()), threads=threads,
             note="each run pools every test patient's slide once (bd.mil.runs.PooledCache)")
        emit("evaluate_7x3_cpu_time_s_cpu", LAST_CPU_S[0], "CPU s (all threads)")


def gemm_floor_figures(emit: Recorder, n_patches: int, in_dim: int, width: int, precision: str,
                       rows: int = 16384, repeats: int = 5) -> float:
    """The machine's speed now, in this run: the patch layer's forward (oneDNN, as in training)
    and weight-gradient products of one ~16 k-patch step, alone (median of ``repeats``), and the
    epoch they set as a floor (an epoch has ``n_patches / rows`` of each); returns that floor."""
    from bd.mil.kernels import linear_relu, weight_gradient, weight_gradient_blas

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, g = torch.randn(rows, in_dim).to(dtype), torch.randn(rows, width).relu_().to(dtype)
    w, b = torch.randn(width, in_dim).to(dtype), torch.randn(width).to(dtype)
    seconds = {}
    for name, product in (("forward", lambda: linear_relu(x, w, b)), ("weight_gradient", lambda: weight_gradient(g, x))):
        product()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        seconds[name] = float(np.median(times))
        emit(f"patch_layer_{name}_gflops_cpu", 2 * rows * in_dim * width / seconds[name] / 1e9, "GFLOP/s",
             shape=f"{rows} x {in_dim} x {width}", precision=precision,
             **({"blas": weight_gradient_blas()[0]} if name == "weight_gradient" else {}))
    floor = sum(seconds.values()) * n_patches / rows
    emit("bd_epoch_patch_layer_floor_s_cpu", floor, "s", note="the epoch's patch-layer products at the speed above")
    return floor


def profile_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                    top: int) -> None:
    """Where an epoch's time goes: torch.profiler over one epoch on ``sub``, the ``top`` ops by
    self time (the patch layer's two products apart from the other matmuls), as shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        epoch_seconds(cohort, sub, params, cpu)
    totals: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        patch_layer = event.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise") and any(
            cohort.feature_dim in shape and len(shape) == 2 and shape[0] > 1000 for shape in event.input_shapes if shape)
        key = f"{event.key} (patch layer)" if patch_layer else event.key
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    for key, value in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        emit("profile_share_cpu", value / whole, "share of self time", op=key, patients=len(sub))


def ab_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
               rounds: int, name: str, variants: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]],
               note: str) -> None:
    """Two ways of running the same step (``variants``: name -> a context that switches to it,
    the first the default), epochs on ``sub`` alternated ``rounds`` times in this process (same
    model, same batches): medians of wall and CPU time, scaled to the epoch, and their ratio."""
    share = float(cohort.lengths()[sub].sum()) / int(cohort.offsets[-1])
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key in reversed(variants):
            with variants[key]():
                wall = epoch_seconds(cohort, sub, params, cpu)
            times[key].append((wall / share, LAST_CPU_S[0] / share))
    med = {k: (float(np.median([w for w, _ in v])), float(np.median([c for _, c in v]))) for k, v in times.items()}
    for key, (wall, cpu_s) in med.items():
        emit(f"bd_epoch_s_cpu_{key}", wall, "s (extrapolated, median)", patients=len(sub), rounds=rounds,
             cpu_s=round(cpu_s, 1))
    new, old = variants
    emit(name, med[old][0] / med[new][0], "x (wall)", cpu_ratio=round(med[old][1] / med[new][1], 3), note=note)


def backend_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                    rounds: int) -> None:
    """The patch layer's product by oneDNN (bd.mil.kernels.linear_relu, the default where torch
    has it) against MKL's sgemm."""
    from bd.mil import kernels

    if not kernels.onednn_linear():
        return

    def onednn(use: bool) -> contextlib.AbstractContextManager[Any]:
        return patch.object(kernels, "onednn_linear", lambda: use)

    ab_figures(emit, cohort, sub, params, cpu, rounds, "onednn_vs_mkl_patch_layer_cpu",
               {"onednn_patch_layer": lambda: onednn(True), "mkl_patch_layer": lambda: onednn(False)},
               ">1: oneDNN faster; alternated in one process")


def blas_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                 rounds: int) -> None:
    """The patch layer's weight gradient through numpy's OpenBLAS (bd.mil.kernels.weight_gradient,
    the default on AMD CPUs) against torch's MKL; skipped where OpenBLAS is not the default."""
    from bd.mil import kernels

    if kernels.weight_gradient_blas()[0] != "openblas":
        return

    def blas(name: str) -> contextlib.AbstractContextManager[Any]:
        return patch.object(kernels, "weight_gradient_blas", lambda: (name, ""))

    ab_figures(emit, cohort, sub, params, cpu, rounds, "openblas_vs_mkl_weight_gradient_cpu",
               {"openblas_weight_gradient": lambda: blas("openblas"), "mkl_weight_gradient": lambda: blas("mkl")},
               ">1: OpenBLAS faster; alternated in one process")


def fold_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                 rounds: int) -> None:
    """The patch-feature z-scoring folded into the fp32 patch layer (the packer only converts; the
    CPU default) against z-scoring while packing; skipped where the default does not fold."""
    from bd.mil import pooling

    if params.precision != "fp32":
        return

    def fold(use: bool) -> contextlib.AbstractContextManager[Any]:
        return patch.object(pooling, "FOLD_MAX_RATIO", pooling.FOLD_MAX_RATIO if use else -1.0)

    ab_figures(emit, cohort, sub, params, cpu, rounds, "folded_vs_packed_standardisation_cpu",
               {"folded_standardisation": lambda: fold(True), "packed_standardisation": lambda: fold(False)},
               ">1: folding the z-scoring into the patch layer faster; alternated in one process")


def chunk_thread_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                         rounds: int) -> None:
    """The bag-wise score path's chunks on one Python thread per core (bd.mil.bagwise._map_chunks,
    the CPU default) against one chunk after another; skipped on one thread."""
    if torch.get_num_threads() < 2:
        return
    switch_figures(emit, cohort, sub, params, cpu, rounds, bagwise, "PARALLEL_CHUNKS", "chunk_threads_vs_in_order_cpu",
                   ("chunk_threads", "chunks_in_order"),
                   ">1: the score path's chunks on one thread per core faster; alternated in one process")


def background_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                       rounds: int) -> None:
    """The next step's bags packed on an idle-priority thread during this step
    (bd.mil.packing.Packer.batches, the default) against packing them at the start of each step."""
    from bd.mil import packing

    switch_figures(emit, cohort, sub, params, cpu, rounds, packing, "BACKGROUND_PACKING",
                   "background_vs_inline_packing_cpu", ("background_packing", "inline_packing"),
                   ">1: packing the next step in the background faster; alternated in one process")


def switch_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                   rounds: int, module: Any, flag: str, name: str, variants: tuple[str, str], note: str) -> None:
    """:func:`ab_figures` of a module's boolean switch: ``variants`` names it on (the default), then off."""
    def switched(use: bool) -> contextlib.AbstractContextManager[Any]:
        return patch.object(module, flag, use)

    on, off = variants
    ab_figures(emit, cohort, sub, params, cpu, rounds, name, {on: lambda: switched(True), off: lambda: switched(False)},
               note)


def pooling_figures(emit: Recorder, cohort: Cohort, sub: np.ndarray, params: TrainParams, cpu: torch.device,
                    rounds: int) -> None:
    """BD's two pools run bag chunk by bag chunk in one function (bd.mil.bagwise, the CPU default)
    against the path GPUs take: one fused patch-layer GEMM, then each pool's score MLP and
    softmax over the whole step."""
    from bd.mil import distillation, pooling

    def whole_step(pools, features, offsets):
        return [p(features, offsets, h) for p, h in zip(pools, pooling.embed_instances(pools, features))]

    def use(path: Callable[..., Any]) -> contextlib.AbstractContextManager[Any]:
        return patch.object(distillation, "attention_pools", path)

    ab_figures(emit, cohort, sub, params, cpu, rounds, "bagwise_vs_whole_step_pooling_cpu",
               {"bagwise_pooling": lambda: use(pooling.attention_pools), "whole_step_pooling": lambda: use(whole_step)},
               ">1: bd.mil.bagwise faster; alternated in one process")


def gpu_figures(emit: Recorder, cohort: Cohort, args: argparse.Namespace) -> None:
    gpu = torch.device("cuda")
    cohort.features = cohort.features.to(gpu)
    idx, n_patches = np.arange(cohort.n_patients), int(cohort.offsets[-1])
    emit("gpu", 0, torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported())
    params, resolved = resolve_settings(TrainParams(method="bd"), cohort, cohort.indices("train"), gpu)
    emit("auto_precision_cuda", None, params.precision, reason=resolved["precision_reason"])
    seconds = epoch_seconds(cohort, idx, params, gpu)
    emit("bd_epoch_s_cuda", seconds, "s", TARGET_EPOCH_S, "lower", precision=params.precision,
         batch_size=params.batch_size)
    emit("bd_patches_per_s_cuda", n_patches / seconds, "patches/s")
    one = epoch_seconds(cohort, idx, TrainParams(method="bd", precision=params.precision, batch_size=1), gpu)
    emit("bd_epoch_s_cuda_one_bag_per_step", one, "s", precision=params.precision, batch_size=1)
    if args.eval_seeds:
        emit("evaluate_7x3_s_cuda", evaluation_seconds(cohort, params.precision, gpu, args.eval_seeds), "s",
             methods=len(DEFAULT_METHODS), seeds=args.eval_seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1058)
    parser.add_argument("--patches", type=int, default=2000, help="mean patches per patient")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, all cores)")
    parser.add_argument("--reference-fraction", type=float, default=0.05,
                        help="share of the patients timed for the fp32 reference")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="profile one epoch on the reference subset and print the TOP ops' shares (0: skip)")
    parser.add_argument("--pooling-rounds", type=int, default=3,
                        help="rounds of the bag-wise vs whole-step pooling A/B on every 7th patient (0: skip)")
    parser.add_argument("--backend-rounds", type=int, default=3,
                        help="rounds of the oneDNN-vs-MKL patch-layer A/B on every 7th patient (0: skip)")
    parser.add_argument("--blas-rounds", type=int, default=3,
                        help="rounds of the OpenBLAS-vs-MKL weight-gradient A/B on every 7th patient (0: skip)")
    parser.add_argument("--fold-rounds", type=int, default=3,
                        help="rounds of the folded-vs-packed z-scoring A/B on every 7th patient (0: skip)")
    parser.add_argument("--chunk-thread-rounds", type=int, default=3,
                        help="rounds of the chunks-on-threads vs in-order bag-wise A/B on every 7th patient (0: skip)")
    parser.add_argument("--background-rounds", type=int, default=3,
                        help="rounds of the background-vs-inline packing A/B on every 7th patient (0: skip)")
    parser.add_argument("--eval-seeds", type=int, default=3, help="seeds per method for the evaluation timing (0: skip)")
    parser.add_argument("--skip-cpu", action="store_true", help="GPU figures only")
    parser.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.skip_cpu
    emit = Recorder("train", f"cuda: {torch.cuda.get_device_name(0)}" if cuda else f"cpu: {cpu_summary()}",
                    args.save, slug=None if cuda else "cpu-" + _slug(cpu_info().model))

    emit("load_average_start", os.getloadavg()[0], "runnable tasks (1 min)", cores=os.cpu_count(),
         note="above the core count, other jobs share the cores: wall times are inflated, CPU s less so")
    start = time.perf_counter()
    cohort = synthetic_cohort(args.patients, args.patches, args.dim, 5, seed=0, signal=0.5, dtype=torch.bfloat16)
    emit("generate_s", time.perf_counter() - start, "s")
    emit("patches", int(cohort.offsets[-1]), "patches", patients=cohort.n_patients, dim=args.dim)
    if not args.skip_cpu:
        cpu_figures(emit, cohort, args)
    emit("load_average_end", os.getloadavg()[0], "runnable tasks (1 min)", cores=os.cpu_count())
    if torch.cuda.is_available():
        emit.set_device(f"cuda: {torch.cuda.get_device_name(0)}", device_slug(torch.cuda.get_device_name(0)))
        gpu_figures(emit, cohort, args)


def _slug(model: str) -> str:
    """``AMD EPYC 7B13 64-Core Processor`` -> ``amd-epyc-7b13``."""
    words = [w for w in device_slug(model).split("-") if w not in ("processor", "cpu", "r", "tm")]
    return "-".join(words[:3]) or "unknown"


if __name__ == "__main__":
    main()
