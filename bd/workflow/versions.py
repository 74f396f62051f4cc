"""Stage versions (config section ``versions``): a params entry of each stage's rules, so that
raising one reruns that stage, and everything after it, on purpose (after changing its code).
Light imports only: the Snakefile imports this module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bd.params import param


def _version(command: str) -> Any:
    return param(1, minimum=1, description=f"raise to rerun bd {command} and everything after it")


@dataclass
class VersionParams:
    """stage versions; raising one reruns that stage and everything after it"""

    demo: int = _version("demo")
    segment: int = _version("segment")
    tile: int = _version("tile")
    extract: int = _version("extract")
    split: int = _version("split")
    clinical: int = _version("clinical")
    train: int = _version("train")
    evaluate: int = _version("evaluate")
