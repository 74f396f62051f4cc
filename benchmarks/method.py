"""Method benchmark: the seven methods of Table I and modality dropout on a BCNB-sized synthetic cohort, and the paper's claims.

Cohort: :func:`bd.synthetic.method_cohort` (1,058 patients, 630 / 210 / 218, 38 % N+, 32-d patch
features, a hidden per-patient tumour fraction driving tumour-like patches), in two regimes,
``independent`` and ``shortcut`` (see :mod:`bd.synthetic`). Seed ``s`` draws cohort ``s`` and
trains every method with seed ``s``, so the methods of one seed are paired.

Training: ``bd.mil.train.train_model`` with :data:`TRAINING` (``TrainParams``' defaults otherwise:
weight decay 1e-3, tau 1.2, lambda_m 0.6, lambda_s 0.5, prompt length 50, early stopping on
validation AUC). The recipe (SGD, lr 3e-2, momentum 0.9, 32 bags a step, 5-40 epochs, patience 8,
64-d slide features, fp32: the CPU has no native bf16) was chosen on image-only runs only, for the
learning targets below and the time limit, before any claim was looked at, and is the same for
every method; it is not the paper's optimiser, which ``paper_optimiser_*`` reports on its own.
Evaluation as ``bd evaluate`` does it: each run goes through a checkpoint and
``bd.mil.runs.load_run``, then ``bd.evaluation.evaluate.evaluate`` on the test split with the masks of
``bd.evaluation.missing`` (the same for every method), each answering branch at its own validation threshold,
clinical missing rates 0 / 50 / 80 / 100 % with ``--repeats`` masks each.

Printed, one JSON object per line ({"metric", "value", "unit", "target", "better"}, plus
``regime``, ``rate``, ``ci``, ``verdict``, ``paper`` where they apply):

* ``cpu``, ``workers``, ``seeds``, ``minutes`` (target 15 on 2 cores);
* calibration per regime: the tumour fraction's and the clinical oracle's test AUC;
* ``image_only_vs_tumour_fraction_auc`` (image-only test AUC / the tumour fraction's, target
  >= 0.95 in ``independent``; in ``shortcut`` the tumour patches overlap the background by design,
  so the figure is reported without a target) and ``image_only_vs_mean_pool_lr_auc`` (image-only
  minus a logistic regression on mean-pooled patch features of the same cohort, target >= -0.01);
* ``s2m_share``: S->M's share of BD's multi-modal loss at the kept epoch (target >= 0.05);
* ``auc_*`` / ``f1_*``: every method's mean test AUC and macro F1 (in points) per regime and rate;
* ``claim_*``: per regime and rate, each claim of the paper as the mean paired difference over
  seeds (AUC points), its 95 % t interval and a verdict (:func:`verdict`); claims carry no target;
  ``modality_dropout`` (not in the paper) is compared the same way with BD and Filling (``paper``
  null);
* ``paper_optimiser_*``: BD trained with the paper's SGD (lr 1e-4, momentum 0.3, one bag per step)
  on the ``independent`` cohort of seed 0: test AUC (complete data) and the kept epoch.

Work is spread over ``--workers`` processes with one torch thread each. ``minutes`` is the wall
time; ``cpu_minutes_per_worker`` (the jobs' CPU time over the workers) is what it would be on an
otherwise idle machine, since the development machine is shared (its load average is printed).

    python benchmarks/method.py > method.jsonl      # the full run (<= 15 min on 2 idle cores)
    python benchmarks/method.py --table method.jsonl  # the README's tables from it
    python benchmarks/method.py --seeds 2 --patients 300 --training '{"max_epochs": 2, "min_epochs": 1}'  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy loads OpenBLAS, as `import bd` sets it for `bd train`
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bd.synthetic import REGIMES, SyntheticCohort, method_cohort  # noqa: E402

METHODS = ("image_only", "clinical_only", "filling", "ae", "ensemble", "smil", "bd", "modality_dropout")
RATES = (0.0, 50.0, 80.0, 100.0)
# The benchmark's training recipe; every other key keeps the config's default (bd.mil.train.TrainParams).
TRAINING: dict[str, Any] = {"lr": 3e-2, "momentum": 0.9, "batch_size": 32, "max_epochs": 40, "patience": 8,
                            "min_epochs": 5, "hidden_dim": 64, "precision": "fp32"}
PAPER_OPTIMISER: dict[str, Any] = {"lr": 1e-4, "momentum": 0.3, "batch_size": 1}
# Table I of the paper, AUC points: method -> rate -> AUC (image-only and clinical-only at 0 % only).
PAPER_AUC = {
    "image_only": {0.0: 82.3}, "clinical_only": {0.0: 71.6},
    "filling": {0.0: 84.1, 50.0: 81.8, 80.0: 79.1, 100.0: 78.9},
    "ae": {0.0: 84.1, 50.0: 81.3, 80.0: 79.9, 100.0: 79.6},
    "ensemble": {0.0: 85.1, 50.0: 83.7, 80.0: 82.8, 100.0: 82.3},
    "smil": {0.0: 82.6, 50.0: 82.2, 80.0: 80.0, 100.0: 78.8},
    "bd": {0.0: 86.1, 50.0: 85.0, 80.0: 84.2, 100.0: 82.7},
}
PROGRESS_KEYS = ("auc", "epoch", "seconds", "cpu_seconds", "s2m_share", "prob_sd")  # per-job stderr lines
LR_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the mean-pool logistic regression's inverse L2 strengths
ORDER = {m: i for i, m in enumerate(("smil", "bd", "ae", "ensemble", "modality_dropout", "filling", "image_only",
                                      "clinical_only"))}


def emit(metric: str, value: float, unit: str, target: object = None, better: str | None = None,
         **extra: Any) -> None:
    """One JSON line; a non-finite number (an interval over one seed) is written as null."""
    row = {"metric": metric, "value": round(float(value), 4), "unit": unit, "target": target, "better": better}
    print(json.dumps(_finite({**row, **extra}), allow_nan=False), flush=True)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def cpu_name() -> str:
    """CPU model and whether it computes bf16 natively (AVX-512 BF16 or AMX)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    bf16 = "yes" if flags & {"avx512_bf16", "amx_bf16"} else "no"
    return f"{model} (native bf16: {bf16})"


# ---------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: ``sign`` * (a - b) > 0 (``between``: a > b and c > a)."""

    name: str
    rates: tuple[float, ...]
    a: str
    b: str
    sign: int = 1
    c: str | None = None  # "between" claims: b < a < c

    def differences(self, auc: dict[str, np.ndarray]) -> np.ndarray:
        """Per seed, the difference whose sign is the claim (for ``between``: the smaller margin)."""
        if self.c is None:
            return auc[self.a] - auc[self.b]
        return np.minimum(auc[self.a] - auc[self.b], auc[self.c] - auc[self.a])

    def paper(self, rate: float) -> float | None:
        """The same difference in the paper's Table I (image-only taken at its one figure); None
        for a method the paper does not have."""
        if not {self.a, self.b, *([self.c] if self.c else [])} <= set(PAPER_AUC):
            return None

        def at(method: str) -> float:
            figures = PAPER_AUC[method]
            return figures.get(rate, figures[0.0])
        if self.c is None:
            return round(at(self.a) - at(self.b), 1)
        return round(min(at(self.a) - at(self.b), at(self.c) - at(self.a)), 1)


CLAIMS = (
    Claim("bd_minus_filling", RATES, "bd", "filling"),
    Claim("bd_minus_image_only", (100.0,), "bd", "image_only"),
    Claim("filling_minus_image_only", (100.0,), "filling", "image_only", sign=-1),
    Claim("ensemble_between_filling_and_bd", RATES, "ensemble", "filling", c="bd"),
    Claim("modality_dropout_minus_bd", RATES, "modality_dropout", "bd"),  # not the paper's: no paper figure
    Claim("modality_dropout_minus_filling", RATES, "modality_dropout", "filling"),
)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval over seeds (NaN interval for one value)."""
    from scipy.stats import t

    x = np.asarray(values, float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, sign: int = 1) -> str:
    """``holds`` if the interval lies on the claimed side of zero, ``contradicted`` if on the other,
    ``not shown`` if it straddles zero (or is undefined)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not shown"
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        return "holds"
    if hi < 0:
        return "contradicted"
    return "not shown"


# ---------------------------------------------------------------- one training run


_COHORTS: dict[tuple[str, int, int], SyntheticCohort] = {}


def cohort_of(regime: str, seed: int, patients: int) -> SyntheticCohort:
    """The cohort of ``(regime, seed)``, generated once per worker process."""
    key = (regime, seed, patients)
    if key not in _COHORTS:
        _COHORTS.clear()
        _COHORTS[key] = method_cohort(regime, patients, seed)
    return _COHORTS[key]


def s2m_share(curve: Any, epoch: int) -> float:
    """S->M's share of L_mul at ``epoch`` (lambda_m * distillation / L_mul, epoch means; curve.csv)."""
    row = curve[curve["epoch"] == epoch].iloc[-1]
    return float(row["share_mul_distill"])


def evaluate_like_bd(result: Any, cohort: Any, params: Any, seed: int, rates: Sequence[float],
                     repeats: int) -> Any:
    """``bd evaluate``'s summary table of a trained result: checkpoint -> load_run -> evaluate."""
    import torch

    from bd.evaluation.evaluate import EvaluationParams, branch_thresholds, evaluate, run_info, run_predictor
    from bd.mil.runs import load_run
    from bd.mil.train import checkpoint_payload

    test = cohort.select(cohort.indices("test"))
    with tempfile.TemporaryDirectory(prefix="bd-method-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save(checkpoint_payload(result, cohort, params, seed, None), path)
        run = load_run(path, device="cpu")
    eval_params = EvaluationParams(missing_rates=list(rates), curve_rates=[], repeats=repeats, seed=0, bootstrap=0)
    _, predictions, summary = evaluate(run_predictor(run, test), list(test.patient_ids), test.labels,
                                       branch_thresholds(run), ["clinical"], eval_params,
                                       run_info(run, params.method, seed))
    return summary, predictions


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method on one cohort and evaluate it; a plain dict of figures comes back."""
    from bd.params import build
    from bd.mil.train import TrainParams, train_model

    start, cpu = time.perf_counter(), time.process_time()
    syn = cohort_of(job["regime"], job["seed"], job["patients"])
    params = build(TrainParams, {**TRAINING, **job.get("training", {}), "method": job["method"]})
    result = train_model(syn.cohort, params, job["seed"], "cpu", progress=False)
    summary, predictions = evaluate_like_bd(result, syn.cohort, params, job["seed"], job["rates"], job["repeats"])
    full = predictions[predictions["rate"] == 0.0]
    epoch = int(list(result.stage_epochs.values())[-1])
    out = {
        **{k: job[k] for k in ("regime", "seed", "method")}, "tag": job.get("tag", ""),
        "auc": {float(r.rate): 100 * float(r.auc_mean) for r in summary.itertuples()},
        "f1": {float(r.rate): 100 * float(r.f1_mean) for r in summary.itertuples()},
        "prob_sd": float(full.groupby("repeat")["prob"].std().mean()),
        "epoch": epoch, "stage_epochs": dict(result.stage_epochs), "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }
    if job["method"] == "bd":
        out["s2m_share"] = s2m_share(result.curve, epoch)
    return out


def reference_job(job: dict[str, Any]) -> dict[str, Any]:
    """The cohort's oracles and the simplest slide model: logistic regression on mean-pooled
    patches, standardised, its L2 strength chosen on the validation AUC (as the MILs' epochs are)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bd.evaluation.metrics import auc

    cpu = time.process_time()
    syn = cohort_of(job["regime"], job["seed"], job["patients"])
    c = syn.cohort
    offsets = c.offsets.numpy()
    feats = c.features.float().numpy()
    pooled = np.stack([feats[offsets[i] : offsets[i + 1]].mean(0) for i in range(c.n_patients)])
    tr, va, te = c.indices("train"), c.indices("val"), c.indices("test")
    fits = [make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(pooled[tr], c.labels[tr])
            for C in LR_C]
    best = max(fits, key=lambda m: auc(c.labels[va], m.decision_function(pooled[va])))
    return {**{k: job[k] for k in ("regime", "seed")}, "method": "reference",
            "mean_pool_lr_auc": 100 * auc(c.labels[te], best.decision_function(pooled[te])),
            "tumour_fraction_auc": 100 * syn.tumour_fraction_auc("test"),
            "clinical_oracle_auc": 100 * syn.clinical_auc("test"), "cpu_seconds": time.process_time() - cpu}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    return reference_job(job) if job["method"] == "reference" else train_job(job)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


# ---------------------------------------------------------------- reporting


def report(results: list[dict[str, Any]], regimes: Sequence[str], seeds: int, rates: Sequence[float]) -> None:
    """Every figure of the module docstring, from the finished jobs."""
    runs = [r for r in results if r["method"] not in ("reference",) and not r.get("tag")]
    refs = {(r["regime"], r["seed"]): r for r in results if r["method"] == "reference"}
    for regime in regimes:
        mine = [r for r in runs if r["regime"] == regime]
        by = {(r["method"], r["seed"]): r for r in mine}
        seed_list = sorted({r["seed"] for r in mine})
        methods = [m for m in METHODS if any(k[0] == m for k in by)]
        tf = [refs[(regime, s)]["tumour_fraction_auc"] for s in seed_list]
        emit(f"tumour_fraction_auc_{regime}", np.mean(tf), "AUC points", regime=regime)
        emit(f"clinical_oracle_auc_{regime}", np.mean([refs[(regime, s)]["clinical_oracle_auc"] for s in seed_list]),
             "AUC points", regime=regime, design=round(100 * REGIMES[regime].clinical_auc, 1))
        lr = [refs[(regime, s)]["mean_pool_lr_auc"] for s in seed_list]
        emit(f"mean_pool_lr_auc_{regime}", np.mean(lr), "AUC points", regime=regime)
        if "image_only" in methods:
            img = np.array([by[("image_only", s)]["auc"][0.0] for s in seed_list])
            emit(f"image_only_vs_tumour_fraction_auc_{regime}", np.mean(img / np.array(tf)), "ratio",
                 0.95 if regime == "independent" else None, "higher", regime=regime)
            emit(f"image_only_vs_mean_pool_lr_auc_{regime}", np.mean((img - np.array(lr)) / 100), "AUC",
                 -0.01, "higher", regime=regime)
        if "bd" in methods:
            emit(f"s2m_share_{regime}", np.mean([by[("bd", s)]["s2m_share"] for s in seed_list]), "fraction",
                 0.05, "higher", regime=regime)
        slide_methods = [m for m in methods if m != "clinical_only"]
        emit(f"min_test_prob_sd_{regime}", min(by[(m, s)]["prob_sd"] for m in slide_methods for s in seed_list),
             "probability", 0.05, "higher", regime=regime)
        for m in methods:
            emit(f"kept_epoch_{regime}_{m}", np.mean([by[(m, s)]["epoch"] for s in seed_list]), "epoch",
                 regime=regime, method=m)
            for rate in rates:
                for key in ("auc", "f1"):
                    vals = [by[(m, s)][key][rate] for s in seed_list]
                    emit(f"{key}_{regime}_{m}_{rate:g}", np.mean(vals), f"{key.upper()} points", regime=regime,
                         rate=rate, method=m, sd=round(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, 2),
                         paper=PAPER_AUC.get(m, {}).get(rate) if key == "auc" else None)
        for claim in CLAIMS:
            needed = {claim.a, claim.b, *([claim.c] if claim.c else [])}
            if not needed <= set(methods):
                continue
            for rate in [r for r in claim.rates if r in rates]:
                auc = {m: np.array([by[(m, s)]["auc"][rate] for s in seed_list]) for m in needed}
                mean, low, high = mean_ci(claim.differences(auc))
                emit(f"claim_{regime}_{claim.name}_{rate:g}", mean, "AUC points", None, None, regime=regime,
                     rate=rate, ci=[round(low, 2), round(high, 2)], verdict=verdict(low, high, claim.sign),
                     paper=claim.paper(rate), seeds=len(seed_list))
    paper = [r for r in results if r.get("tag") == "paper_optimiser"]
    for r in paper:
        emit("paper_optimiser_bd_test_auc", r["auc"][0.0], "AUC points", None, "higher", regime=r["regime"],
             seed=r["seed"], reference=round(next((x["auc"][0.0] for x in runs if x["regime"] == r["regime"]
                                                   and x["seed"] == r["seed"] and x["method"] == "bd"), math.nan), 2))
        emit("paper_optimiser_bd_kept_epoch", r["epoch"], "epoch", regime=r["regime"], seed=r["seed"],
             max_epochs=r.get("max_epochs"))
        emit("paper_optimiser_bd_test_prob_sd", r["prob_sd"], "probability", 0.05, "higher", regime=r["regime"])


LABELS = {"image_only": "image only", "clinical_only": "clinical only", "filling": "Filling", "ae": "AE",
          "ensemble": "Ensemble", "smil": "SMIL", "bd": "BD", "modality_dropout": "modality dropout"}
CLAIM_TEXT = {"bd_minus_filling": "BD - Filling", "bd_minus_image_only": "BD - image only",
              "filling_minus_image_only": "Filling - image only (paper: negative)",
              "ensemble_between_filling_and_bd": "Ensemble between Filling and BD (smaller margin)",
              "modality_dropout_minus_bd": "modality dropout - BD (not in the paper)",
              "modality_dropout_minus_filling": "modality dropout - Filling (not in the paper)"}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README's tables from the benchmark's JSON lines: test AUC per method, then the claims."""
    by = {r["metric"]: r for r in rows}
    regimes = [g for g in REGIMES if any(r.get("regime") == g for r in rows)]
    rates = sorted({r["rate"] for r in rows if r["metric"].startswith("auc_")})
    out = ["| Regime | Method | " + " | ".join(f"AUC at {r:g} %" for r in rates) + " | Paper (0 / 50 / 80 / 100 %) |",
           "|---|---|" + "---|" * len(rates) + "---|"]
    for g in regimes:
        for m in METHODS:
            cells = [by.get(f"auc_{g}_{m}_{r:g}") for r in rates]
            if not any(cells):
                continue
            text = [f"{c['value']:.1f} ± {c['sd']:.1f}" if c else "" for c in cells]
            paper = " / ".join(f"{PAPER_AUC[m][r]:.1f}" for r in RATES if r in PAPER_AUC.get(m, {})) or "-"
            out.append(f"| {g} | {LABELS[m]} | " + " | ".join(text) + f" | {paper} |")
    out += ["", "| Regime | Claim | Rate (%) | Mean paired difference [95 % CI] | Verdict | Paper |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        if r["metric"].startswith("claim_"):
            name = r["metric"][len(f"claim_{r['regime']}_"):].rsplit("_", 1)[0]
            lo, hi = r["ci"]
            ci = f"[{lo:+.1f}, {hi:+.1f}]" if lo is not None else "[-]"
            out.append(f"| {r['regime']} | {CLAIM_TEXT[name]} | {r['rate']:g} | {r['value']:+.1f} {ci} "
                       f"| {r['verdict']} | {'-' if r['paper'] is None else format(r['paper'], '+.1f')} |")
    return "\n".join(out)


def jobs_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every training job, longest first (so two workers finish together)."""
    base = {"patients": args.patients, "rates": list(args.rates), "repeats": args.repeats}
    jobs = [{**base, "regime": g, "seed": s, "method": m}
            for g in args.regimes for s in range(args.seeds) for m in args.methods]
    jobs += [{**base, "regime": g, "seed": s, "method": "reference"} for g in args.regimes for s in range(args.seeds)]
    if args.paper_optimiser_epochs:
        jobs.append({**base, "regime": args.regimes[0], "seed": 0, "method": "bd", "tag": "paper_optimiser",
                     "training": {**PAPER_OPTIMISER, "max_epochs": args.paper_optimiser_epochs}})
    return sorted(jobs, key=lambda j: (j.get("tag") != "paper_optimiser", j["seed"], ORDER.get(j["method"], 99)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=1058)
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--repeats", type=int, default=10, help="missing-data masks per rate")
    parser.add_argument("--training", type=json.loads, default={},
                        help='JSON overrides of the benchmark\'s training recipe, e.g. \'{"max_epochs": 5}\'')
    parser.add_argument("--paper-optimiser-epochs", type=int, default=40,
                        help="epochs for the paper-optimiser BD run (0: skip it)")
    parser.add_argument("--table", metavar="JSONL", default=None,
                        help="print the README's markdown tables from a saved run's output and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return
    TRAINING.update(args.training)
    start = time.perf_counter()
    jobs = jobs_for(args)
    emit("cpu", os.cpu_count() or 0, cpu_name())
    emit("workers", args.workers, "processes (1 torch thread each)", load_average=list(os.getloadavg()))
    emit("seeds", args.seeds, "seeds")
    emit("patients", args.patients, "patients")
    emit("training", 0, json.dumps(TRAINING, sort_keys=True))
    ctx = mp.get_context("fork")
    results = []
    with ctx.Pool(args.workers, initializer=_init_worker) as pool:
        for res in pool.imap_unordered(run_job, jobs):
            if res.get("tag") == "paper_optimiser":
                res["max_epochs"] = args.paper_optimiser_epochs
            results.append(res)
            shown = {k: v for k, v in res.items() if k in PROGRESS_KEYS}
            tag = f" {res['tag']}" if res.get("tag") else ""
            print(f"# {res['regime']} seed {res['seed']} {res['method']}{tag}: {json.dumps(shown)}",
                  file=sys.stderr, flush=True)
    report(results, args.regimes, args.seeds, args.rates)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results) / 60
    emit("cpu_minutes", cpu, "min (training jobs' CPU time, all workers)")
    emit("cpu_minutes_per_worker", cpu / args.workers, "min (the wall time on an otherwise idle machine)")
    emit("minutes", (time.perf_counter() - start) / 60, "min", 15, "lower", load_average=list(os.getloadavg()))


if __name__ == "__main__":
    main()
