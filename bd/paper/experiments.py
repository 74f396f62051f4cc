"""Named experiments: a method plus parameter overrides, expanded from the config.

The workflow trains and evaluates one job per experiment and seed; ``bd train`` gets the
``training`` section merged with the experiment's overrides. Names:

* a method name (``bd``, ``filling``, ... from ``training.methods``, and ``bd_wsi`` for
  Section III-E): the method with the training section as it is, run for ``training.seeds``;
* ``bd-dir-{none|m2s|s2m|both}`` (Table II), ``bd-prompt-{length}`` (Fig. 4c) and
  ``bd-lm-{lambda_m}-ls-{lambda_s}`` (Table III): BD variants, run for ``ablations.seeds``;
* ``filling-cx{N}`` (Fig. 5 b/c, ``ablations.clinical_expansions``): Filling whose clinical
  feature is N times the clinical input's width, run for ``ablations.seeds``.

The targets (``all``, ``ablations``, ``wsi_missing``, ``analysis``) are sets of experiments.
Light imports only: the Snakefile imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bd.methods import DIRECTIONS, list_methods
from bd.params import build, param

ABLATION_PREFIXES = ("bd-dir-", "bd-prompt-", "bd-lm-")
FIG5_PREFIX = "filling-cx"  # Fig. 5 b/c: Filling with the clinical feature N times the clinical input width
LIST = {"min_items": 1, "unique_items": True}  # a list given is never empty, nor lists a value twice


@dataclass
class AblationParams:
    """BD variants and analyses, one experiment each (targets ablations, analysis; bd/paper/experiments.py)"""

    directions: list[str] = param(default_factory=list, choices=DIRECTIONS, **LIST,
                                  description="Table II: distillation directions")
    prompt_lengths: list[int] = param(default_factory=list, minimum=1, **LIST, description="Fig. 4c: prompt lengths")
    clinical_expansions: list[int] = param(
        default_factory=list, minimum=1, **LIST,
        description="Fig. 5 b/c: Filling with the clinical feature N x the clinical input width (experiments filling-cx{N})")
    lambda_grid: list[tuple[float, float]] = param(default_factory=list, **LIST,
                                                   description="Table III: [lambda_m, lambda_s] pairs")
    seeds: list[int] = param(default_factory=lambda: [0], **LIST, description="seeds of the ablation runs")


def ablations(config: dict[str, Any]) -> AblationParams:
    """The config's ablations section, its defaults filled in."""
    return build(AblationParams, config.get("ablations"))


def _fmt(x: float) -> str:
    return f"{x:g}"


def experiments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """All experiments the config defines: ``name -> {"method": ..., **overrides}``."""
    training = config["training"]
    out: dict[str, dict[str, Any]] = {m: {"method": m} for m in training["methods"]}
    ab = ablations(config)
    for d in ab.directions:
        out[f"bd-dir-{d}"] = {"method": "bd", "directions": d}
    for length in ab.prompt_lengths:
        out[f"bd-prompt-{int(length)}"] = {"method": "bd", "prompt_length": int(length)}
    for lm, ls in ab.lambda_grid:
        out[f"bd-lm-{_fmt(lm)}-ls-{_fmt(ls)}"] = {"method": "bd", "lambda_m": float(lm), "lambda_s": float(ls)}
    for factor in ab.clinical_expansions:
        out[f"{FIG5_PREFIX}{int(factor)}"] = {"method": "filling", "clinical_expansion": int(factor)}
    # bd_wsi, and the methods the figure targets need (Fig. 4 a/b, Fig. 5 a): an experiment whatever
    # training.methods says, so that every target's runs are defined (the batch rules list them all).
    for method in [*list_methods(default=False), *list_methods(figure="wsi_missing"), *list_methods(figure="analysis")]:
        out.setdefault(method, {"method": method})
    return out


def target_experiments(config: dict[str, Any], target: str) -> list[str]:
    """Experiment names a workflow target needs."""
    names = experiments(config)
    if target == "all":
        return list(config["training"]["methods"])
    if target == "ablations":
        return [n for n in names if n.startswith(ABLATION_PREFIXES)]
    if target == "wsi_missing":
        return list_methods(figure="wsi_missing")  # Fig. 4 a/b: BD vs the base model and clinical only
    if target == "analysis":
        # Fig. 5 a: the single-modal model; b/c: the FIG5_PREFIX experiments
        return [*list_methods(figure="analysis"), *(n for n in names if n.startswith(FIG5_PREFIX))]
    raise KeyError(target)


def seeds_for(config: dict[str, Any], experiment: str) -> list[int]:
    """Methods (including ``bd_wsi``) use ``training.seeds``; ablation variants ``ablations.seeds``."""
    if not experiment.startswith((*ABLATION_PREFIXES, FIG5_PREFIX)):
        return list(config["training"]["seeds"])
    return list(ablations(config).seeds)
