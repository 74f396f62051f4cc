"""BD and the baselines of Table I, behind one registry: ``create_model(method, in_dim, clin_dim)``.

Building blocks (Section III-A: fully connected layers with ReLU):

* :class:`AttentionPool` -- eq. (1): patch features -> FC + ReLU instance embedding -> ``H`` (two
  hidden FC + ReLU layers, one score per patch) -> softmax over each bag's patches -> weighted
  sum: the slide feature. It works on packed bags (all patches of a batch in one tensor plus
  offsets): one matmul over every patch, and a padded segment softmax, never a loop over patches.
* :func:`clinical_encoder` -- the clinical MLP ``f_c``; :class:`Prompt` -- the learnable prompt
  ``x_p`` mapped by layers of 100 and 50 units to ``f_p``; :func:`classifier` -- ``G``.

Every model takes a :class:`bd.mil.bags.Batch` and provides ``losses(batch, stage)`` for training
(a dict whose ``"loss"`` is minimised), ``predict(batch) -> (prob, branch)`` for inference (the
branch that answered each patient), ``stages()`` (two-stage methods train their parts in turn,
each with its own early stopping) and ``conditions`` (the (clinical, slide) presence patterns the
method is meant for; validation and the decision threshold use them).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bd.mil.bags import Batch
from bd.errors import ConfigError
from bd.mil.losses import (
    classification_loss,
    feature_mse,
    multi_modal_loss,
    single_modal_loss,
    standardise,
    standardise_teacher,
)

log = logging.getLogger(__name__)

Condition = tuple[bool, bool]  # (clinical present, slide present)
COMPLETE: Condition = (True, True)
NO_CLINICAL: Condition = (False, True)
NO_SLIDE: Condition = (True, False)
ALL_CONDITIONS: tuple[Condition, ...] = (COMPLETE, NO_CLINICAL, NO_SLIDE, (False, False))
CONDITION_NAMES = {COMPLETE: "complete", NO_CLINICAL: "no_clinical", NO_SLIDE: "no_slide", (False, False): "none"}
DIRECTIONS = {"none": (False, False), "m2s": (True, False), "s2m": (False, True), "both": (True, True)}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
MISSING_SUFFIX = "_missing"  # bd clinical's missing-indicator columns
PROJECTION_DIM = 64  # M_mul, M_sgl (Section III-A)
PROMPT_HIDDEN = (100, 50)  # the prompt mapping (Section III-A)
HEAD_HIDDEN = 64


# ---------------------------------------------------------------- building blocks


def mlp(sizes: list[int]) -> nn.Sequential:
    """Fully connected layers, each followed by ReLU."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def classifier(in_dim: int) -> nn.Sequential:
    """``G``: one hidden FC + ReLU layer, then two-class logits."""
    return nn.Sequential(nn.Linear(in_dim, HEAD_HIDDEN), nn.ReLU(), nn.Linear(HEAD_HIDDEN, 2))


def clinical_encoder(clin_dim: int, out_dim: int) -> nn.Sequential:
    """``f_c``: the clinical vector through two FC + ReLU layers."""
    return mlp([clin_dim, max(2 * out_dim, 16), out_dim])


def segment_softmax_pool(
    scores: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``scores`` [n] within each bag, and the weighted sum of ``values`` [n, d] per
    bag: (pooled [B, d], weights [n]); an empty bag pools to zeros. On CPU each bag is pooled on
    its own slice of the packed tensors (the ops of a one-bag step, so the same values);
    elsewhere bags are padded to the longest one (only the small per-patch tensors, not the input
    features), one kernel per op."""
    lengths = offsets[1:] - offsets[:-1]
    n_bags, n = lengths.numel(), scores.numel()
    if n_bags == 1:
        weights = torch.softmax(scores, dim=0)
        return (weights @ values).unsqueeze(0) if n else values.new_zeros(1, values.shape[1]), weights
    if scores.device.type == "cpu":
        return _pool_bag_by_bag(scores, values, offsets.tolist())
    longest = int(lengths.max()) if n else 0
    if longest == 0:
        return values.new_zeros(n_bags, values.shape[1]), scores
    bag = torch.repeat_interleave(torch.arange(n_bags, device=scores.device), lengths)
    pos = torch.arange(n, device=scores.device) - offsets[bag]
    padded = scores.new_full((n_bags, longest), torch.finfo(scores.dtype).min)
    padded = padded.index_put((bag, pos), scores)
    mask = torch.arange(longest, device=scores.device)[None, :] < lengths[:, None]
    w_pad = torch.softmax(padded, dim=1) * mask
    v_pad = values.new_zeros(n_bags, longest, values.shape[1]).index_put((bag, pos), values)
    pooled = torch.bmm(w_pad.unsqueeze(1), v_pad).squeeze(1)
    return pooled, w_pad[bag, pos]


def _pool_bag_by_bag(scores: torch.Tensor, values: torch.Tensor,
                     offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_softmax_pool` as a loop over the bags' parts: no padded copies, which on a
    CPU cost more than the few small ops per bag. ``split``, not slicing: the backward of a
    split is one concatenation, that of B slices B full-size zero tensors."""
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    pooled, weights = [], []
    for s, v in zip(scores.split(lengths), values.split(lengths)):
        w = torch.softmax(s, dim=0)
        pooled.append(w @ v if len(s) else values.new_zeros(values.shape[1]))
        weights.append(w)
    return torch.stack(pooled), torch.cat(weights)


class AttentionPool(nn.Module):
    """Eq. (1): attention-MIL pooling of packed bags into slide features [B, dim].

    The instance embedding (the only layer that touches the D-dim patch features, hence nearly all
    the compute) runs in ``compute_dtype`` (bf16 by default: ~5x faster than fp32 on CPUs with
    AVX-512 BF16, and the usual choice on GPUs); everything after it is fp32.

    Patch features are standardised first, ``(x - feature_mean) / feature_std`` per dimension: the
    buffers are fitted on the training patients' patches by ``bd train``
    (:meth:`MILModel.standardise`) and saved with the model, so training, evaluation and
    ``bd predict`` apply the same transform (identity until fitted).
    """

    def __init__(self, in_dim: int, dim: int, compute_dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.embed = nn.Linear(in_dim, dim)
        self.score = nn.Sequential(*mlp([dim, max(dim // 2, 2), max(dim // 4, 1)]), nn.Linear(max(dim // 4, 1), 1))
        self.compute_dtype = compute_dtype
        self.dim = dim
        self.inputs_standardised = False  # set by standardised_inputs(): features come z-scored already
        self.pooled_cache: Any = None  # set by bd.mil.runs.PooledCache during evaluation

    def instances(self, features: torch.Tensor) -> torch.Tensor:
        """Instance embeddings [n, dim] (FC + ReLU), fp32."""
        dtype = self.compute_dtype
        if dtype is None:
            return F.relu(self.embed(self.standardised(features.float())))
        w, b = self.embed.weight.to(dtype), self.embed.bias.to(dtype)
        return F.relu(F.linear(self.standardised(features.to(dtype)), w, b).float())

    def standardised(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features z-scored with the training patches' statistics, in ``features``' dtype."""
        if self.inputs_standardised:
            return features
        dtype = features.dtype
        return (features - self.feature_mean.to(dtype)) * (1.0 / self.feature_std).to(dtype)

    def forward(self, features: torch.Tensor, offsets: torch.Tensor,
                instances: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slide features [B, dim], attention weights [n]); ``instances``: this pool's
        embeddings of ``features`` when already computed (see :func:`embed_instances`). Under a
        ``pooled_cache`` a batch whose bags are all cached returns their features and no weights."""
        cache = self.pooled_cache
        if cache is not None:
            hit = cache.lookup(self, offsets)
            if hit is not None:
                return hit, None
        h = self.instances(features) if instances is None else instances
        scores = self.score(h).squeeze(1)
        pooled, weights = segment_softmax_pool(scores, h, offsets)
        if cache is not None:
            cache.store(self, offsets, pooled)
        return pooled, weights


class _SharedInputLinear(torch.autograd.Function):
    """``x @ w_i.T + b_i`` for several layers on the same input, one GEMM forward and one for
    all weight gradients. An output that gets no gradient gives its layer none (not zeros), so a
    loss of one branch leaves the other branch's parameters untouched, as separate layers do."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype, *weights_biases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, biases = weights_biases[0::2], weights_biases[1::2]
        xd = x.to(dtype)
        y = F.linear(xd, torch.cat(weights).to(dtype), torch.cat(biases).to(dtype))
        ctx.save_for_backward(xd, *weights)
        ctx.sizes, ctx.dtype = [w.shape[0] for w in weights], dtype
        ctx.set_materialize_grads(False)
        return tuple(y.split(ctx.sizes, dim=1))  # column views: the ReLU after writes them out contiguous

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        xd, *weights = ctx.saved_tensors
        used = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * (2 + 2 * len(weights))
        if not used:
            return tuple(out)
        g = torch.cat([grads[i].to(ctx.dtype) for i in used], dim=1)
        g_w = (g.t() @ xd).split([ctx.sizes[i] for i in used])
        g_b = g.sum(0).split([ctx.sizes[i] for i in used])
        for k, i in enumerate(used):
            out[2 + 2 * i] = g_w[k].to(weights[i].dtype)
            out[3 + 2 * i] = g_b[k].to(weights[i].dtype)
        if ctx.needs_input_grad[0]:
            w_used = torch.cat([weights[i] for i in used]).to(ctx.dtype)
            out[0] = g @ w_used
        return tuple(out)


def embed_instances(pools: tuple[AttentionPool, ...], features: torch.Tensor) -> list[torch.Tensor]:
    """Each pool's instance embeddings of the same patches, in one matmul each way: the features
    are converted once and the GEMMs are ``len(pools)`` times wider, which a CPU runs closer to its
    peak (the patch layer is nearly all of a step's compute). Same values as ``pool.instances``."""
    dtypes = {pool.compute_dtype for pool in pools}
    first = pools[0]
    same_stats = all(torch.equal(p.feature_mean, first.feature_mean) and torch.equal(p.feature_std, first.feature_std)
                     for p in pools[1:])
    if any(pool.pooled_cache is not None for pool in pools):
        return [None] * len(pools)  # each pool computes what its cache lacks (bd.mil.runs.PooledCache)
    if len(pools) == 1 or len(dtypes) > 1 or not same_stats:
        return [pool.instances(features) for pool in pools]
    dtype = dtypes.pop() or torch.float32
    x = first.standardised(features.to(dtype))  # the pools share the training patches' statistics
    params = [t for pool in pools for t in (pool.embed.weight, pool.embed.bias)]
    return [F.relu(y).float() for y in _SharedInputLinear.apply(x, dtype, *params)]


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's patch layer computes in (fp32 unless all its pools use another):
    packing a step's bags straight into it saves one conversion pass over the features."""
    dtypes = {m.compute_dtype or torch.float32 for m in model.modules() if isinstance(m, AttentionPool)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def input_standardisation(model: nn.Module) -> tuple[torch.dtype, torch.Tensor, torch.Tensor] | None:
    """(dtype, mean, scale) with which every attention pool of ``model`` converts and z-scores
    its patch features, so that a batch can be packed already transformed (:mod:`bd.mil.packing`);
    None when the pools differ in either (each then does its own)."""
    pools = [m for m in model.modules() if isinstance(m, AttentionPool)]
    if not pools:
        return None
    first, dtypes = pools[0], {p.compute_dtype or torch.float32 for p in pools}
    same = all(torch.equal(p.feature_mean, first.feature_mean) and torch.equal(p.feature_std, first.feature_std)
               for p in pools[1:])
    if len(dtypes) > 1 or not same:
        return None
    dtype = dtypes.pop()
    return dtype, first.feature_mean.to(dtype), (1.0 / first.feature_std).to(dtype)


@contextlib.contextmanager
def standardised_inputs(model: nn.Module) -> Iterator[None]:
    """Within: ``model``'s attention pools take features that are already converted and z-scored
    (packed so by :class:`bd.mil.packing.Packer`) and skip that pass over the patches."""
    pools = [m for m in model.modules() if isinstance(m, AttentionPool)]
    before = [pool.inputs_standardised for pool in pools]
    for pool in pools:
        pool.inputs_standardised = True
    try:
        yield
    finally:
        for pool, was in zip(pools, before):
            pool.inputs_standardised = was


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
        for module in self.modules():
            if isinstance(module, AttentionPool):
                module.feature_mean.copy_(mean)
                module.feature_std.copy_(std)

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


def model_kwargs(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that the model class of ``method`` takes."""
    cls = model_class(method)
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in params.items() if k in accepted and k not in ("self", "in_dim", "clin_dim")}


def model_class(method: str) -> type[MILModel]:
    if method not in MODELS:
        raise ConfigError(f"training.method: unknown method '{method}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[method]


def create_model(method: str, in_dim: int, clin_dim: int, /, **params: Any) -> MILModel:
    """Build the model of ``method`` for ``in_dim``-d patch features and ``clin_dim`` clinical
    columns; ``params`` may hold any training parameter, each model takes the ones it knows."""
    return model_class(method)(in_dim, clin_dim, **model_kwargs(method, params))


def _dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ConfigError(f"training.precision: {precision!r} is not one of {list(PRECISIONS)}")
    return PRECISIONS[precision]


# ---------------------------------------------------------------- single-modality baselines


@register("image_only")
class ImageOnly(MILModel):
    """Attention-MIL on the slide alone (Table I, "image only")."""

    conditions = (NO_CLINICAL,)
    slide_pools = {"image": "pool_img"}

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, precision: str = "bf16"):
        super().__init__()
        self.pool_img = AttentionPool(in_dim, hidden_dim, _dtype(precision))
        self.head = classifier(hidden_dim)

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.head(self.pool_img(batch.features, batch.offsets)[0])

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        ce = classification_loss(self.logits(batch), batch.labels)
        return {"loss": ce, "ce": ce}

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        return probs_of(self.logits(batch)), ["image"] * batch.size


@register("clinical_only")
class ClinicalOnly(MILModel):
    """An MLP on the clinical vector alone (Table I, "clinical only"); zeros when it is absent."""

    conditions = (COMPLETE,)

    def __init__(self, in_dim: int, clin_dim: int, clinical_dim: int = 50):
        super().__init__()
        self.clin = clinical_encoder(clin_dim, clinical_dim)
        self.head = classifier(clinical_dim)
        self.register_buffer("clinical_fill", torch.zeros(clin_dim))

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.head(self.clin(filled_clinical(batch, self.clinical_fill)))

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        ce = classification_loss(self.logits(batch), batch.labels)
        return {"loss": ce, "ce": ce}

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        return probs_of(self.logits(batch)), branch_names(batch.clinical_present, "clinical", "filled")


# ---------------------------------------------------------------- fusion baselines


def filled_clinical(batch: Batch, fill: torch.Tensor) -> torch.Tensor:
    """The clinical vectors, with ``fill`` (see :meth:`MILModel.set_clinical_columns`) where absent."""
    return pick(batch.clinical_present, batch.clinical, fill.expand(batch.size, -1))


class Fusion(MILModel):
    """LNMP-style fusion: ``G([f_w, f_c])`` on the attention-pooled slide and the clinical MLP."""

    slide_pools = {"fusion": "pool"}

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 precision: str = "bf16"):
        super().__init__()
        self.pool = AttentionPool(in_dim, hidden_dim, _dtype(precision))
        self.clin = clinical_encoder(clin_dim, clinical_dim)
        self.head = classifier(hidden_dim + clinical_dim)

    def fuse(self, f_w: torch.Tensor, f_c: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([f_w, f_c], dim=1))

    def fusion_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        ce = classification_loss(self.fuse(f_w, self.clin(batch.clinical)), batch.labels)
        return {"loss": ce, "ce": ce}


@register("filling")
class Filling(Fusion):
    """Fusion trained on complete data; missing clinical data is filled at test time with zeros
    after scaling (the paper's zero vectors), its missing indicators set to 1; a missing slide is
    an empty bag (pooled to zeros). Each filled input answers as its own branch ("filled",
    "slide_filled") with its own validation threshold."""

    conditions = (COMPLETE,)

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 precision: str = "bf16"):
        super().__init__(in_dim, clin_dim, hidden_dim, clinical_dim, precision)
        self.register_buffer("clinical_fill", torch.zeros(clin_dim))

    def stages(self) -> list[Stage]:
        return [Stage("fusion", ("pool", "clin", "head"), (COMPLETE,))]

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        return self.fusion_losses(batch)

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        probs = probs_of(self.fuse(f_w, self.clin(filled_clinical(batch, self.clinical_fill))))
        names = ["fusion" if c and s else "filled" if not c else "slide_filled"
                 for c, s in zip(batch.clinical_present.tolist(), batch.slide_present.tolist())]
        return probs, names


@register("ae")
class AutoEncoder(Fusion):
    """Two stages: the fusion model, then (fusion frozen) an autoencoder from the slide feature to
    the clinical feature ``f_c``, which stands in for ``f_c`` when clinical data is missing."""

    conditions = (COMPLETE, NO_CLINICAL)

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 precision: str = "bf16"):
        super().__init__(in_dim, clin_dim, hidden_dim, clinical_dim, precision)
        code = max(clinical_dim // 2, 4)
        self.autoencoder = nn.Sequential(*mlp([hidden_dim, 2 * code, code, 2 * code]),
                                         nn.Linear(2 * code, clinical_dim))

    def stages(self) -> list[Stage]:
        return [Stage("fusion", ("pool", "clin", "head"), (COMPLETE,)),
                Stage("autoencoder", ("autoencoder",), (NO_CLINICAL,))]

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        if stage == "fusion":
            return self.fusion_losses(batch)
        with torch.no_grad():
            f_w = self.pool(batch.features, batch.offsets)[0]
            f_c = self.clin(batch.clinical)
        mse = feature_mse(self.autoencoder(f_w), f_c)
        return {"loss": mse, "ae_mse": mse}

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        f_c = pick(batch.clinical_present, self.clin(batch.clinical), self.autoencoder(f_w))
        return probs_of(self.fuse(f_w, f_c)), branch_names(batch.clinical_present, "fusion", "ae")


@register("modality_dropout")
class ModalityDropout(Fusion):
    """The fusion model trained with the clinical input dropped at random (modality dropout).

    During training each bag's clinical feature ``f_c`` is replaced, with probability
    ``modality_dropout_rate`` (drawn per bag from torch's generator, which ``bd train`` seeds), by
    a learned "missing" token: a ``clinical_dim`` vector trained with the rest, not zeros. A
    patient without clinical data always gets the token. At test time a patient without clinical
    data is answered through the token ("token" branch), one with it as by the fusion model."""

    conditions = (COMPLETE, NO_CLINICAL)

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 precision: str = "bf16", modality_dropout_rate: float = 0.5):
        super().__init__(in_dim, clin_dim, hidden_dim, clinical_dim, precision)
        if not 0 <= modality_dropout_rate < 1:
            raise ConfigError(f"training.modality_dropout_rate: {modality_dropout_rate} must be in [0, 1)")
        self.rate = float(modality_dropout_rate)
        # a module, so that training stages (lists of submodules) train it with the rest
        self.missing = nn.ParameterDict({"token": nn.Parameter(0.1 * torch.randn(clinical_dim))})

    @property
    def missing_token(self) -> nn.Parameter:
        """The learned "missing" clinical feature."""
        return self.missing["token"]

    def drop_mask(self, batch: Batch) -> torch.Tensor:
        """Bags whose clinical feature is the token in this training step: drawn, or absent."""
        drawn = torch.rand(batch.size, device=batch.clinical_present.device) < self.rate
        return drawn | ~batch.clinical_present

    def clinical_feature(self, batch: Batch, use_token: torch.Tensor) -> torch.Tensor:
        """``f_c``, with the missing token for the bags of ``use_token``."""
        return pick(~use_token, self.clin(batch.clinical), self.missing_token.expand(batch.size, -1))

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        ce = classification_loss(self.fuse(f_w, self.clinical_feature(batch, self.drop_mask(batch))), batch.labels)
        return {"loss": ce, "ce": ce}

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        probs = probs_of(self.fuse(f_w, self.clinical_feature(batch, ~batch.clinical_present)))
        return probs, branch_names(batch.clinical_present, "fusion", "token")


@register("ensemble")
class Ensemble(MILModel):
    """Two separate networks (slide, clinical), trained in turn; their N+ probabilities are
    averaged, and the slide network answers alone when clinical data is missing."""

    conditions = (COMPLETE, NO_CLINICAL)
    slide_pools = {"image": "pool_img"}

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 precision: str = "bf16"):
        super().__init__()
        self.pool_img = AttentionPool(in_dim, hidden_dim, _dtype(precision))
        self.head_img = classifier(hidden_dim)
        self.clin = clinical_encoder(clin_dim, clinical_dim)
        self.head_clin = classifier(clinical_dim)

    def stages(self) -> list[Stage]:
        return [Stage("image", ("pool_img", "head_img"), (NO_CLINICAL,)),
                Stage("clinical", ("clin", "head_clin"), (COMPLETE,))]

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        if stage == "image":
            logits = self.head_img(self.pool_img(batch.features, batch.offsets)[0])
        else:
            logits = self.head_clin(self.clin(batch.clinical))
        ce = classification_loss(logits, batch.labels)
        return {"loss": ce, "ce": ce}

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        p_img = probs_of(self.head_img(self.pool_img(batch.features, batch.offsets)[0]))
        p_clin = probs_of(self.head_clin(self.clin(batch.clinical)))
        probs = pick(batch.clinical_present, (p_img + p_clin) / 2, p_img)
        return probs, branch_names(batch.clinical_present, "ensemble", "image")


@register("smil")
class SMIL(Fusion):
    """A compact SMIL (Ma et al., AAAI 2021) on the fusion model.

    * Reconstruction: the clinical vector of a patient is rebuilt as a weighted sum of ``priors``
      k-means centres of the training clinical vectors, the weights predicted from the slide
      feature (``recon``); it replaces the clinical vector when that is missing.
    * Feature regularisation: ``regulariser`` predicts a per-dimension noise scale from the fused
      feature; training perturbs the reconstructed-path feature with that Gaussian noise.
    * Meta-learning: an inner SGD step (learning rate ``inner_lr``) of the fusion head and the
      clinical MLP on the reconstructed, perturbed path; the outer loss is the classification loss
      of the *updated* head on the complete (true clinical) path, back-propagated through the
      inner step into the reconstruction and regularisation networks and the shared slide
      encoder. Plus the plain complete-path loss and a reconstruction loss.
    """

    conditions = (COMPLETE, NO_CLINICAL)
    inner_modules = ("clin", "head")

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 precision: str = "bf16", smil_priors: int = 8, inner_lr: float = 0.1):
        super().__init__(in_dim, clin_dim, hidden_dim, clinical_dim, precision)
        self.recon = nn.Linear(hidden_dim, smil_priors)
        self.regulariser = nn.Sequential(nn.Linear(hidden_dim + clinical_dim, hidden_dim + clinical_dim), nn.Softplus())
        self.register_buffer("priors", torch.zeros(smil_priors, clin_dim))
        self.inner_lr = inner_lr

    def setup(self, train_clinical: torch.Tensor) -> None:
        """k-means priors of the training clinical vectors (fewer if there are fewer distinct rows)."""
        from sklearn.cluster import KMeans

        x = train_clinical.detach().cpu().numpy().astype(np.float64)
        k = min(self.priors.shape[0], len(np.unique(x, axis=0)))
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        centres = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x).cluster_centers_
        priors = np.repeat(centres, int(np.ceil(self.priors.shape[0] / k)), axis=0)[: self.priors.shape[0]]
        self.priors.copy_(torch.as_tensor(priors, dtype=torch.float32))

    def reconstruct(self, f_w: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.recon(f_w), dim=1) @ self.priors

    def _fused(self, params: dict[str, torch.Tensor], f_w: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        f_c = functional_call(self.clin, _sub(params, "clin"), (x_c,))
        return torch.cat([f_w, f_c], dim=1)

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        params = {n: p for n, p in self.named_parameters() if n.split(".")[0] in self.inner_modules}
        x_hat = self.reconstruct(f_w)
        z_rec = self._fused(params, f_w, x_hat)
        z_rec = z_rec + self.regulariser(z_rec) * torch.randn_like(z_rec)
        inner = classification_loss(functional_call(self.head, _sub(params, "head"), (z_rec,)), batch.labels)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        updated = {n: p - self.inner_lr * g for (n, p), g in zip(params.items(), grads)}
        z_full = self._fused(params, f_w, batch.clinical)
        full = classification_loss(functional_call(self.head, _sub(params, "head"), (z_full,)), batch.labels)
        z_full_new = self._fused(updated, f_w, batch.clinical)
        meta = classification_loss(functional_call(self.head, _sub(updated, "head"), (z_full_new,)), batch.labels)
        recon = feature_mse(x_hat, batch.clinical)
        return {"loss": full + meta + recon, "ce": full, "meta_ce": meta, "inner_ce": inner, "recon_mse": recon}

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        f_w = self.pool(batch.features, batch.offsets)[0]
        x_c = pick(batch.clinical_present, batch.clinical, self.reconstruct(f_w))
        return probs_of(self.fuse(f_w, self.clin(x_c))), branch_names(batch.clinical_present, "fusion", "smil")


def _sub(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Parameters under ``prefix.`` with the prefix removed (for ``functional_call`` on a child)."""
    return {n[len(prefix) + 1 :]: p for n, p in params.items() if n.startswith(prefix + ".")}


# ---------------------------------------------------------------- bidirectional distillation


@register("bd")
class BidirectionalDistillation(MILModel):
    """BD (Section II): a multi-modal and a single-modal branch trained together.

    Multi-modal: ``H_mul`` -> ``f_wm``; clinical MLP -> ``f_c``; ``G_mul([f_wm, f_c])``.
    Single-modal: ``H_sgl`` -> ``f_ws``; prompt -> ``f_p`` (same size as ``f_c``);
    ``G_sgl([f_ws, f_p])``. ``M_mul``, ``M_sgl``: the paper's projection modules, one FC layer each
    to 64-d (eq. 3). ``M_sgl`` belongs to the single-modal branch, whose loss (eq. 6) does not
    contain it, and eq. (4) trains the multi-modal branch only: under the paper's gradient routing
    it receives no gradient and stays at its initialisation, a fixed projection of ``f_ws``
    (training it on eq. 3 would let the teacher move toward the student, or both collapse).
    Its output is standardised per dimension with running statistics (``teacher_mean``,
    ``teacher_var``, fitted on the training patients before the first step and then tracked with
    momentum ``1 - 0.99^batch``); ``M_mul``'s output likewise (``student_mean``, ``student_var``),
    so S->M is ``MSE(z(M_mul(f_wm)), z(M_sgl(f_ws)))``: neither shrinking nor a drifting mean
    helps, a constant student scores 1 per dimension, and the term only falls as ``f_wm`` comes to
    carry ``f_ws``'s patient-to-patient variation.
    ``directions`` switches S->M (eq. 3 in eq. 4) and M->S (eq. 5 in eq. 6) on or off (Table II).
    Test: clinical data present -> multi-modal branch, absent -> single-modal branch.
    """

    conditions = (COMPLETE, NO_CLINICAL)
    slide_pools = {"multi": "pool_mul", "single": "pool_sgl"}
    missing = "clinical"  # the modality the single-modal branch does without

    def __init__(self, in_dim: int, clin_dim: int, hidden_dim: int = 128, clinical_dim: int = 50,
                 prompt_length: int = 50, tau: float = 1.2, lambda_m: float = 0.6, lambda_s: float = 0.5,
                 directions: str = "both", precision: str = "bf16"):
        super().__init__()
        if directions not in DIRECTIONS:
            raise ConfigError(f"training.directions: {directions!r} is not one of {list(DIRECTIONS)}")
        self.m2s, self.s2m = DIRECTIONS[directions]
        self.tau, self.lambda_m, self.lambda_s = tau, lambda_m, lambda_s
        dtype = _dtype(precision)
        kept_dim = hidden_dim if self.missing == "clinical" else clinical_dim
        # multi-modal branch
        self.pool_mul = AttentionPool(in_dim, hidden_dim, dtype)
        self.clin_mul = clinical_encoder(clin_dim, clinical_dim)
        self.head_mul = classifier(hidden_dim + clinical_dim)
        self.proj_mul = nn.Linear(kept_dim, PROJECTION_DIM)
        # single-modal branch: its own encoder for the kept modality, the prompt for the other
        if self.missing == "clinical":
            self.pool_sgl = AttentionPool(in_dim, hidden_dim, dtype)
            self.prompt = Prompt(prompt_length, clinical_dim)
        else:
            self.clin_sgl = clinical_encoder(clin_dim, clinical_dim)
            self.prompt = Prompt(prompt_length, hidden_dim)
        self.head_sgl = classifier(hidden_dim + clinical_dim)
        self.proj_sgl = nn.Linear(kept_dim, PROJECTION_DIM).requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(PROJECTION_DIM))
        self.register_buffer("teacher_var", torch.ones(PROJECTION_DIM))
        self.register_buffer("student_mean", torch.zeros(PROJECTION_DIM))
        self.register_buffer("student_var", torch.ones(PROJECTION_DIM))

    MULTI = ("pool_mul", "clin_mul", "head_mul", "proj_mul")

    def single_modules(self) -> tuple[str, ...]:
        kept = "pool_sgl" if self.missing == "clinical" else "clin_sgl"
        return (kept, "prompt", "head_sgl")

    def stages(self) -> list[Stage]:
        return [Stage("joint", (*self.MULTI, *self.single_modules()), self.conditions)]

    def branches(self, batch: Batch, single: bool = True) -> dict[str, torch.Tensor]:
        """Both branches' features and logits (``single=False``: the multi-modal branch only)."""
        both = single and self.missing == "clinical"  # both slide encoders: one fused patch matmul
        h_mul, h_sgl = embed_instances((self.pool_mul, self.pool_sgl), batch.features) if both else (None, None)
        f_wm = self.pool_mul(batch.features, batch.offsets, h_mul)[0]
        f_c = self.clin_mul(batch.clinical)
        out = {"f_wm": f_wm, "f_c": f_c, "logits_mul": self.head_mul(torch.cat([f_wm, f_c], 1))}
        if single:
            out.update(self.single_branch(batch, h_sgl))
        return out

    def single_branch(self, batch: Batch, instances: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f_p = self.prompt(batch.size)
        if self.missing == "clinical":
            f_ws = self.pool_sgl(batch.features, batch.offsets, instances)[0]
            return {"kept_sgl": f_ws, "f_p": f_p, "logits_sgl": self.head_sgl(torch.cat([f_ws, f_p], 1))}
        f_cs = self.clin_sgl(batch.clinical)
        return {"kept_sgl": f_cs, "f_p": f_p, "logits_sgl": self.head_sgl(torch.cat([f_p, f_cs], 1))}

    @torch.no_grad()
    def fit_statistics(self, batches: Iterable[Batch]) -> None:
        """Per-dimension mean and variance of both S->M projections over the training patients."""
        teacher, student = [], []
        for batch in batches:
            out = self.branches(batch)
            teacher.append(self.proj_sgl(out["kept_sgl"]).float())
            student.append(self.proj_mul(out["f_wm"] if self.missing == "clinical" else out["f_c"]).float())
        for values, mean, var in ((torch.cat(teacher), self.teacher_mean, self.teacher_var),
                                  (torch.cat(student), self.student_mean, self.student_var)):
            mean.copy_(values.mean(0))
            var.copy_(values.var(0, unbiased=False) if len(values) > 1 else torch.ones_like(var))

    def _momentum(self, n: int) -> float | None:
        return 1 - 0.99**n if self.training and self.s2m else None

    def teacher(self, kept_sgl: torch.Tensor) -> torch.Tensor:
        """The standardised S->M target ``z(M_sgl(f_ws))``; training steps update the statistics."""
        return standardise_teacher(self.proj_sgl(kept_sgl), self.teacher_mean, self.teacher_var,
                                   self._momentum(kept_sgl.shape[0]))

    def student(self, kept_mul: torch.Tensor) -> torch.Tensor:
        """The standardised S->M student ``z(M_mul(f_wm))`` (gradients reach ``M_mul`` and ``f_wm``)."""
        return standardise(self.proj_mul(kept_mul), self.student_mean, self.student_var,
                           self._momentum(kept_mul.shape[0]))

    def losses(self, batch: Batch, stage: str) -> dict[str, torch.Tensor]:
        out = self.branches(batch)
        kept_mul, missing_mul = (out["f_wm"], out["f_c"]) if self.missing == "clinical" else (out["f_c"], out["f_wm"])
        mul = multi_modal_loss(
            out["logits_mul"], batch.labels, self.student(kept_mul), self.teacher(out["kept_sgl"]),
            self.lambda_m if self.s2m else 0.0,
        )
        sgl = single_modal_loss(
            out["logits_sgl"], batch.labels, kept=out["kept_sgl"], prompt=out["f_p"], teacher_kept=kept_mul,
            teacher_missing=missing_mul, teacher_logits=out["logits_mul"], classifier=self.head_sgl,
            lambda_s=self.lambda_s if self.m2s else 0.0, tau=self.tau, prompt_first=self.missing == "slide",
        )
        return {"loss": mul["mul"] + sgl["sgl"], **mul, **sgl}

    def loss_shares(self, means: dict[str, float]) -> dict[str, float]:
        """Shares of L_mul (CE, lambda_m * S->M) and of L_sgl (CE, lambda_s * MSE, lambda_s * KL)."""
        lm, ls = (self.lambda_m if self.s2m else 0.0), (self.lambda_s if self.m2s else 0.0)
        parts = {"mul": {"mul_ce": 1.0, "mul_distill": lm}, "sgl": {"sgl_ce": 1.0, "sgl_mse": ls, "sgl_kl": ls}}
        out = {}
        for branch, terms in parts.items():
            total = sum(w * means[k] for k, w in terms.items())
            for key, weight in terms.items():
                out[f"share_{key}"] = weight * means[key] / total if total > 0 else float("nan")
        return out

    def present(self, batch: Batch) -> torch.Tensor:
        """Patients whose possibly-missing modality is there: they go to the multi-modal branch."""
        return batch.clinical_present if self.missing == "clinical" else batch.slide_present

    def predict(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        present = self.present(batch)
        out = self.branches(batch, single=not bool(present.all()))
        p_mul = probs_of(out["logits_mul"])
        p_sgl = probs_of(out["logits_sgl"]) if "logits_sgl" in out else p_mul
        return pick(present, p_mul, p_sgl), branch_names(present, "multi", "single")


@register("bd_wsi")
class BidirectionalDistillationSlideMissing(BidirectionalDistillation):
    """Section III-E: BD with the slide as the missing modality. The single-modal branch has no
    image encoder: its own clinical MLP, and the prompt mapped to the slide feature's place.
    Test: slide present -> multi-modal branch, absent -> clinical + prompt branch."""

    conditions = (COMPLETE, NO_SLIDE)
    slide_pools = {"multi": "pool_mul"}
    missing = "slide"

