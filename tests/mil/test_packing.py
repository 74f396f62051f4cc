"""Fast steps keep the model's semantics: packing converts and standardises as the pools do,
packed bags give each bag what a one-bag step gives it, and the evaluation's pooled-feature
cache gives the uncached figures while running the patch layer once per patient."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from bd.mil.bags import Cohort
from bd.synthetic import synthetic_cohort
from bd.evaluation.evaluate import EvaluationParams, evaluate, run_predictor
from bd.mil import bagwise, kernels, packing
from bd.mil.models import AttentionPool, create_model, standardised_inputs
from bd.mil.packing import Packer, largest_step
from bd.mil.runs import PooledCache, TrainedRun, predict_patients
from bd.mil.train import TrainParams, run_epoch

DIM, CLIN = 12, 4
SMALL = {"hidden_dim": 8, "clinical_dim": 6, "prompt_length": 5, "smil_priors": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(method: str, precision: str = "fp32", seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(method, DIM, CLIN, **SMALL, precision=precision)
    model.standardise(torch.linspace(-1, 1, DIM), torch.linspace(0.5, 2, DIM))
    model.setup(torch.randn(20, CLIN))
    return model


@pytest.mark.parametrize(("storage", "precision"), [(torch.float16, "fp32"), (torch.bfloat16, "fp32"),
                                                    (torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                                                    (torch.float16, "bf16")])
def test_packed_features_are_what_the_pools_compute(storage, precision):
    """Converted, and z-scored while packing unless the CPU's fp32 patch layer folds the
    z-scoring in: bit for bit the pools' own transform, and their own outputs."""
    cohort = synthetic_cohort(8, 300, DIM, CLIN, seed=1, dtype=storage)  # bags > one pack chunk
    model = _model("image_only", precision)
    pool = model.pool_img
    idx = np.array([5, 0, 3])
    raw = cohort.batch(idx)
    dtype = pool.compute_dtype or torch.float32
    folds = precision == "fp32"  # on a CPU: bd.mil.pooling.folds_standardisation
    expected = raw.features.to(dtype) if folds else pool.standardised(raw.features.to(dtype))
    packer = Packer(model, cohort, "cpu")
    assert (packer.standardise is None) == folds
    packed = packer.batch(idx)
    assert packed.features.dtype == dtype
    assert torch.equal(packed.features, expected)
    assert torch.equal(packed.offsets, raw.offsets)
    with packer:
        assert pool.inputs_standardised != folds
        torch.testing.assert_close(pool(packed.features, packed.offsets)[0], _outside(pool, raw), rtol=0, atol=0)
    assert not pool.inputs_standardised


def _outside(pool: AttentionPool, batch) -> torch.Tensor:
    """The pool's output when it standardises itself (outside any packer)."""
    before = pool.inputs_standardised
    pool.inputs_standardised = False
    try:
        return pool(batch.features, batch.offsets)[0]
    finally:
        pool.inputs_standardised = before


def test_the_buffer_is_reused_and_sized_for_the_largest_step():
    cohort = synthetic_cohort(10, 20, DIM, CLIN, seed=2, dtype=torch.float16)
    model = _model("bd")
    idx = np.arange(10)
    packer = Packer(model, cohort, "cpu", largest_step(cohort, idx, 3))
    buffer = packer.buffer
    assert buffer.shape[0] == np.sort(cohort.lengths())[-3:].sum()
    for part in (idx[:3], idx[3:6], idx[[9, 1, 4]]):
        batch = packer.batch(part)
        assert batch.features.data_ptr() == buffer.data_ptr()
        assert batch.features.shape[0] == cohort.lengths()[part].sum()



@pytest.mark.parametrize("background", [True, False])
def test_batches_packs_ahead_into_two_alternating_buffers_with_the_values_of_batch(background, monkeypatch):
    monkeypatch.setattr(packing, "BACKGROUND_PACKING", background)
    cohort = synthetic_cohort(10, 20, DIM, CLIN, seed=2, dtype=torch.float16)
    model = _model("bd")
    parts = [np.array([0, 1, 2]), np.array([3, 4]), np.array([9, 1, 4]), np.array([5])]
    clin = [np.array([True, False, True]), None, None, np.array([False])]
    reference = Packer(model, cohort, "cpu")
    packer = Packer(model, cohort, "cpu", largest_step(cohort, np.arange(10), 3))
    pointers = []
    for k, batch in enumerate(packer.batches(parts, clin)):
        want = reference.batch(parts[k], clin[k])
        for field in ("features", "offsets", "clinical", "clinical_present", "slide_present", "labels"):
            assert torch.equal(getattr(batch, field), getattr(want, field)), field
        pointers.append(batch.features.data_ptr())
    if background:  # batch k+1 is packed while batch k is in use: never into the same buffer
        assert pointers[0] == pointers[2] != pointers[1] == pointers[3]
    else:
        assert len(set(pointers)) == 1


def test_batches_runs_on_an_idle_priority_thread_and_raises_its_errors_in_the_caller():
    cohort = synthetic_cohort(6, 20, DIM, CLIN, seed=2, dtype=torch.float16)
    packer = Packer(_model("bd"), cohort, "cpu")
    if hasattr(os, "SCHED_IDLE"):
        assert packing._background_thread().submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
    batches = packer.batches([np.array([0, 1]), np.array([2, 99])])  # patient 99 does not exist
    assert next(batches).size == 2
    with pytest.raises(IndexError):
        next(batches)
    early = packer.batches([np.array([0]), np.array([1]), np.array([2])])
    next(early)
    early.close()  # stopping early waits for the batch in flight

def test_packed_bags_get_the_outputs_and_gradients_of_one_bag_steps():
    """BD on 3 packed bags: per-bag features and logits, and the gradient of the per-bag
    cross-entropies summed, equal those of three one-bag batches the model standardises itself."""
    from bd.mil.losses import classification_loss

    cohort = synthetic_cohort(6, 40, DIM, CLIN, seed=3, dtype=torch.float16)
    model = _model("bd").eval()  # eval: the S->M statistics stay put
    idx = np.array([4, 1, 2])

    def ce(out, labels):
        return classification_loss(out["logits_mul"], labels) + classification_loss(out["logits_sgl"], labels)

    with Packer(model, cohort, "cpu") as packer:
        batch = packer.batch(idx)
        together = model.branches(batch)
        sum(ce({k: v[j : j + 1] for k, v in together.items()}, batch.labels[j : j + 1]) for j in range(3)).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    singles = []
    for i in idx:
        one = cohort.batch([i])
        singles.append({k: v.detach() for k, v in model.branches(one).items()})
        ce(model.branches(one), one.labels).backward()
    for key in ("logits_mul", "logits_sgl", "f_wm", "kept_sgl"):
        torch.testing.assert_close(together[key].detach(), torch.cat([s[key] for s in singles]), rtol=1e-5, atol=1e-6)
    assert "pool_mul.embed.weight" in packed and "pool_sgl.embed.weight" in packed
    for name, p in model.named_parameters():
        if name in packed:
            torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fast_bd_step_gives_the_loss_and_gradients_of_a_straightforward_one(precision, monkeypatch):
    """A training step as run_epoch runs it (packed, converted and z-scored in the buffer, both
    branches' patch layers in one GEMM with the ReLU inside) against the plain one: every loss
    term and every parameter's gradient equal those of the unpacked batch through two separate
    nn.Linear + ReLU layers (AttentionPool.instances)."""
    from bd.mil import distillation

    cohort = synthetic_cohort(6, 300, DIM, CLIN, seed=5, dtype=torch.bfloat16)  # bags > one pack chunk
    idx = np.array([3, 0, 5, 1])
    models = [_model("bd", precision).train(), _model("bd", precision).train()]  # train: S->M statistics move
    with Packer(models[0], cohort, "cpu") as packer:
        fast = models[0].losses(packer.batch(idx), "joint")
        fast["loss"].backward()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def plain_pools(pools, x, offsets):  # each pool's own nn.Linear + ReLU, then its pooling by plain ops
        return [p(x, offsets, torch.relu(p.embed(p.standardised(x.to(dtype)).float()))) for p in pools]

    monkeypatch.setattr(distillation, "attention_pools", plain_pools)
    plain = models[1].losses(cohort.batch(idx, dtype=dtype), "joint")
    plain["loss"].backward()
    tol = {"rtol": 2e-2, "atol": 2e-2} if precision == "bf16" else {"rtol": 1e-5, "atol": 1e-6}
    assert fast.keys() == plain.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], plain[key], **tol, msg=key)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in models]
    assert grads[0].keys() == grads[1].keys() and "pool_mul.embed.weight" in grads[0] and "pool_sgl.embed.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **tol, msg=name)


def test_a_packed_epoch_equals_the_unpacked_loop():
    """run_epoch (packer, buffer reused) leaves the weights of a plain cohort.batch loop."""
    cohort = synthetic_cohort(12, 30, DIM, CLIN, seed=4, dtype=torch.float16)
    params = TrainParams(method="bd", lr=0.05, **SMALL, precision="fp32")
    idx = np.arange(12)
    models = [_model("bd"), _model("bd")]
    stage = models[0].stages()[0]
    opts = [torch.optim.SGD(m.stage_parameters(stage), lr=params.lr, momentum=0.3) for m in models]
    run_epoch(models[0], cohort, idx, stage, opts[0], np.random.default_rng(0), 4, torch.device("cpu"))
    models[1].train()
    for part in np.random.default_rng(0).permutation(idx).reshape(3, 4):
        batch = cohort.batch(part, dtype=torch.float32)
        loss = models[1].losses(batch, stage.name)["loss"]
        opts[1].zero_grad(set_to_none=True)
        loss.backward()
        opts[1].step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_standardised_inputs_nests_and_restores():
    model = _model("bd")
    with standardised_inputs(model):
        with standardised_inputs(model):
            pass
        assert model.pool_mul.inputs_standardised and model.pool_sgl.inputs_standardised
    assert not model.pool_mul.inputs_standardised


# ---------------------------------------------------------------- the evaluation's cache


def _run(method: str, cohort) -> TrainedRun:
    model = _model(method).eval()
    model.set_clinical_columns(list(cohort.clinical_columns))
    return TrainedRun(model=model, method=method, params={"method": method}, identity=dict(cohort.identity),
                      clinical_columns=list(cohort.clinical_columns), threshold=0.5, epoch=1, in_dim=DIM)


@pytest.mark.parametrize("method", ["bd", "filling", "image_only", "smil", "ae", "ensemble", "clinical_only"])
def test_cached_evaluation_equals_uncached_and_pools_each_patient_once(method, monkeypatch):
    cohort = synthetic_cohort(30, 25, DIM, CLIN, seed=6, dtype=torch.float16)
    ids, labels = [str(p) for p in cohort.patient_ids], cohort.labels.astype(int)
    params = EvaluationParams(repeats=3, bootstrap=50, curve_rates=[0.0, 30.0, 100.0])
    kinds = params.kinds(method)
    run = _run(method, cohort)
    patches = {"n": 0}  # patches x pools through the patch layer (fused or not)
    original = kernels.linear_relu

    def counting(x, weight, bias):
        if x.shape[1] == DIM:  # the patch layer, not the attention-score layers
            patches["n"] += x.shape[0] * weight.shape[0] // SMALL["hidden_dim"]
        return original(x, weight, bias)

    monkeypatch.setattr(kernels, "linear_relu", counting)
    monkeypatch.setattr(bagwise, "linear_relu", counting)
    cached = evaluate(run_predictor(run, cohort), ids, labels, 0.5, kinds, params)
    cached_patches, patches["n"] = patches["n"], 0
    plain = evaluate(run_predictor(run, cohort, cache=False), ids, labels, 0.5, kinds, params)
    for a, b in zip(cached, plain):
        assert a.columns.tolist() == b.columns.tolist()
        for col in a.columns:
            if a[col].dtype.kind == "f":
                np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-6, atol=1e-7, err_msg=col)
            else:
                assert a[col].tolist() == b[col].tolist(), col
    n_pools = sum(isinstance(m, AttentionPool) for m in run.model.modules())
    assert cached_patches <= n_pools * cohort.lengths().sum()  # each pool embeds each patch at most once
    if n_pools:
        assert patches["n"] > cached_patches  # uncached: every prediction runs the patch layer again


@pytest.mark.parametrize("method", ["bd", "image_only", "clinical_only"])
def test_batches_the_cache_serves_are_predicted_without_packing_their_patches(method, monkeypatch):
    cohort = synthetic_cohort(10, 15, DIM, CLIN, seed=8)
    model = _model(method).eval()
    idx, mask = np.arange(10), np.arange(10) % 3 != 0
    packed = []
    original = Cohort.pack_into
    monkeypatch.setattr(Cohort, "pack_into", lambda self, out, starts, lengths, standardise=None:
                        packed.append(sum(lengths)) or original(self, out, starts, lengths, standardise))
    cache = PooledCache(10)
    first, _ = predict_patients(model, cohort, idx, clinical_present=mask, cache=cache)
    assert sum(packed) == (0 if method == "clinical_only" else cohort.lengths().sum())
    packed.clear()
    again, _ = predict_patients(model, cohort, idx, clinical_present=~mask, slide_present=mask, cache=cache)
    assert packed == []  # every slide pooled already: no patch is packed again
    want, _ = predict_patients(model, cohort, idx, clinical_present=~mask, slide_present=mask)
    np.testing.assert_allclose(again, want, rtol=1e-6, atol=1e-7)


def test_cache_serves_mixed_presence_and_leaves_the_pools_clean():
    cohort = synthetic_cohort(10, 15, DIM, CLIN, seed=8)
    model = _model("image_only").eval()
    idx = np.arange(10)
    cache = PooledCache(10)
    full, _ = predict_patients(model, cohort, idx, slide_present=np.ones(10, bool), cache=cache)
    assert cache.tables[id(model.pool_img)][1].all()
    mask = np.arange(10) % 3 != 0
    got, _ = predict_patients(model, cohort, idx, slide_present=mask, cache=cache)
    want, _ = predict_patients(model, cohort, idx, slide_present=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert model.pool_img.pooled_cache is None
    with pytest.raises(RuntimeError, match="serving"):
        cache.lookup(model.pool_img, torch.tensor([0, 3]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_packs_in_the_background_on_its_own_thread():
    """After a fork the parent's packing thread is gone: the child starts its own instead of
    queueing work for a thread that does not exist (which would hang)."""
    cohort = synthetic_cohort(6, 20, DIM, CLIN, seed=2, dtype=torch.float16)
    packer = Packer(_model("bd"), cohort, "cpu")
    assert len(list(packer.batches([np.array([0]), np.array([1])]))) == 2  # the parent's thread exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if two batches come back within the alarm
        import signal
        signal.alarm(20)
        try:
            os._exit(0 if len(list(packer.batches([np.array([2]), np.array([3])]))) == 2 else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
