"""What every model of :mod:`bd.mil.models` shares: the conditions (which modality is present),
the FC + ReLU building blocks, the prompt, the :class:`MILModel` interface and the registry."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bd.mil.bags import Batch
from bd.errors import ConfigError
from bd.methods import DIRECTIONS  # noqa: F401  (re-exported: the models' directions, declared beside the methods)

from bd.mil.pooling import AttentionPool, mlp, model_pools

log = logging.getLogger(__name__)



Condition = tuple[bool, bool]  # (clinical present, slide present)
COMPLETE: Condition = (True, True)
NO_CLINICAL: Condition = (False, True)
NO_SLIDE: Condition = (True, False)
ALL_CONDITIONS: tuple[Condition, ...] = (COMPLETE, NO_CLINICAL, NO_SLIDE, (False, False))
CONDITION_NAMES = {COMPLETE: "complete", NO_CLINICAL: "no_clinical", NO_SLIDE: "no_slide", (False, False): "none"}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
MISSING_SUFFIX = "_missing"  # bd clinical's missing-indicator columns
PROJECTION_DIM = 64  # M_mul, M_sgl (Section III-A)
PROMPT_HIDDEN = (100, 50)  # the prompt mapping (Section III-A)
HEAD_HIDDEN = 64


# ---------------------------------------------------------------- building blocks


def classifier(in_dim: int) -> nn.Sequential:
    """``G``: one hidden FC + ReLU layer, then two-class logits."""
    return nn.Sequential(nn.Linear(in_dim, HEAD_HIDDEN), nn.ReLU(), nn.Linear(HEAD_HIDDEN, 2))


def clinical_encoder(clin_dim: int, out_dim: int) -> nn.Sequential:
    """``f_c``: the clinical vector through two FC + ReLU layers."""
    return mlp([clin_dim, max(2 * out_dim, 16), out_dim])




class Prompt(nn.Module):
    """The learnable prompt ``x_p`` (one vector of ``length``, shared by all patients), mapped by
    FC + ReLU layers of 100 and 50 units, then to ``out_dim``: ``f_p`` [B, out_dim]."""

    def __init__(self, length: int, out_dim: int):
        super().__init__()
        self.x = nn.Parameter(torch.randn(length))
        self.mapping = mlp([length, *PROMPT_HIDDEN, out_dim])

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.mapping(self.x.unsqueeze(0)).expand(batch_size, -1)


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    """Probability of N+ from two-class logits."""
    return torch.softmax(logits.float(), dim=1)[:, 1]


def pick(mask: torch.Tensor, on: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Per patient: ``on`` where ``mask`` else ``off`` (tensors [B] or [B, k])."""
    return torch.where(mask.view(-1, *([1] * (on.dim() - 1))), on, off)


def branch_names(mask: torch.Tensor, on: str, off: str) -> list[str]:
    return [on if m else off for m in mask.tolist()]


# ---------------------------------------------------------------- the model interface


@dataclass(frozen=True)
class Stage:
    """A training stage: which submodules it trains and which validation conditions pick its epoch."""

    name: str
    modules: tuple[str, ...]
    val_conditions: tuple[Condition, ...]


class MILModel(nn.Module):
    """Base class: a method of Table I (see the module docstring for the interface)."""

    method: ClassVar[str] = ""
    conditions: ClassVar[tuple[Condition, ...]] = (COMPLETE,)
    slide_pools: ClassVar[dict[str, str]] = {}  # branch name -> AttentionPool attribute

    def stages(self) -> list[Stage]:
        return [Stage("main", tuple(name for name, _ in self.named_children()), self.conditions)]

    def stage_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """Trainable parameters of ``stage``'s submodules (frozen ones, e.g. ``M_sgl``, left out)."""
        return [p for name in stage.modules for p in getattr(self, name).parameters() if p.requires_grad]

    def setup(self, train_clinical: torch.Tensor) -> None:
        """Fit what comes from the training data rather than from gradients (SMIL's priors)."""

    def fit_statistics(self, batches: Iterable[Batch]) -> None:
        """Fit running statistics on the training patients before the first step (BD's S->M
        teacher standardisation); ``batches`` cover the training patients once."""

    def loss_shares(self, means: dict[str, float]) -> dict[str, float]:
        """Each loss term's share of its branch's loss, from epoch means of ``losses`` (for curve.csv)."""
        return {}

    def set_clinical_columns(self, columns: list[str]) -> None:
        """What a model that fills absent clinical data (Filling, clinical only) feeds instead:
        zeros after scaling (the paper's zero vectors) in the value columns, and 1 ("missing") in
        the ``<feature>_missing`` indicator columns, which would otherwise read "present"."""
        fill = getattr(self, "clinical_fill", None)
        if isinstance(fill, torch.Tensor):
            fill.copy_(torch.tensor([1.0 if c.endswith(MISSING_SUFFIX) else 0.0 for c in columns]))

    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set every slide pooling's patch-feature standardisation (see :class:`AttentionPool`)."""
        for pool in model_pools(self):
            pool.feature_mean.copy_(mean)
            pool.feature_std.copy_(std)

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        raise NotImplementedError

    def attention_pool(self, branch: str | None = None) -> AttentionPool:
        """The attention pooling of ``branch`` (default: the first the model has)."""
        if not self.slide_pools:
            raise ConfigError(f"method '{self.method}' has no slide branch")
        name = branch or next(iter(self.slide_pools))
        if name not in self.slide_pools:
            have = ", ".join(self.slide_pools)
            raise ConfigError(f"method '{self.method}' has no slide branch '{name}' (has: {have})")
        return getattr(self, self.slide_pools[name])


MODELS: dict[str, type[MILModel]] = {}


def register(name: str) -> Callable[[type[MILModel]], type[MILModel]]:
    """Class decorator: make a model available to :func:`create_model` as ``name``."""

    def add(cls: type[MILModel]) -> type[MILModel]:
        cls.method = name
        MODELS[name] = cls
        return cls

    return add




def _dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ConfigError(f"training.precision: {precision!r} is not one of {list(PRECISIONS)}")
    return PRECISIONS[precision]
