"""The CPU's bag-wise attention pooling (bd.mil.bagwise) against plain autograd ops: values,
attention weights and every gradient, for chunks of several bags, bags split from their
neighbours, empty bags, one pool or a stack, fp32 or bf16, pools whose output is unused, and the
z-scoring folded into the patch layer."""

from __future__ import annotations

import pytest
import torch

from bd.mil import bagwise
from bd.mil.pooling import AttentionPool, attention_pools

DIM, HIDDEN = 12, 8
LENGTHS = [3, 0, 5, 9, 2, 4]  # an empty bag, and (with CHUNK_ROWS 7) a bag longer than a chunk


def _pools(n: int, dtype: torch.dtype | None = None, seed: int = 0) -> list[AttentionPool]:
    torch.manual_seed(seed)
    return [AttentionPool(DIM, HIDDEN, dtype) for _ in range(n)]


def _plain(pool: AttentionPool, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1) by plain autograd ops, one bag at a time (the reference)."""
    dtype = pool.compute_dtype or torch.float32
    h = torch.relu(torch.nn.functional.linear(x.to(dtype), pool.embed.weight.to(dtype), pool.embed.bias.to(dtype))).float()
    pooled, weights = [], []
    for hb in h.split(lengths):
        w = torch.softmax(pool.score(hb).squeeze(1), dim=0)
        pooled.append(w @ hb if len(hb) else h.new_zeros(HIDDEN))
        weights.append(w)
    return torch.stack(pooled), torch.cat(weights)


def _grads(pools: list[AttentionPool], x: torch.Tensor) -> list[torch.Tensor | None]:
    found = [p.grad for pool in pools for p in pool.parameters()] + [x.grad]
    for pool in pools:
        pool.zero_grad(set_to_none=True)
    x.grad = None
    return found


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(bagwise, "CHUNK_ROWS", 7)


@pytest.mark.parametrize("n_pools", [1, 2, 3])
def test_values_weights_and_gradients_equal_plain_autograd(n_pools):
    pools = _pools(n_pools)
    x = torch.randn(sum(LENGTHS), DIM, requires_grad=True)
    targets = torch.randn(n_pools, len(LENGTHS), HIDDEN)
    fast = bagwise.bagwise_pools(pools, x, LENGTHS)
    sum(((p * t) ** 2).sum() for (p, _), t in zip(fast, targets)).backward()
    fast_grads = _grads(pools, x)
    plain = [_plain(pool, x, LENGTHS) for pool in pools]
    sum(((p * t) ** 2).sum() for (p, _), t in zip(plain, targets)).backward()
    for (a, wa), (b, wb) in zip(fast, plain):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(wa, wb)
        assert not wa.requires_grad
    assert fast[0][0][1].abs().sum() == 0  # the empty bag pools to zeros
    for a, b in zip(fast_grads, _grads(pools, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_pool_whose_output_is_unused_gets_no_gradient():
    pools = _pools(2)
    x = torch.randn(sum(LENGTHS), DIM)
    (fast, _), _ = bagwise.bagwise_pools(pools, x, LENGTHS)
    (fast**2).sum().backward()
    assert all(p.grad is None for p in pools[1].parameters())
    fast_grads = _grads(pools, x)[: len(list(pools[0].parameters()))]
    (_plain(pools[0], x, LENGTHS)[0] ** 2).sum().backward()
    for a, b in zip(fast_grads, _grads(pools, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_patch_layer_stays_close_to_plain():
    pools = _pools(2, torch.bfloat16)
    x = torch.randn(sum(LENGTHS), DIM).to(torch.bfloat16)
    for (a, wa), pool in zip(bagwise.bagwise_pools(pools, x, LENGTHS), pools):
        b, wb = _plain(pool, x, LENGTHS)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(wa, wb, rtol=2e-2, atol=2e-2)


def test_attention_pools_stacks_only_same_shaped_pools():
    torch.manual_seed(3)
    pools = [AttentionPool(DIM, HIDDEN, None), AttentionPool(DIM, 2 * HIDDEN, None)]
    assert not bagwise.stackable(pools) and bagwise.stackable(_pools(2))
    x = torch.randn(sum(LENGTHS), DIM)
    offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    for (a, wa), pool in zip(attention_pools(pools, x, offsets), pools):
        b, wb = pool(x, offsets)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(wa, wb)


def _fitted(pools: list[AttentionPool], mean: torch.Tensor, std: torch.Tensor) -> list[AttentionPool]:
    for pool in pools:
        pool.feature_mean.copy_(mean)
        pool.feature_std.copy_(std)
    return pools


@pytest.mark.parametrize("n_pools", [1, 2])
def test_folded_standardisation_gives_the_values_and_gradients_of_z_scored_inputs(n_pools):
    """The z-scoring folded into the patch layer: the outputs, attention weights and every
    gradient (the input's too, wrt the raw features) of plain autograd ops on z-scored features."""
    torch.manual_seed(5)
    mean, std = torch.linspace(-3, 5, DIM), torch.linspace(0.2, 4, DIM)
    pools = _fitted(_pools(n_pools), mean, std)
    fold = pools[0].folded_standardisation()
    assert fold is not None
    x = (mean + std * torch.randn(sum(LENGTHS), DIM)).requires_grad_()
    targets = torch.randn(n_pools, len(LENGTHS), HIDDEN)
    fast = bagwise.bagwise_pools(pools, x, LENGTHS, fold)
    sum(((p * t) ** 2).sum() for (p, _), t in zip(fast, targets)).backward()
    fast_grads = _grads(pools, x)
    plain = [_plain(pool, (x - mean) / std, LENGTHS) for pool in pools]
    sum(((p * t) ** 2).sum() for (p, _), t in zip(plain, targets)).backward()
    for (a, wa), (b, wb) in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    plain_grads = _grads(pools, x)
    assert all(g is not None for g in fast_grads)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_pools_fold_only_fp32_features_of_a_moderate_mean():
    """Folded where rounding allows (fp32, |mean| / std <= FOLD_MAX_RATIO), else z-scored first:
    either way the outputs of the z-scored features."""
    from bd.mil import pooling

    torch.manual_seed(6)
    std = torch.full((DIM,), 0.5)
    for mean, folds in ((torch.full((DIM,), 2.0), True), (torch.full((DIM,), 0.5 * pooling.FOLD_MAX_RATIO + 1), False)):
        pool = _fitted(_pools(1), mean, std)[0]
        assert (pool.folded_standardisation() is not None) == folds
        assert _fitted(_pools(1, torch.bfloat16), mean, std)[0].folded_standardisation() is None
        x = mean + std * torch.randn(sum(LENGTHS), DIM)
        offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
        got, want = pool(x, offsets)[0], _plain(pool, (x - mean) / std, LENGTHS)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        pool.inputs_standardised = True  # features that come z-scored are never folded again
        assert pool.folded_standardisation() is None


def test_chunks_on_several_threads_give_bit_for_bit_the_sequential_results(monkeypatch):
    """The chunks run on one Python thread per torch thread (bagwise._map_chunks): outputs and
    every gradient are bit for bit those of one thread running them in order."""
    pools = _pools(2, seed=7)
    x = torch.randn(sum(LENGTHS) * 3, DIM, requires_grad=True)
    lengths = LENGTHS * 3
    targets = torch.randn(2, len(lengths), HIDDEN)

    def run(parallel: bool) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        monkeypatch.setattr(bagwise, "PARALLEL_CHUNKS", parallel)
        out = bagwise.bagwise_pools(pools, x, lengths)
        sum(((p * t) ** 2).sum() for (p, _), t in zip(out, targets)).backward()
        return [t.detach() for pair in out for t in pair], _grads(pools, x)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ran: list[int] = []
        original = bagwise._map_chunks
        monkeypatch.setattr(bagwise, "_map_chunks", lambda fn, items: ran.append(len(items)) or original(fn, items))
        parallel, sequential = run(True), run(False)
        assert torch.get_num_threads() == 2  # restored after each parallel map
    finally:
        torch.set_num_threads(threads)
    assert ran and min(ran) >= 2
    for a, b in zip(parallel[0] + parallel[1], sequential[0] + sequential[1]):
        assert a is not None and torch.equal(a, b)


def test_chunks_hold_whole_bags():
    chunks = list(bagwise._chunks(LENGTHS))
    assert [bags for *_, bags in chunks] == [[(0, 0, 3)], [(2, 3, 8)], [(3, 8, 17)], [(4, 17, 19), (5, 19, 23)]]
    assert all(first == bags[0][1] and end == bags[-1][2] for first, end, bags in chunks)
