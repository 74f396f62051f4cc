"""Attention pooling over packed bags (eq. 1): the instance embedding, the segment softmax,
several pools on the same patches at once (a few bags at a time on a CPU,
:mod:`bd.mil.bagwise`), and the patch-feature standardisation they share."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bd.mil.bagwise import bagwise_pools, stackable
from bd.mil.kernels import _SharedInputLinearReLU


log = logging.getLogger(__name__)

# Largest |mean| / std of a feature dimension for which a CPU fp32 patch layer absorbs the
# z-scoring (AttentionPool.folded_standardisation): it then computes on the raw features, whose
# products carry up to log2 of that ratio more rounding than the z-scored ones'; at 256 at least
# 16 of fp32's 24 bits stay, more than bf16 has at all.
FOLD_MAX_RATIO = 256.0


def mlp(sizes: list[int]) -> nn.Sequential:
    """Fully connected layers, each followed by ReLU."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)



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
        return _pool_bag_by_bag(scores, values, lengths.tolist())
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
                     lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_softmax_pool` as a loop over the bags' parts: no padded copies, which on a
    CPU cost more than the few small ops per bag. ``split``, not slicing: the backward of a
    split is one concatenation, that of B slices B full-size zero tensors."""
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
        """Instance embeddings [n, dim] (FC + ReLU), fp32: the fused patch layer of one pool."""
        dtype = self.compute_dtype or torch.float32
        x = self.standardised(features.to(dtype))
        return _SharedInputLinearReLU.apply(x, dtype, self.embed.weight, self.embed.bias)[0]

    def standardised(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features z-scored with the training patches' statistics, in ``features``' dtype."""
        if self.inputs_standardised:
            return features
        dtype = features.dtype
        return (features - self.feature_mean.to(dtype)) * (1.0 / self.feature_std).to(dtype)

    def folded_standardisation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, scale) for the CPU patch layer to fold into its weights (:mod:`bd.mil.bagwise`),
        so the features need no z-scoring pass of their own; None when they come z-scored
        already, the layer computes in another dtype than fp32, or a mean lies beyond
        :data:`FOLD_MAX_RATIO` standard deviations."""
        if self.inputs_standardised or (self.compute_dtype or torch.float32) != torch.float32:
            return None
        scale = 1.0 / self.feature_std
        if self.feature_mean.numel() and float((self.feature_mean.abs() * scale).max()) > FOLD_MAX_RATIO:
            return None
        return self.feature_mean, scale

    def forward(self, features: torch.Tensor, offsets: torch.Tensor,
                instances: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slide features [B, dim], attention weights [n]); ``instances``: this pool's
        embeddings of ``features`` when already computed (see :func:`attention_pools`). On a
        CPU, without them, the pool runs a few bags at a time (:mod:`bd.mil.bagwise`). Under a
        ``pooled_cache`` a batch whose bags are all cached returns their features and no weights."""
        cache = self.pooled_cache
        if cache is not None:
            hit = cache.lookup(self, offsets)
            if hit is not None:
                return hit, None
        if instances is None and features.device.type == "cpu":
            pooled, weights = _bagwise([self], features, offsets)[0]
        else:
            h = self.instances(features) if instances is None else instances
            pooled, weights = segment_softmax_pool(self.score(h).squeeze(1), h, offsets)
        if cache is not None:
            cache.store(self, offsets, pooled)
        return pooled, weights


def _lengths(offsets: torch.Tensor) -> list[int]:
    return (offsets[1:] - offsets[:-1]).tolist()


def _bagwise(pools: Sequence[AttentionPool], features: torch.Tensor,
             offsets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`bd.mil.bagwise.bagwise_pools` of pools that share their dtype and statistics, the
    z-scoring folded into the patch layer where it can be (:meth:`AttentionPool.folded_standardisation`)."""
    dtype = pools[0].compute_dtype or torch.float32
    x = features.to(dtype)
    fold = pools[0].folded_standardisation()
    return bagwise_pools(pools, x if fold else pools[0].standardised(x), _lengths(offsets), fold)


def _shared_dtype(pools: Sequence[AttentionPool]) -> torch.dtype | None:
    """The patch layer's dtype when all ``pools`` share it and their patch-feature statistics
    (one conversion and standardisation serves them all), else None."""
    dtypes = {pool.compute_dtype or torch.float32 for pool in pools}
    first = pools[0]
    same_stats = all(torch.equal(p.feature_mean, first.feature_mean) and torch.equal(p.feature_std, first.feature_std)
                     for p in pools[1:])
    return dtypes.pop() if len(dtypes) == 1 and same_stats else None


def attention_pools(pools: Sequence[AttentionPool], features: torch.Tensor,
                    offsets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each pool's ``(slide features, attention weights)`` of the same packed bags, the features
    converted and standardised once. On a CPU all pools run bag by bag in one autograd function
    (:mod:`bd.mil.bagwise`); elsewhere their patch layers share one GEMM each way
    (:func:`embed_instances`) and each pool pools its own embeddings."""
    dtype = _shared_dtype(pools)
    if len(pools) == 1 or dtype is None or any(pool.pooled_cache is not None for pool in pools):
        return [pool(features, offsets) for pool in pools]  # a cached pool computes only what it lacks
    if features.device.type == "cpu" and stackable(pools):
        return _bagwise(pools, features, offsets)
    return [pool(features, offsets, h) for pool, h in zip(pools, embed_instances(pools, features))]


def embed_instances(pools: Sequence[AttentionPool], features: torch.Tensor) -> list[torch.Tensor]:
    """Each pool's instance embeddings of the same patches, in one matmul each way: the features
    are converted once and the GEMMs are ``len(pools)`` times wider, which runs closer to the
    device's peak (the patch layer is nearly all of a step's compute). Same values as
    ``pool.instances``."""
    dtype = _shared_dtype(pools)
    if len(pools) == 1 or dtype is None:
        return [pool.instances(features) for pool in pools]
    x = pools[0].standardised(features.to(dtype))  # the pools share the training patches' statistics
    params = [t for pool in pools for t in (pool.embed.weight, pool.embed.bias)]
    return list(_SharedInputLinearReLU.apply(x, dtype, *params))


def model_pools(model: nn.Module) -> list[AttentionPool]:
    """Every attention pool of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, AttentionPool)]


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's patch layer computes in (fp32 unless all its pools use another):
    packing a step's bags straight into it saves one conversion pass over the features."""
    dtypes = {m.compute_dtype or torch.float32 for m in model_pools(model)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def input_standardisation(model: nn.Module) -> tuple[torch.dtype, torch.Tensor, torch.Tensor] | None:
    """(dtype, mean, scale) with which every attention pool of ``model`` converts and z-scores
    its patch features, so that a batch can be packed already transformed (:mod:`bd.mil.packing`);
    None when the pools differ in either (each then does its own)."""
    pools = model_pools(model)
    if not pools:
        return None
    first, dtypes = pools[0], {p.compute_dtype or torch.float32 for p in pools}
    same = all(torch.equal(p.feature_mean, first.feature_mean) and torch.equal(p.feature_std, first.feature_std)
               for p in pools[1:])
    if len(dtypes) > 1 or not same:
        return None
    dtype = dtypes.pop()
    return dtype, first.feature_mean.to(dtype), (1.0 / first.feature_std).to(dtype)


def folds_standardisation(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s attention pools on ``device`` fold the z-scoring into their patch
    layers (:meth:`AttentionPool.folded_standardisation`; CPU only): a packer then only converts."""
    pools = model_pools(model)
    return device.type == "cpu" and bool(pools) and all(
        pool.folded_standardisation() is not None for pool in pools)


@contextlib.contextmanager
def standardised_inputs(model: nn.Module) -> Iterator[None]:
    """Within: ``model``'s attention pools take features that are already converted and z-scored
    (packed so by :class:`bd.mil.packing.Packer`) and skip that pass over the patches."""
    pools = model_pools(model)
    before = [pool.inputs_standardised for pool in pools]
    for pool in pools:
        pool.inputs_standardised = True
    try:
        yield
    finally:
        for pool, was in zip(pools, before):
            pool.inputs_standardised = was
