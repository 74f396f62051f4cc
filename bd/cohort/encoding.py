"""How each kind of clinical feature (numeric, binary, ordinal, categorical) is parsed, fitted on the
training split and encoded as model-input columns: the registry :data:`ENCODERS`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bd.cohort import values as V

log = logging.getLogger(__name__)


class ScalarEncoder:
    """One column per feature: parse to a number, impute, standardise with training statistics."""

    def __init__(self, parser: Callable[[Any], float | None]) -> None:
        self.parse = parser

    def fit(self, column: str, raw: Sequence[Any], parsed: Sequence[float | None], impute: str) -> dict[str, Any]:
        observed = np.array([v for v in parsed if v is not None], dtype=float)
        mean, std = float(observed.mean()), float(observed.std())
        if not std > 0:
            log.warning("column %r is constant (%g) in the training split; it is scaled by 1", column, mean)
            std = 1.0
        median = float(np.median(observed))
        return {"median": median, "mean": mean, "std": std, "fill": median if impute == "median" else mean}

    def columns(self, column: str, state: Mapping[str, Any]) -> list[str]:
        return [column]

    def encode(self, value: float | None, state: Mapping[str, Any]) -> list[float]:
        x = state["fill"] if value is None else value
        return [(x - state["mean"]) / state["std"]]


class OrdinalEncoder(ScalarEncoder):
    """A scalar whose text maps to integer ranks; the map of training values is recorded."""

    def fit(self, column: str, raw: Sequence[Any], parsed: Sequence[float | None], impute: str) -> dict[str, Any]:
        state = super().fit(column, raw, parsed, impute)
        levels = {V.clean_text(r): p for r, p in zip(raw, parsed, strict=True) if p is not None}
        return {**state, "levels": dict(sorted(levels.items(), key=lambda kv: (kv[1], kv[0])))}


class CategoricalEncoder:
    """One 0/1 column per training category; an unseen category is an error, not a zero row."""

    parse = staticmethod(V.parse_category)

    def fit(self, column: str, raw: Sequence[Any], parsed: Sequence[str | None], impute: str) -> dict[str, Any]:
        first: dict[str, str] = {}
        counts: dict[str, int] = {}
        for value in parsed:
            if value is not None:
                key = V.category_key(value)
                first.setdefault(key, value)
                counts[key] = counts.get(key, 0) + 1
        keys = sorted(first)
        mode = min(keys, key=lambda k: (-counts[k], k))  # most frequent, ties by name
        return {"categories": [first[k] for k in keys], "fill": first[mode] if impute == "median" else None}

    def columns(self, column: str, state: Mapping[str, Any]) -> list[str]:
        return [f"{column}={c}" for c in state["categories"]]

    def encode(self, value: str | None, state: Mapping[str, Any]) -> list[float]:
        out = [0.0] * len(state["categories"])
        value = state["fill"] if value is None else value
        if value is None:
            return out
        keys = [V.category_key(c) for c in state["categories"]]
        key = V.category_key(value)
        if key not in keys:
            raise V.ValueParseError(
                f"unknown category {value!r}: the training split has {state['categories']}; "
                "fix the value, or merge rare categories in the table"
            )
        out[keys.index(key)] = 1.0
        return out


ENCODERS: dict[str, ScalarEncoder | CategoricalEncoder] = {
    "numeric": ScalarEncoder(V.parse_number),
    "binary": ScalarEncoder(V.parse_binary),
    "ordinal": OrdinalEncoder(V.parse_ordinal),
    "categorical": CategoricalEncoder(),
}
