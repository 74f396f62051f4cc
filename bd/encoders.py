"""Patch encoders: any timm model by name, optionally truncated after a stage, with weights from a
local file (compute nodes are often offline) or, only when asked, random weights.

The default in WSI work is ResNet50 truncated after ``layer3`` with global average pooling
(1024-d). ``out_stage`` names a module of the model's ``feature_info`` (``layer3``, ``stages.2``,
``blocks.8``...); ``None`` keeps the whole network and its own pooled features. Later stages and
the classifier are pruned, so their weights are neither needed nor computed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bd.errors import ConfigError
from bd.io import file_sha256

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random weights are seeded, so a rerun gives the same features


class Encoder(nn.Module):
    """A timm backbone returning one pooled vector per image: (B, 3, H, W) -> (B, feature_dim)."""

    def __init__(
        self, model: nn.Module, stage_index: int | None, feature_dim: int, weights_id: str
    ) -> None:
        super().__init__()
        self.model = model
        self.stage_index = stage_index
        self.feature_dim = feature_dim
        self.weights_id = weights_id  # SHA-256 of the weights file, or "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage_index is None:
            return self.model(x)  # timm model with num_classes=0: pooled pre-logits features
        (fmap,) = self.model.forward_intermediates(
            x, indices=[self.stage_index], intermediates_only=True
        )
        return fmap.mean(dim=(2, 3))  # global average pooling


def _stage_index(model: nn.Module, name: str, out_stage: str) -> int:
    stages = [info["module"] for info in model.feature_info]  # type: ignore[attr-defined]
    if out_stage not in stages:
        raise ConfigError(
            f"features.out_stage: {out_stage!r} is not a stage of {name} "
            f"(stages: {', '.join(stages)}; or null for the full model)"
        )
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"features.out_stage: timm model {name} cannot be truncated; set out_stage: null"
        )
    return stages.index(out_stage)


def _load_weights(model: nn.Module, path: Path, full_keys: set[str], classifier: str) -> None:
    """Load ``path`` into ``model``: every kept parameter must be there (strict on kept layers);
    extra keys are accepted only for pruned stages and the classifier."""
    import timm.models

    if not path.is_file():
        raise ConfigError(f"features.weights: file {path} does not exist")
    try:
        state = timm.models.load_state_dict(str(path), device="cpu")
    except Exception as exc:  # pickle, zip and safetensors errors
        raise ConfigError(f"features.weights: cannot read {path} as a checkpoint ({exc})") from exc
    own = set(model.state_dict())
    missing = sorted(own - set(state))
    foreign = sorted(
        k for k in set(state) - own if k not in full_keys and not k.startswith(classifier + ".")
    )
    if missing or foreign:
        what = f"missing {missing[:5]}" if missing else f"unexpected {foreign[:5]}"
        raise ConfigError(
            f"features.weights: {path} does not match the encoder ({what}); "
            "check features.encoder and features.out_stage"
        )
    try:
        model.load_state_dict({k: state[k] for k in own}, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"features.weights: {path} does not fit the encoder: {exc}") from exc


def create_encoder(
    name: str,
    out_stage: str | None = "layer3",
    weights: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
) -> tuple[Encoder, dict[str, Any]]:
    """Build encoder ``name`` (timm) in eval mode and its pretrained data config (mean, std...).

    ``encoder.weights_id`` is the weights file's SHA-256, or ``"random"``."""
    import timm
    import timm.data

    if weights is None and not random_weights:
        raise ConfigError(
            "features.weights: no weights file given; name a local checkpoint "
            "(features.weights) or set features.random_weights: true (demo only)"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model"
        raise ConfigError(f"features.encoder: {exc}") from exc
    data_config = timm.data.resolve_data_config({}, model=model)
    full_keys = set(model.state_dict())
    classifier = str(model.pretrained_cfg.get("classifier") or "fc")
    stage_index, dim = None, int(model.num_features)
    if out_stage is not None:
        stage_index = _stage_index(model, name, out_stage)
        dim = int(model.feature_info[stage_index]["num_chs"])  # type: ignore[index]
        model.prune_intermediate_layers([stage_index], prune_norm=True, prune_head=True)
    if weights is not None:
        _load_weights(model, Path(weights), full_keys, classifier)
        weights_id = file_sha256(weights)
    else:
        log.warning("features: encoder %s has RANDOM weights (demo only, seed %d)", name, RANDOM_SEED)
        weights_id = "random"
    return Encoder(model, stage_index, dim, weights_id).eval(), data_config
