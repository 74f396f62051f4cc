"""Where torch work runs: one rule for every stage's ``device`` setting."""

from __future__ import annotations

import torch

from bd.errors import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without one is a ConfigError
    naming the config ``key`` (e.g. ``features.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' asked for, but no CUDA device is available")
    return torch.device(name)
