"""Models: attention pooling on packed bags, the registry, test-time routing, and BD's gradient
routing (which loss moves which branch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bd.synthetic import synthetic_cohort
from bd.errors import ConfigError
from bd.mil.models import (
    COMPLETE,
    MODELS,
    NO_CLINICAL,
    NO_SLIDE,
    AttentionPool,
    create_model,
    segment_softmax_pool,
)

DIM, CLIN = 12, 4
SMALL = {"hidden_dim": 8, "clinical_dim": 6, "prompt_length": 5, "smil_priors": 3, "precision": "fp32"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort():
    return synthetic_cohort(10, 6, DIM, CLIN, seed=3)


def build(method: str, **kw):
    torch.manual_seed(0)
    return create_model(method, DIM, CLIN, **{**SMALL, **kw})


# ---------------------------------------------------------------- pooling


def test_segment_softmax_pool_matches_a_loop_over_bags():
    torch.manual_seed(0)
    lengths = [3, 0, 5, 1]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]))
    scores, values = torch.randn(9), torch.randn(9, 4)
    pooled, weights = segment_softmax_pool(scores, values, offsets)
    for b, (a, z) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if a == z:
            assert pooled[b].abs().sum() == 0
            continue
        w = torch.softmax(scores[a:z], 0)
        torch.testing.assert_close(weights[a:z], w)
        torch.testing.assert_close(pooled[b], w @ values[a:z])


def test_attention_pool_is_per_bag_and_order_free():
    torch.manual_seed(0)
    pool = AttentionPool(DIM, 8, compute_dtype=None)
    x = torch.randn(7, DIM)
    together, _ = pool(x, torch.tensor([0, 4, 7]))
    alone = torch.cat([pool(x[:4], torch.tensor([0, 4]))[0], pool(x[4:], torch.tensor([0, 3]))[0]])
    torch.testing.assert_close(together, alone)
    shuffled, _ = pool(x[[2, 0, 3, 1]], torch.tensor([0, 4]))
    torch.testing.assert_close(shuffled, together[:1])


def test_bf16_patch_layer_is_close_to_fp32():
    torch.manual_seed(0)
    fp32 = AttentionPool(DIM, 8, compute_dtype=None)
    bf16 = AttentionPool(DIM, 8, compute_dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    x, off = torch.randn(20, DIM), torch.tensor([0, 20])
    torch.testing.assert_close(bf16(x, off)[0], fp32(x, off)[0], atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- registry and prediction


def test_registry_holds_every_method_and_rejects_unknown_ones():
    assert set(MODELS) == {"image_only", "clinical_only", "filling", "ae", "ensemble", "smil", "bd", "bd_wsi",
                           "modality_dropout"}
    with pytest.raises(ConfigError, match="unknown method 'lnmp'.*known: ae, bd"):
        create_model("lnmp", DIM, CLIN)
    with pytest.raises(ConfigError, match="directions"):
        create_model("bd", DIM, CLIN, directions="sideways")


EXPECTED_BRANCHES = {  # method -> {(clinical present, slide present): branch}
    "image_only": {COMPLETE: "image", NO_CLINICAL: "image"},
    "clinical_only": {COMPLETE: "clinical", NO_CLINICAL: "filled"},
    "filling": {COMPLETE: "fusion", NO_CLINICAL: "filled", NO_SLIDE: "slide_filled"},
    "ae": {COMPLETE: "fusion", NO_CLINICAL: "ae"},
    "ensemble": {COMPLETE: "ensemble", NO_CLINICAL: "image"},
    "smil": {COMPLETE: "fusion", NO_CLINICAL: "smil"},
    "bd": {COMPLETE: "multi", NO_CLINICAL: "single"},
    "bd_wsi": {COMPLETE: "multi", NO_SLIDE: "single"},
    "modality_dropout": {COMPLETE: "fusion", NO_CLINICAL: "token"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_BRANCHES))
def test_predict_routes_each_patient_by_its_modalities(method, cohort):
    model = build(method).eval()
    model.setup(torch.from_numpy(cohort.clinical))
    n = cohort.n_patients
    (c1, s1), (c2, s2) = list(EXPECTED_BRANCHES[method])[:2]
    clin = np.arange(n) % 2 == 0
    present = np.where(clin, c1, c2), np.where(clin, s1, s2)
    with torch.no_grad():
        probs, branches = model.predict(cohort.batch(np.arange(n), *present))
        alone = [model.predict(cohort.batch([i], present[0][i : i + 1], present[1][i : i + 1]))[0] for i in range(n)]
    assert branches == [EXPECTED_BRANCHES[method][(c1, s1) if k else (c2, s2)] for k in clin]
    assert ((probs >= 0) & (probs <= 1)).all()
    torch.testing.assert_close(probs, torch.cat(alone), atol=1e-5, rtol=1e-5)  # no leakage across patients


def test_absent_clinical_data_is_never_read(cohort):
    model = build("bd").eval()
    batch = cohort.batch([0, 1], clinical_present=np.array([False, False]))
    other = cohort.batch([0, 1], clinical_present=np.array([False, False]))
    other.clinical = torch.randn_like(other.clinical)  # what the model would see if it peeked
    with torch.no_grad():
        torch.testing.assert_close(model.predict(batch)[0], model.predict(other)[0])


# ---------------------------------------------------------------- BD gradient routing


def grads_by_module(model) -> dict[str, bool]:
    """Top-level submodule -> whether any of its parameters received a non-zero gradient."""
    out = {}
    for name, module in model.named_children():
        out[name] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    return out


def bd_losses(cohort, method="bd", **kw):
    model = build(method, **kw)
    batch = cohort.batch(np.arange(6))
    return model, batch, model.losses(batch, "joint")


def test_bd_total_loss_is_eq4_plus_eq6(cohort):
    _, _, out = bd_losses(cohort, lambda_m=0.6, lambda_s=0.5)
    expected = out["mul_ce"] + 0.6 * out["mul_distill"] + out["sgl_ce"] + 0.5 * (out["sgl_mse"] + out["sgl_kl"])
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("method", ["bd", "bd_wsi"])
def test_single_modal_distillation_changes_only_the_prompt_path(cohort, method):
    model, _, out = bd_losses(cohort, method)
    out["sgl_distill"].backward()
    moved = grads_by_module(model)
    assert moved.pop("prompt")
    assert not any(moved.values()), moved
    assert model.prompt.x.grad.abs().sum() > 0  # x_p itself, not only its mapping


def test_single_modal_step_leaves_the_multi_modal_branch_unchanged(cohort):
    model, _, out = bd_losses(cohort)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.3, weight_decay=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out["sgl"].backward()
    optimizer.step()
    after = model.state_dict()
    for name in before:
        module = name.split(".")[0]
        changed = not torch.equal(before[name], after[name])
        if module in ("pool_mul", "clin_mul", "head_mul", "proj_mul", "proj_sgl"):
            assert not changed, f"{name} moved in a single-modal step"
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(("pool_sgl", "head_sgl", "prompt")))


def test_s2m_moves_only_the_multi_modal_branch(cohort):
    model, _, out = bd_losses(cohort)
    out["mul_distill"].backward()
    moved = grads_by_module(model)
    assert moved["pool_mul"] and moved["proj_mul"]
    assert not any(moved[m] for m in ("pool_sgl", "prompt", "head_sgl", "proj_sgl", "clin_mul", "head_mul"))
    assert not model.proj_sgl.weight.requires_grad  # the teacher's projection stays fixed


def test_one_backward_equals_two_separate_ones(cohort):
    """L_mul + L_sgl in one pass gives each branch the gradient of its own loss (eval mode: the
    S->M teacher's running statistics stay put between the passes)."""
    model = build("bd").eval()
    batch = cohort.batch(np.arange(6))
    out = model.losses(batch, "joint")
    out["loss"].backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    branches = {"mul": ("pool_mul", "clin_mul", "head_mul", "proj_mul"), "sgl": ("pool_sgl", "prompt", "head_sgl")}
    for key, prefix in branches.items():
        model.zero_grad(set_to_none=True)
        model.losses(batch, "joint")[key].backward()
        for n, p in model.named_parameters():
            if n.startswith(prefix):
                torch.testing.assert_close(p.grad, joint[n])


@pytest.mark.parametrize(("directions", "mul_distill", "sgl_distill"),
                         [("none", False, False), ("m2s", False, True), ("s2m", True, False), ("both", True, True)])
def test_direction_switches(cohort, directions, mul_distill, sgl_distill):
    _, _, out = bd_losses(cohort, directions=directions, lambda_m=0.6, lambda_s=0.5)
    expected_mul = out["mul_ce"] + (0.6 * out["mul_distill"] if mul_distill else 0)
    expected_sgl = out["sgl_ce"] + (0.5 * out["sgl_distill"] if sgl_distill else 0)
    torch.testing.assert_close(out["mul"], expected_mul)
    torch.testing.assert_close(out["sgl"], expected_sgl)


def test_prompt_length_and_feature_sizes(cohort):
    model = build("bd", prompt_length=7)
    assert model.prompt.x.shape == (7,)
    sizes = [m.out_features for m in model.prompt.mapping if hasattr(m, "out_features")]
    assert sizes == [100, 50, SMALL["clinical_dim"]]
    assert model.proj_mul.out_features == model.proj_sgl.out_features == 64
    wsi = build("bd_wsi")
    assert wsi.prompt(2).shape == (2, SMALL["hidden_dim"])  # the prompt stands in for the slide feature
    assert not hasattr(wsi, "pool_sgl")


# ---------------------------------------------------------------- two-stage and meta-learning baselines


def test_stage_parameters_are_disjoint_for_two_stage_methods():
    for method in ("ae", "ensemble"):
        model = build(method)
        first, second = (set(map(id, model.stage_parameters(s))) for s in model.stages())
        assert first and second and not first & second
        assert first | second == set(map(id, model.parameters()))


def test_ae_second_stage_trains_only_the_autoencoder(cohort):
    model = build("ae")
    out = model.losses(cohort.batch(np.arange(4)), "autoencoder")
    out["loss"].backward()
    moved = grads_by_module(model)
    assert moved.pop("autoencoder") and not any(moved.values())


def test_smil_priors_and_meta_gradient(cohort):
    model = build("smil")
    model.setup(torch.from_numpy(cohort.clinical))
    assert model.priors.abs().sum() > 0
    batch = cohort.batch(np.arange(6))
    weights = torch.softmax(model.recon(model.pool(batch.features, batch.offsets)[0]), 1)
    torch.testing.assert_close(model.reconstruct(model.pool(batch.features, batch.offsets)[0]), weights @ model.priors)
    out = model.losses(batch, "main")
    out["meta_ce"].backward()
    moved = grads_by_module(model)
    assert moved["recon"] and moved["regulariser"] and moved["head"] and moved["pool"]


# ---------------------------------------------------------------- standardisation, S->M, filling


def test_patch_standardisation_is_applied_before_the_instance_layer():
    pool = AttentionPool(DIM, 8, None)
    x = torch.randn(20, DIM) * 0.15 + 0.11  # the scale of a random-weight encoder's features
    mean, std = x.mean(0), x.std(0, unbiased=False)
    plain = pool.instances((x - mean) / std)
    pool.feature_mean.copy_(mean)
    pool.feature_std.copy_(std)
    torch.testing.assert_close(pool.instances(x), plain)
    assert {"feature_mean", "feature_std"} <= {n.split(".")[-1] for n in pool.state_dict()}  # saved with the model


def test_standardise_sets_every_slide_pooling():
    model = build("bd")
    model.standardise(torch.full((DIM,), 2.0), torch.full((DIM,), 3.0))
    for pool in (model.pool_mul, model.pool_sgl):
        assert torch.equal(pool.feature_mean, torch.full((DIM,), 2.0))
        assert torch.equal(pool.feature_std, torch.full((DIM,), 3.0))


def _fitted_bd(cohort, **kw):
    model = build("bd", **kw)
    model.fit_statistics([cohort.batch(np.arange(cohort.n_patients))])
    return model


def test_s2m_term_is_not_trivially_zero_at_initialisation(cohort):
    """S->M's weighted share of L_mul at initialisation is at least 5 %, and shrinking M_mul to
    zero does not make the term vanish (both projections are standardised)."""
    model = _fitted_bd(cohort, lambda_m=0.6)
    batch = cohort.batch(np.arange(cohort.n_patients))
    out = model.losses(batch, "joint")
    share = model.loss_shares({k: float(v.detach()) for k, v in out.items()})["share_mul_distill"]
    assert share >= 0.05, share
    with torch.no_grad():
        model.proj_mul.weight.zero_()
        model.proj_mul.bias.zero_()
    model.eval()
    shrunk = model.losses(batch, "joint")["mul_distill"].item()
    assert shrunk >= 0.95  # a constant student scores at least 1 per dimension (unit-variance teacher)


def test_s2m_teacher_statistics_update_only_in_training_steps(cohort):
    model = _fitted_bd(cohort)
    before = model.teacher_mean.clone(), model.student_mean.clone()
    model.eval()
    model.losses(cohort.batch([0, 1]), "joint")
    assert torch.equal(model.teacher_mean, before[0]) and torch.equal(model.student_mean, before[1])
    model.train()
    model.losses(cohort.batch([0, 1]), "joint")
    assert not torch.equal(model.teacher_mean, before[0]) and not torch.equal(model.student_mean, before[1])
    off = _fitted_bd(cohort, directions="m2s").train()
    kept = off.teacher_mean.clone()
    off.losses(cohort.batch([0, 1]), "joint")
    assert torch.equal(off.teacher_mean, kept)  # S->M off: nothing to track


def test_loss_shares_add_up_per_branch(cohort):
    model = _fitted_bd(cohort)
    out = {k: float(v.detach()) for k, v in model.losses(cohort.batch(np.arange(6)), "joint").items()}
    shares = model.loss_shares(out)
    assert shares["share_mul_ce"] + shares["share_mul_distill"] == pytest.approx(1.0)
    assert shares["share_sgl_ce"] + shares["share_sgl_mse"] + shares["share_sgl_kl"] == pytest.approx(1.0)
    none = build("bd", directions="none").loss_shares(out)
    assert none["share_mul_distill"] == 0 and none["share_sgl_mse"] == 0 and none["share_mul_ce"] == 1


@pytest.mark.parametrize("method", ["filling", "clinical_only"])
def test_filled_clinical_input_says_missing_in_the_indicator_columns(cohort, method):
    """Filling's zero vector is zeros after scaling in the value columns, 1 in the indicators."""
    model = build(method).eval()
    columns = ["age", "age_missing", "er", "er_missing"]
    model.set_clinical_columns(columns)
    assert model.clinical_fill.tolist() == [0.0, 1.0, 0.0, 1.0]
    seen = []
    model.clin.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    with torch.no_grad():
        model.predict(cohort.batch([0, 1], clinical_present=np.array([False, True])))
    assert seen[0][0].tolist() == [0.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(seen[0][1], torch.from_numpy(cohort.clinical[1]))


# ---------------------------------------------------------------- modality dropout


def test_modality_dropout_uses_the_learned_token_when_clinical_data_is_missing(cohort):
    model = build("modality_dropout").eval()
    n = cohort.n_patients
    absent = cohort.batch(np.arange(n), clinical_present=np.zeros(n, bool))
    with torch.no_grad():
        f_c = model.clinical_feature(absent, ~absent.clinical_present)
        before = model.predict(absent)[0]
        model.missing_token.add_(1.0)  # the prediction without clinical data moves with the token
        after = model.predict(absent)[0]
        complete = cohort.batch(np.arange(n))
        same = model.predict(complete)[0]
        model.missing_token.sub_(1.0)
        torch.testing.assert_close(model.predict(complete)[0], same)  # ... and with it only
    torch.testing.assert_close(f_c, model.missing_token.expand(n, -1))
    assert model.missing_token.abs().sum() > 0  # a learned vector, not zeros
    assert not torch.allclose(before, after)


def test_modality_dropout_token_gets_gradient_only_from_dropped_bags(cohort):
    model = build("modality_dropout", modality_dropout_rate=0.5)
    batch = cohort.batch(np.arange(cohort.n_patients))
    torch.manual_seed(1)
    model.losses(batch, "main")["loss"].backward()
    assert model.missing_token.grad is not None and model.missing_token.grad.abs().sum() > 0
    never = build("modality_dropout", modality_dropout_rate=0.0)
    never.losses(batch, "main")["loss"].backward()
    assert never.missing_token.grad is None or never.missing_token.grad.abs().sum() == 0
    assert next(never.clin.parameters()).grad.abs().sum() > 0


def test_modality_dropout_drops_at_the_rate_and_is_seeded(cohort):
    model = build("modality_dropout", modality_dropout_rate=0.5)
    big = cohort.batch(np.resize(np.arange(cohort.n_patients), 4000))
    torch.manual_seed(5)
    first = model.drop_mask(big)
    torch.manual_seed(5)
    again = model.drop_mask(big)
    torch.manual_seed(6)
    other = model.drop_mask(big)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.float().mean().item() - 0.5) < 0.03
    absent = cohort.batch(np.arange(4), clinical_present=np.zeros(4, bool))
    assert build("modality_dropout", modality_dropout_rate=0.0).drop_mask(absent).all()  # absent: always the token
    with pytest.raises(ConfigError, match="modality_dropout_rate"):
        build("modality_dropout", modality_dropout_rate=1.0)
