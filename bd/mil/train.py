"""``bd train``: train BD or a baseline on the training split, early-stopped on validation.

Optimiser: SGD (paper defaults: lr 1e-4, momentum 0.3, weight decay 1e-3), one optimiser per
training stage (two-stage methods such as AE train their parts in turn). A step takes
``batch_size`` patients' bags, packed (not padded) into one tensor, each bag pooled on its own;
``auto`` (the default) is the classic one bag per step, except for BCNB-sized cohorts with wide
features, which take ~16 k patches a step (8 bags of 2,000) so that the patch layer's matmul uses
every core (:func:`auto_batch_size`). A step's bags are packed by :class:`bd.mil.packing.Packer`:
into one buffer reused across steps, converted and standardised in the same pass (on a CPU
these passes, not the matmuls, were what made a packed step slow), and each bag is pooled on
its own part of the packed tensors; freed memory is kept for the next step (no page faults,
``bd.device.retain_freed_memory``). ``precision: auto`` computes the patch layer in bf16 only
where the device does so natively (``bd.device``). Both choices are logged and recorded in the
checkpoint (``resolved``). Training uses the training patients with a slide and clinical data (the
paper's modality-complete training set).

Patch features are standardised per dimension (mean and sd of the training patients' patches
only, :func:`feature_statistics`) inside the model's attention poolings, so the transform is saved
in the checkpoint and applied the same way in training, evaluation and ``bd predict``. Why: a
random-weight or ImageNet encoder's features sit in a narrow positive range (the demo's: mean
0.11, sd 0.15), too small for the attention MIL to learn from at any tried learning rate.

After each epoch the validation patients are predicted under the stage's presence conditions (for
BD: clinical present -> multi-modal branch, absent -> single-modal branch). The kept epoch is the
best by ``early_stopping`` among epochs from ``min_epochs`` on (ties: validation AUC, then
validation loss); training stops ``patience`` epochs after it. ``val_auc`` (the default),
``val_loss`` and ``val_f1`` (macro F1 at the threshold tuned on the same predictions) are
deviations from the paper, which monitors F1 on the training set (``train_f1``: macro F1 at 0.5
on the training patients): on a small cohort, a fixed 0.5 cut scores every untrained epoch that
predicts the majority class the same, and training F1 rewards overfitting.

Decision thresholds are then chosen on the validation predictions to maximise macro F1, one per
answering branch, under the first condition (complete, no clinical data, no slide) where it
answers -- the same policy for every method, Filling's zero-filled branches included -- plus one
pooled over the method's conditions.

Deterministic for a seed on CPU: seeded initialisation and shuffling, deterministic algorithms.

Outputs in ``--out-dir``: ``checkpoint.pt`` (model state with the feature standardisation,
parameters, method, feature/encoder identity, clinical columns, scaler path and SHA-256, chosen
epoch(s), thresholds), ``curve.csv`` (per stage and epoch: mean training losses, each term's share
of its branch loss, validation AUC/F1/log loss/probability sd per condition) and ``curve.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os

# OpenMP threads that wait sleep instead of spinning: on a machine whose other cores are busy, a
# spinning thread burns the time slice its partner needs, and a step then takes several times
# longer with two threads than with one (benchmarks/train.py). libgomp reads this when torch is
# first imported, so it applies to `bd train` (a value set by the user wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from bd import __version__
from bd.mil.bags import Batch, Cohort
from bd.device import PRECISION_CHOICES, cpu_summary, resolve_device, resolve_precision, retain_freed_memory
from bd.errors import BDError, ConfigError
from bd.io import atomic_path, file_sha256
from bd.mil.kernels import weight_gradient_blas
from bd.mil.models import (
    DIRECTIONS,
    MILModel,
    Stage,
    create_model,
    model_class,
    model_kwargs,
)
from bd.methods import list_methods
from bd.mil.packing import Packer, largest_step
from bd.params import build, check, param, to_dict
from bd.mil.runs import CHECKPOINT_FORMAT, patient_chunks

from bd.mil.validation import (
    EARLY_STOPPING, choose_thresholds, epoch_score, validate,
)

log = logging.getLogger(__name__)

DEFAULT_METHODS = list_methods(default=True)  # training.methods by default (the registry of methods)
# batch_size auto: bags are packed several to a step only for cohorts whose patch layer is big
# enough for one bag's matmul to leave a CPU core idle (BCNB: 630 x ~2,000 patches x 1,024-d);
# smaller cohorts (the demo, low-dimensional features) keep one bag per step.
AUTO_BATCH_MIN_PATIENTS = 256
AUTO_BATCH_MIN_ELEMENTS = 1 << 29  # training patches x feature dimension
AUTO_BATCH_STEP_PATCHES = 16384  # patches per packed step
AUTO_BATCH_MAX = 16


@dataclass
class TrainParams:
    """Training of each run (`bd train`): the workflow passes this section with an experiment's
    overrides (its method, ablation settings)."""

    method: str = param("bd", in_config=False, description="the run's method (set per experiment)")
    methods: list[str] = param(default_factory=lambda: list(DEFAULT_METHODS), choices=list_methods(), min_items=1,
                               unique_items=True, description="methods of the main runs (workflow)")
    seeds: list[int] = param(default_factory=lambda: [0], min_items=1, unique_items=True,
                             description="seeds of the main runs (workflow)")
    max_epochs: int = param(60, minimum=1, description="epochs at most")
    patience: int = param(15, minimum=1, description="epochs without improvement before training stops")
    batch_size: int | Literal["auto"] = param(
        "auto", minimum=1, description="patients (bags) per SGD step; auto: 1, or ~16 k patches a step for "
                                       "BCNB-sized cohorts (auto_batch_size)")
    lr: float = param(1.0e-4, exclusive_minimum=0, description="SGD learning rate")
    momentum: float = param(0.3, minimum=0, description="SGD momentum")
    weight_decay: float = param(1.0e-3, minimum=0, description="SGD weight decay")
    tau: float = param(1.2, exclusive_minimum=0, description="BD: distillation temperature")
    lambda_m: float = param(0.6, minimum=0, description="BD: weight of the distillation to the multimodal branch")
    lambda_s: float = param(0.5, minimum=0, description="BD: weight of the distillation to the single-modal branch")
    prompt_length: int = param(50, minimum=1, description="BD: prompt length (Fig. 4c)")
    directions: str = param("both", choices=DIRECTIONS, description="BD: distillation directions (Table II)")
    hidden_dim: int = param(128, minimum=1, description="slide feature size (attention-pooled instance embeddings)")
    clinical_dim: int = param(50, minimum=1, description="clinical feature f_c (= prompt feature f_p) size")
    clinical_expansion: int | None = param(
        None, minimum=1, description="clinical feature = N x the clinical input width (overrides clinical_dim; "
                                     "Fig. 5 b/c)")
    smil_priors: int = param(8, minimum=1, description="SMIL: k-means priors of the clinical vector")
    modality_dropout_rate: float = param(
        0.5, minimum=0, exclusive_maximum=1, description="modality_dropout: share of training bags whose clinical "
                                                         "feature is the learned missing token")
    early_stopping: str = param("val_auc", choices=EARLY_STOPPING,
                                description="what picks the kept epoch (train_f1: the paper's rule)")
    min_epochs: int = param(1, minimum=1, description="no epoch before this one is kept, and training runs at least "
                                                      "this long")
    precision: str = param("auto", choices=PRECISION_CHOICES,
                           description="the patch-feature layer's compute type; auto = bf16 where native (bd.device)")
    device: str = param("auto", choices=("auto", "cpu", "cuda"), description="where training runs")

    def __post_init__(self) -> None:
        check(self)
        model_class(self.method)
        if self.min_epochs > self.max_epochs:
            raise ConfigError(f"training.min_epochs: {self.min_epochs} exceeds training.max_epochs ({self.max_epochs})")


@dataclass
class TrainResult:
    model: MILModel
    curve: pd.DataFrame
    stage_epochs: dict[str, int]
    threshold: float  # pooled over the method's conditions
    thresholds: dict[str, float]  # per answering branch
    val: dict[str, float]
    resolved: dict[str, Any] = field(default_factory=dict)  # what the auto settings became, and why
    params: TrainParams | None = None  # as asked, clinical_expansion resolved into clinical_dim


@contextlib.contextmanager
def deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and switch to deterministic algorithms (restored afterwards)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def training_patients(cohort: Cohort, split: str) -> np.ndarray:
    """Patients of ``split`` with a slide (training and validation use complete patients)."""
    idx = cohort.indices(split)
    kept = idx[cohort.has_slide[idx]]
    if len(kept) < len(idx):
        log.warning("%s: %d patient(s) without a slide left out", split, len(idx) - len(kept))
    if not len(kept):
        raise BDError(f"no {split} patient with a slide: check results/clinical/clinical.tsv and the feature stores")
    return kept


def training_batches(cohort: Cohort, idx: np.ndarray, device: torch.device) -> Iterator[Batch]:
    """The patients at ``idx`` once, in inference-sized batches (for :meth:`MILModel.fit_statistics`)."""
    for part in patient_chunks(cohort, idx, cohort.has_slide[idx]):
        yield cohort.batch(idx[part], device=device)


def feature_statistics(cohort: Cohort, idx: np.ndarray, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and sd of the patches of the patients at ``idx`` (the training patients:
    validation and test patches never inform the transform), in float64 chunks; an sd under 1e-6
    (a constant dimension) is set to 1 so that it stays constant instead of blowing up."""
    total = torch.zeros(cohort.feature_dim, dtype=torch.float64)
    squares = torch.zeros(cohort.feature_dim, dtype=torch.float64)
    count = 0
    for i in idx:
        a, b = int(cohort.offsets[i]), int(cohort.offsets[i + 1])
        for start in range(a, b, chunk):
            x = cohort.features[start : min(start + chunk, b)].to("cpu", torch.float64)
            total += x.sum(0)
            squares += (x * x).sum(0)
            count += x.shape[0]
    if not count:
        raise BDError("no training patch to fit the feature standardisation on")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.float(), std.float()



def run_epoch(model: MILModel, cohort: Cohort, idx: np.ndarray, stage: Stage, optimizer: torch.optim.Optimizer,
              rng: np.random.Generator, batch_size: int, device: torch.device) -> dict[str, float]:
    """One pass over the training patients in a seeded random order; mean of each loss term."""
    retain_freed_memory()  # each step's intermediates reuse the last step's memory (bd.device)
    model.train()
    order = rng.permutation(idx)
    sums: dict[str, float] = {}
    parts = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with Packer(model, cohort, device, largest_step(cohort, idx, batch_size)) as packer:
        for batch in packer.batches(parts):
            losses = model.losses(batch, stage.name)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * batch.size
    means = {k: v / len(order) for k, v in sums.items()}
    if not math.isfinite(means["loss"]):
        raise BDError(f"stage {stage.name}: the training loss is not finite (lower training.lr?)")
    return {**{f"train_{k}": v for k, v in means.items()}, **model.loss_shares(means)}

def auto_batch_size(cohort: Cohort, train_idx: np.ndarray) -> tuple[int, str]:
    """Bags per step for ``batch_size: auto``, and why: one bag per step unless the cohort is of
    BCNB's size (``AUTO_BATCH_*``); then enough bags for ~16 k patches a step, so that the patch
    layer's matmul keeps two cores busy. Each bag is still pooled on its own (packed bags)."""
    n, patches = len(train_idx), int(cohort.lengths()[train_idx].sum())
    size = f"{n} training bags, {patches:,} patches x {cohort.feature_dim}-d"
    if n < AUTO_BATCH_MIN_PATIENTS or patches * cohort.feature_dim < AUTO_BATCH_MIN_ELEMENTS:
        return 1, f"training.batch_size: auto -> 1 ({size}: a small cohort keeps one bag per step)"
    mean = patches / max(n, 1)
    bags = int(np.clip(round(AUTO_BATCH_STEP_PATCHES / max(mean, 1.0)), 1, AUTO_BATCH_MAX))
    return bags, f"training.batch_size: auto -> {bags} ({size}: ~{AUTO_BATCH_STEP_PATCHES} patches a step)"


def resolve_settings(params: TrainParams, cohort: Cohort, train_idx: np.ndarray,
                     device: torch.device) -> tuple[TrainParams, dict[str, Any]]:
    """``params`` with ``precision`` and ``batch_size`` made concrete, and the record of the
    choices (logged, and kept in the checkpoint)."""
    precision, why_precision = resolve_precision(params.precision, device, "training.precision")
    if params.batch_size == "auto":
        batch_size, why_batch = auto_batch_size(cohort, train_idx)
    else:
        batch_size, why_batch = int(params.batch_size), f"training.batch_size: {params.batch_size} asked for"
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_summary()
    blas, why_blas = weight_gradient_blas() if device.type == "cpu" else ("cublas", "")
    for line in (why_precision, why_batch, why_blas):
        if line:
            log.info("%s", line)
    resolved = {"precision": precision, "precision_reason": why_precision, "batch_size": batch_size,
                "batch_size_reason": why_batch, "device": str(device), "hardware": hardware,
                "threads": torch.get_num_threads(), "weight_gradient_blas": blas,
                "weight_gradient_blas_reason": why_blas}
    return replace(params, precision=precision, batch_size=batch_size), resolved


def train_stage(model: MILModel, cohort: Cohort, stage: Stage, train_idx: np.ndarray, val_idx: np.ndarray,
                params: TrainParams, rng: np.random.Generator, device: torch.device,
                progress: bool) -> tuple[int, list[dict[str, Any]]]:
    """Train one stage with early stopping on ``params.early_stopping``: only epochs from
    ``min_epochs`` on can be kept, and training stops ``patience`` epochs after the best one
    (never before ``min_epochs``); the kept epoch's weights are loaded at the end."""
    from tqdm import tqdm

    optimizer = torch.optim.SGD(model.stage_parameters(stage), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay, foreach=True)  # one kernel per op, same values
    best: tuple[float, ...] = (-math.inf,)
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    rows: list[dict[str, Any]] = []
    bar = tqdm(range(1, params.max_epochs + 1), desc=f"{model.method}/{stage.name}", unit="epoch", disable=not progress)
    for epoch in bar:
        losses = run_epoch(model, cohort, train_idx, stage, optimizer, rng, params.batch_size, device)
        row = {"stage": stage.name, "epoch": epoch, **losses,
               **validate(model, cohort, val_idx, stage.val_conditions, device)}
        if params.early_stopping == "train_f1":
            row.update(validate(model, cohort, train_idx, stage.val_conditions, device, prefix="trainset"))
        rows.append(row)
        bar.set_postfix(loss=f"{losses['train_loss']:.4f}", val_auc=f"{row['val_auc']:.3f}",
                        val_loss=f"{row['val_loss']:.3f}")
        if not progress:
            log.info("%s epoch %d: loss %.4f, val AUC %.3f, loss %.3f, F1 %.3f, prob sd %.3f", stage.name, epoch,
                     losses["train_loss"], row["val_auc"], row["val_loss"], row["val_f1"], row["val_prob_sd"])
        score = epoch_score(row, params.early_stopping)
        if epoch >= params.min_epochs and score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        elif epoch >= params.min_epochs and epoch - max(best_epoch, params.min_epochs) >= params.patience:
            log.info("%s: early stop at epoch %d (kept %d, %s %.3f)", stage.name, epoch, best_epoch,
                     params.early_stopping, best[0])
            break
    model.load_state_dict(best_state)
    return best_epoch, rows


def train_model(cohort: Cohort, params: TrainParams, seed: int, device: torch.device | str = "cpu",
                progress: bool = True) -> TrainResult:
    """Train ``params.method`` on ``cohort``'s training split, validated on its validation split."""
    device = torch.device(device)
    train_idx, val_idx = training_patients(cohort, "train"), training_patients(cohort, "val")
    if len(np.unique(cohort.labels[train_idx])) < 2:
        raise BDError("the training split holds one class only: cannot train a classifier")
    if params.clinical_expansion:
        params = replace(params, clinical_dim=params.clinical_expansion * cohort.n_clinical)
        log.info("clinical feature: %d x %d clinical columns = %d", params.clinical_expansion, cohort.n_clinical,
                 params.clinical_dim)
    asked = params  # recorded in the checkpoint as asked (auto stays auto); `resolved` says what it became
    params, resolved = resolve_settings(params, cohort, train_idx, device)
    with deterministic(seed, device):
        model = create_model(params.method, cohort.feature_dim, cohort.n_clinical, **to_dict(params)).to(device)
        model.setup(torch.from_numpy(cohort.clinical[train_idx]).to(device))
        model.set_clinical_columns(list(cohort.clinical_columns))
        model.standardise(*(t.to(device) for t in feature_statistics(cohort, train_idx)))
        model.fit_statistics(training_batches(cohort, train_idx, device))
        rng = np.random.default_rng(seed)
        stage_epochs, rows = {}, []
        for stage in model.stages():
            stage_epochs[stage.name], stage_rows = train_stage(
                model, cohort, stage, train_idx, val_idx, params, rng, device, progress)
            rows += stage_rows
        val = validate(model, cohort, val_idx, model.conditions, device)
        threshold, thresholds = choose_thresholds(model, cohort, val_idx, device)
    model.eval()
    log.info("%s seed %d: epochs %s, val F1 %.3f, AUC %.3f, thresholds %s",
             params.method, seed, stage_epochs, val["val_f1"], val["val_auc"],
             {b: round(t, 3) for b, t in thresholds.items()})
    return TrainResult(model, pd.DataFrame(rows), stage_epochs, threshold, thresholds, val, resolved, asked)


# ---------------------------------------------------------------- outputs


def checkpoint_payload(result: TrainResult, cohort: Cohort, params: TrainParams, seed: int,
                       scaler: Path | None) -> dict[str, Any]:
    """Everything a later stage needs to use the model and to check its inputs."""
    params = result.params or params
    last = list(result.stage_epochs)[-1]
    return {
        "format": CHECKPOINT_FORMAT,
        "method": params.method,
        "params": to_dict(params),
        "model_kwargs": model_kwargs(params.method, {**to_dict(params), **_concrete(result)}),
        "resolved": dict(result.resolved),  # what precision/batch_size auto became, and why
        "in_dim": cohort.feature_dim,
        "clin_dim": cohort.n_clinical,
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "identity": cohort.identity,
        "clinical_columns": list(cohort.clinical_columns),
        "scaler": {"path": str(scaler), "sha256": file_sha256(scaler)} if scaler else None,
        "epoch": int(result.stage_epochs[last]),
        "stage_epochs": {k: int(v) for k, v in result.stage_epochs.items()},
        "threshold": float(result.threshold),
        "thresholds": {str(k): float(v) for k, v in result.thresholds.items()},
        "val": {k: float(v) for k, v in result.val.items()},
        "seed": int(seed),
        "versions": {"bd": str(__version__), "torch": str(torch.__version__)},
    }


def _concrete(result: TrainResult) -> dict[str, Any]:
    """The resolved settings that rebuild the trained model (precision: its patch layer)."""
    return {k: result.resolved[k] for k in ("precision",) if k in result.resolved}


CURVE_VALIDATION = ("val_auc", "val_f1", "val_loss", "val_prob_sd", "trainset_f1_05")


def plot_curve(curve: pd.DataFrame, stage_epochs: dict[str, int], path: Path, title: str) -> None:
    """The curve figure: one row of panels per group of series, one legend a row (bd/mil/curve_plot.py)."""
    from bd.mil.curve_plot import plot_curve as draw

    draw(curve, stage_epochs, path, title)


def write_outputs(result: TrainResult, cohort: Cohort, params: TrainParams, seed: int, out_dir: Path,
                  scaler: Path | None) -> Path:
    """curve.csv, curve.png, then checkpoint.pt (last, so a checkpoint means a finished run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "curve.csv") as tmp:
        result.curve.to_csv(tmp, index=False)
    plot_curve(result.curve, result.stage_epochs, out_dir / "curve.png", f"{params.method}, seed {seed}")
    path = out_dir / "checkpoint.pt"
    with atomic_path(path) as tmp:
        torch.save(checkpoint_payload(result, cohort, params, seed, scaler), tmp)
    return path


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-index", required=True, help="the feature index (index.tsv: slide_id, store) or a folder of {slide}.zarr stores")
    parser.add_argument("--samples", required=True, help="sample sheet TSV (slide_id, patient_id, path)")
    parser.add_argument("--clinical", required=True, help="normalised clinical table (clinical.tsv)")
    parser.add_argument("--scaler", default=None,
                        help="the clinical scaler (recorded with its SHA-256; default: scaler.json beside --clinical)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (initialisation and shuffling)")
    parser.add_argument("--params", default=None, help="training section plus experiment overrides (JSON or file)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--out-dir", required=True, help="folder for checkpoint.pt, curve.csv, curve.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _scaler_path(args: argparse.Namespace) -> Path | None:
    path = Path(args.scaler) if args.scaler else Path(args.clinical).with_name("scaler.json")
    if path.is_file():
        return path
    if args.scaler:
        raise ConfigError(f"--scaler: {path} does not exist")
    log.warning("no clinical scaler beside %s: the checkpoint records none", args.clinical)
    return None


def run(args: argparse.Namespace) -> int:
    from bd.mil.bags import load_cohort

    params = build(TrainParams, args.params)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(params.device, "training.device")
    scaler = _scaler_path(args)
    precision, _ = resolve_precision(params.precision, device, "training.precision")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16  # fp16: the stores' own type
    cohort = load_cohort(args.feature_index, args.samples, args.clinical, dtype=dtype, progress=not args.no_progress)
    if device.type == "cuda":
        cohort.features = cohort.features.to(device)  # one copy up front: an epoch then reads GPU memory
    result = train_model(cohort, params, args.seed, device, progress=not args.no_progress)
    path = write_outputs(result, cohort, params, args.seed, Path(args.out_dir), scaler)
    print(f"{params.method} seed {args.seed}: epoch {result.stage_epochs}, val F1 {result.val['val_f1']:.3f}, "
          f"AUC {result.val['val_auc']:.3f}, threshold {result.threshold:.3f} -> {path}")
    return 0
