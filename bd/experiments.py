"""Named experiments: a method plus parameter overrides, expanded from the config.

The workflow trains and evaluates one job per experiment and seed; the targets (``all``,
``ablations``, ``wsi_missing``, ``analysis``) are sets of experiments. Light imports only.
"""

from __future__ import annotations

from typing import Any


def _fmt(x: float) -> str:
    return f"{x:g}"


def experiments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """All experiments the config defines: ``name -> {"method": ..., **overrides}``."""
    training = config["training"]
    out: dict[str, dict[str, Any]] = {m: {"method": m} for m in training["methods"]}
    ab = config.get("ablations") or {}
    for d in ab.get("directions", []):
        out[f"bd-dir-{d}"] = {"method": "bd", "directions": d}
    for length in ab.get("prompt_lengths", []):
        out[f"bd-prompt-{length}"] = {"method": "bd", "prompt_length": int(length)}
    for lm, ls in ab.get("lambda_grid", []):
        out[f"bd-lm-{_fmt(lm)}-ls-{_fmt(ls)}"] = {"method": "bd", "lambda_m": float(lm), "lambda_s": float(ls)}
    out["bd_wsi"] = {"method": "bd_wsi"}
    return out


def target_experiments(config: dict[str, Any], target: str) -> list[str]:
    """Experiment names a workflow target needs."""
    names = experiments(config)
    if target == "all":
        return list(config["training"]["methods"])
    if target == "ablations":
        return [n for n in names if n.startswith(("bd-dir-", "bd-prompt-", "bd-lm-"))]
    if target == "wsi_missing":
        return ["bd_wsi", "filling", "clinical_only"]
    if target == "analysis":
        return ["image_only", "filling"]
    raise KeyError(target)


def seeds_for(config: dict[str, Any], experiment: str) -> list[int]:
    """Main methods use ``training.seeds``; ablation variants use ``ablations.seeds``."""
    if experiment in config["training"]["methods"]:
        return list(config["training"]["seeds"])
    return list((config.get("ablations") or {}).get("seeds", [0]))
