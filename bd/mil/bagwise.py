"""Attention-MIL pooling on a CPU, a few bags at a time: the patch layer, the attention-score
MLP, the softmax and the weighted sum of several same-shaped pools in one autograd function,
forward and backward.

Why: after the patch layer's two big products, a step's time went to ~30 small ops per pool over
``[n, 128]`` tensors of all ~16 k patches (8 MB each): out of this CPU's cache, each ran at memory
speed (~15 GB/s here against ~50 in cache), and together they took as long as the patch layer's
forward product. Here the patch layer's two products run once over the whole step (split into
chunks, they ran slower); everything between them runs on ~4 k rows at a time (a few whole bags),
forward and backward, with the pools stacked: each score layer of all pools is one batched matmul
over a strided view of the patch layer's output (no copies, half the calls), and the gradients of
the score layers, the softmax and the ReLU are written straight into the weight-gradient
product's input. The maths is that of
:class:`bd.mil.pooling.AttentionPool` (eq. 1) on each bag: the same values up to float rounding,
checked against plain autograd ops in tests/mil/test_bagwise.py.

The z-scoring of the patch features, ``(x - mean) * scale``, can be folded into the patch layer
(``standardise``): its weights become ``W * scale`` and its bias ``b - (W * scale) @ mean``, and
the weight gradient ``(g.T @ x - g.sum(0) ⊗ mean) * scale``. The step then packs its bags with
one conversion pass instead of three passes (bd.mil.packing; measured ~4.5 ms of a ~200 ms step
of 16 k patches on a 2-core AMD EPYC).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bd.mil.kernels import linear_relu, weight_gradient

CHUNK_ROWS = 4096  # rows of whole bags the score path works on at once (~4 MB of fp32 activations)


def pool_parameters(pool: nn.Module) -> list[torch.Tensor]:
    """An :class:`bd.mil.pooling.AttentionPool`'s tensors in the order :class:`_BagwiseAttention`
    takes them: the patch layer's weight and bias, then each score layer's (every one but the last
    followed by ReLU)."""
    layers = [m for m in pool.score if isinstance(m, nn.Linear)]
    return [pool.embed.weight, pool.embed.bias, *(t for layer in layers for t in (layer.weight, layer.bias))]


def stackable(pools: Sequence[nn.Module]) -> bool:
    """Whether ``pools`` have the same layer shapes (then they run as one stack)."""
    shapes = [[tuple(t.shape) for t in pool_parameters(pool)] for pool in pools]
    return all(s == shapes[0] for s in shapes[1:])


def bagwise_pools(pools: Sequence[nn.Module], x: torch.Tensor, lengths: list[int],
                  standardise: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pooled [B, dim], attention weights [n]) of each of the same-shaped ``pools``
    (:func:`stackable`) on the packed bags ``x`` (already converted to the pools' dtype) of
    ``lengths`` rows each; ``x`` is z-scored already, or by ``standardise`` = (mean, scale)
    folded into the patch layer (see the module docstring)."""
    dtype = pools[0].compute_dtype or torch.float32
    params = [t for pool in pools for t in pool_parameters(pool)]
    out = _BagwiseAttention.apply(x, lengths, dtype, len(pools), standardise, *params)
    return list(zip(out[: len(pools)], out[len(pools) :]))


def _chunks(lengths: list[int]) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """(first row, end row, [(bag, its first row, its end row)]) of consecutive whole bags of
    about :data:`CHUNK_ROWS` rows (a longer bag is a chunk of its own); empty bags are skipped."""
    start, bags = 0, []
    for b, n in enumerate(lengths):
        if bags and bags[-1][2] - bags[0][1] + n > CHUNK_ROWS:
            yield bags[0][1], bags[-1][2], bags
            bags = []
        if n:
            bags.append((b, start, start + n))
        start += n
    if bags:
        yield bags[0][1], bags[-1][2], bags


PARALLEL_CHUNKS = True  # run the chunks on one thread per core (see _map_chunks)
_EXECUTORS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_EXECUTORS.clear)  # a forked child has none of the parent's threads


def _map_chunks(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[fn(item) for item in items]``, the chunks' work; with several torch threads, on that many
    Python threads (a chunk at a time each; fewer if the chunks are fewer, with the cores shared
    out), every op of a chunk on its thread's core: the score path's ops are too
    small for torch to split well across cores (on 2 cores they ran only 1.3-1.5x faster than on
    one). Each chunk writes only its own rows and returns its own sums, so the results do not
    depend on which thread ran what. Not for concurrent training in several threads of one
    process: torch's thread count is process-wide."""
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if not PARALLEL_CHUNKS or workers < 2:
        return [fn(item) for item in items]
    pool = _EXECUTORS.get(workers)
    if pool is None:
        pool = _EXECUTORS[workers] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bd-chunk")

    each = max(1, threads // workers)  # torch threads per worker: 1 unless chunks are fewer than cores

    def run(item: Any) -> Any:
        if torch.get_num_threads() != each:  # a worker's OpenMP thread count is its own
            torch.set_num_threads(each)
        with torch.no_grad():  # so is grad mode
            return fn(item)

    torch.set_num_threads(each)  # MKL's count is process-wide (restored below)
    try:
        return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


def _relu_grad_(grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``grad`` zeroed in place where the ReLU's ``output`` is 0."""
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


class _BagwiseAttention(torch.autograd.Function):
    """See the module docstring. Inputs: packed features, bag lengths, the patch layer's dtype,
    the number of pools, the (mean, scale) to fold in or None, then each pool's
    :func:`pool_parameters`. Outputs: each pool's pooled
    features, then each pool's attention weights (no gradient). A pool whose pooled output gets
    no gradient gives its parameters none (not zeros), as separate pools do."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lengths: list[int], dtype: torch.dtype, n_pools: int,
                standardise: tuple[torch.Tensor, torch.Tensor] | None,
                *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        per = len(params) // n_pools
        stacked = [torch.stack(params[i::per]) for i in range(per)]  # [pools, ...] per tensor
        dim = stacked[0].shape[1]
        xd = x.to(dtype)
        weight, bias = stacked[0].flatten(0, 1), stacked[1].flatten()
        if standardise is not None:  # relu(((x - mean) * scale) @ W.T + b) = relu(x @ (W * scale).T + b')
            weight = weight * standardise[1]
            bias = torch.addmv(bias, weight, standardise[0], alpha=-1)
        y = linear_relu(xd, weight.to(dtype), bias.to(dtype)).float()
        h_all = y.view(-1, n_pools, dim).transpose(0, 1)  # [pools, n, dim], a strided view
        pooled = y.new_zeros(n_pools, len(lengths), dim)
        weights = y.new_empty(n_pools, x.shape[0])

        def chunk(first: int, end: int, bags: list[tuple[int, int, int]]) -> list[torch.Tensor]:
            acts, scores = _score(h_all[:, first:end], stacked[2:])
            for b, lo, hi in bags:  # each chunk writes only its own bags' rows
                w = torch.softmax(scores[:, lo - first : hi - first], dim=1)
                weights[:, lo:hi] = w
                pooled[:, b] = torch.bmm(w.unsqueeze(1), h_all[:, lo:hi]).squeeze(1)
            return acts

        hidden = _map_chunks(lambda c: chunk(*c), list(_chunks(lengths)))
        ctx.lengths, ctx.dtype, ctx.per, ctx.hidden, ctx.standardise = lengths, dtype, per, hidden, standardise
        ctx.save_for_backward(xd, y, weights, *stacked)
        ctx.set_materialize_grads(False)
        weights = weights.unbind(0)
        ctx.mark_non_differentiable(*weights)
        return (*pooled.unbind(0), *weights)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        xd, y, weights, *stacked = ctx.saved_tensors
        n_pools, per = weights.shape[0], ctx.per
        used = [k for k in range(n_pools) if grads[k] is not None]
        out: list[torch.Tensor | None] = [None] * (5 + n_pools * per)
        if not used:
            return tuple(out)
        dim = stacked[0].shape[1]
        everyone = len(used) == n_pools
        pick = (lambda t: t) if everyone else (lambda t: t[used])
        layers = [pick(t) for t in stacked]
        d_pooled = torch.stack([grads[k] for k in used])  # [used, B, dim]
        h_all = pick(y.view(-1, n_pools, dim).transpose(0, 1))
        w_all = pick(weights)
        g_all = y.new_empty(y.shape[0], len(used) * dim)  # the patch layer's pre-ReLU gradient

        def chunk(first: int, end: int, bags: list[tuple[int, int, int]],
                  hidden: list[torch.Tensor]) -> list[torch.Tensor]:
            """This chunk's gradients of the patch layer's bias and the score layers (its rows of
            ``g_all`` written in place)."""
            acc = [torch.zeros_like(t) for t in layers[1:]]
            g_view = g_all[first:end].view(-1, len(used), dim).transpose(0, 1)
            h = h_all[:, first:end]
            d_s = y.new_empty(len(used), end - first)
            for b, lo, hi in bags:  # the weighted sum's and the softmax's backward, bag by bag
                w, dp, rows = w_all[:, lo:hi], d_pooled[:, b], slice(lo - first, hi - first)
                d_w = d_s[:, rows]  # first the attention weights' gradient, then the scores' in place
                for k in range(len(used)):  # a matrix-vector product each: 3-4x faster than bmm here
                    torch.mv(h[k, rows], dp[k], out=d_w[k])
                d_w.sub_((w * d_w).sum(1, keepdim=True)).mul_(w)
                torch.mul(w.unsqueeze(2), dp.unsqueeze(1), out=g_view[:, rows])
            _score_backward(h, [pick(t) for t in hidden], d_s, layers[2:], acc[1:], g_view)
            _relu_grad_(g_view, h)
            acc[0] += g_view.sum(1)  # while the chunk is in cache
            return acc

        parts = _map_chunks(lambda c: chunk(*c[0], c[1]), list(zip(_chunks(ctx.lengths), ctx.hidden)))
        acc = [sum(terms[1:], terms[0]) for terms in zip(*parts)]  # in chunk order, however they ran
        gd = g_all.to(ctx.dtype)  # converted once, for both products (a no-op in fp32)
        weight = layers[0].flatten(0, 1)
        g_weight = weight_gradient(gd, xd)
        if ctx.standardise is not None:  # the folded weights' gradient, then the chain rule through them
            mean, scale = ctx.standardise
            g_weight = g_weight.addr_(acc[0].flatten(), mean, alpha=-1).mul_(scale)
            weight = weight * scale
        acc.insert(0, g_weight.view(layers[0].shape))
        if ctx.needs_input_grad[0]:
            out[0] = gd @ weight.to(ctx.dtype)
        for j, k in enumerate(used):
            for i in range(per):
                out[5 + k * per + i] = acc[i][j].to(stacked[i].dtype)
        return tuple(out)


def _score(h: torch.Tensor, layers: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The stacked score MLPs on one chunk's embeddings ``h`` [pools, n, dim]: (hidden
    activations, scores [pools, n]); ``layers``: stacked weights [pools, out, in] and biases."""
    hidden, a = [], h
    for weight, bias in zip(layers[0:-2:2], layers[1:-2:2]):
        a = torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2)).relu_()
        hidden.append(a)
    return hidden, torch.baddbmm(layers[-1].unsqueeze(1), a, layers[-2].transpose(1, 2)).squeeze(2)


def _score_backward(h: torch.Tensor, hidden: list[torch.Tensor], d_s: torch.Tensor, layers: Sequence[torch.Tensor],
                    acc: list[torch.Tensor], g: torch.Tensor) -> None:
    """The stacked score MLPs' backward on one chunk, from the scores' gradient ``d_s`` [pools, n]:
    the layers' gradients added to ``acc``, the gradient wrt ``h`` added to ``g`` [pools, n, dim]."""
    grad = d_s.unsqueeze(2)
    for j in range(len(layers) // 2 - 1, -1, -1):
        weight, inp = layers[2 * j], (hidden[j - 1] if j else h)
        acc[2 * j].baddbmm_(grad.transpose(1, 2), inp)
        acc[2 * j + 1] += grad.sum(1)
        if j:
            grad = _relu_grad_(grad * weight if weight.shape[1] == 1 else torch.bmm(grad, weight), hidden[j - 1])
        else:
            g.baddbmm_(grad, weight)
