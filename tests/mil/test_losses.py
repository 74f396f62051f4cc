"""Each loss term of eqs. (2)-(6) against a hand-computed value, and the detach routing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bd.mil.losses import (
    classification_loss,
    feature_mse,
    frozen_call,
    kl_distillation,
    multi_modal_loss,
    single_modal_loss,
    standardise,
    standardise_teacher,
)


def softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def test_classification_loss_is_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_feature_mse_is_mean_over_all_elements():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert feature_mse(a, b).item() == pytest.approx((0 + 4 + 9 + 0) / 4)


def test_kl_is_teacher_to_student_at_temperature_times_tau_squared():
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    tau = 2.0
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        ps, pt = softmax2(s[0] / tau, s[1] / tau), softmax2(t[0] / tau, t[1] / tau)
        total += sum(q * math.log(q / p) for q, p in zip(pt, ps))
    expected = total / 2 * tau**2
    assert kl_distillation(student, teacher, tau).item() == pytest.approx(expected, rel=1e-5)
    assert kl_distillation(teacher, teacher, tau).item() == pytest.approx(0.0, abs=1e-7)


def test_frozen_call_passes_gradient_to_inputs_only():
    layer = nn.Linear(2, 1)
    x = torch.ones(1, 2, requires_grad=True)
    frozen_call(layer, x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(x.grad, layer.weight.detach())


def test_multi_modal_loss_eq4_and_teacher_is_detached():
    logits = torch.tensor([[0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([1])
    student = torch.tensor([[1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0]], requires_grad=True)
    out = multi_modal_loss(logits, labels, student, teacher, lambda_m=0.6)
    ce = math.log(1 + math.exp(-1.0))
    assert out["mul_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["mul_distill"].item() == pytest.approx(2.5)
    assert out["mul"].item() == pytest.approx(ce + 0.6 * 2.5, rel=1e-6)
    out["mul"].backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, 0.6 * 2 * (student - teacher).detach() / 2)
    assert multi_modal_loss(logits, labels, student, teacher, 0.0)["mul"].item() == pytest.approx(ce, rel=1e-6)


def _single(lambda_s: float = 0.5, prompt_first: bool = False):
    torch.manual_seed(0)
    head = nn.Linear(3, 2)
    logits = torch.tensor([[0.5, -0.5]], requires_grad=True)
    kept = torch.tensor([[1.0, 2.0]], requires_grad=True)
    prompt = torch.tensor([[0.5]], requires_grad=True)
    t_kept = torch.tensor([[0.0, 2.0]], requires_grad=True)
    t_missing = torch.tensor([[1.5]], requires_grad=True)
    t_logits = torch.tensor([[1.0, 0.0]], requires_grad=True)
    out = single_modal_loss(logits, torch.tensor([0]), kept=kept, prompt=prompt, teacher_kept=t_kept,
                            teacher_missing=t_missing, teacher_logits=t_logits, classifier=head,
                            lambda_s=lambda_s, tau=1.2, prompt_first=prompt_first)
    return out, head, (logits, kept, prompt, t_kept, t_missing, t_logits)


@pytest.mark.parametrize("prompt_first", [False, True])
def test_single_modal_loss_eq5_eq6_values(prompt_first):
    out, head, (logits, kept, prompt, t_kept, t_missing, t_logits) = _single(prompt_first=prompt_first)
    ce = math.log(1 + math.exp(-1.0))
    mse = 1.0 / 3  # the prompt half of [1, 2, .5] vs [0, 2, 1.5]: (.5 - 1.5)^2 over the width 3
    student = torch.cat([prompt, kept] if prompt_first else [kept, prompt], 1).detach()
    s = head(student)[0].tolist()
    ps, pt = softmax2(s[0] / 1.2, s[1] / 1.2), softmax2(1 / 1.2, 0.0)
    kl = sum(q * math.log(q / p) for q, p in zip(pt, ps)) * 1.2**2
    assert out["sgl_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["sgl_mse"].item() == pytest.approx(mse, rel=1e-6)
    assert out["sgl_kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["sgl_distill"].item() == pytest.approx(mse + kl, rel=1e-5)
    assert out["sgl"].item() == pytest.approx(ce + 0.5 * (mse + kl), rel=1e-5)


def test_single_modal_distillation_reaches_only_the_prompt():
    out, head, (logits, kept, prompt, t_kept, t_missing, t_logits) = _single()
    out["sgl_distill"].backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    for t in (kept, t_kept, t_missing, t_logits, logits):
        assert t.grad is None
    assert head.weight.grad is None and head.bias.grad is None


def test_single_modal_classification_part_trains_the_branch_not_the_teacher():
    out, head, (logits, kept, prompt, t_kept, t_missing, t_logits) = _single()
    out["sgl"].backward()
    assert logits.grad is not None
    assert t_kept.grad is None and t_missing.grad is None and t_logits.grad is None
    assert kept.grad is None  # only through the logits, which the caller owns


def test_lambda_zero_switches_distillation_off():
    out, *_ = _single(lambda_s=0.0)
    assert out["sgl"].item() == pytest.approx(out["sgl_ce"].item())


def test_eq5_mse_drops_only_the_constant_slide_half():
    """The logged MSE is eq. (5)'s minus its constant (detached) slide half; same gradient."""
    out, head, (logits, kept, prompt, t_kept, t_missing, t_logits) = _single()
    full = feature_mse(torch.cat([kept.detach(), prompt], 1), torch.cat([t_kept, t_missing], 1).detach())
    constant = ((kept - t_kept) ** 2).sum().item() / 3
    assert out["sgl_mse"].item() == pytest.approx(full.item() - constant, rel=1e-6)
    g_ours = torch.autograd.grad(out["sgl_mse"], prompt)[0]
    g_full = torch.autograd.grad(full, prompt)[0]
    torch.testing.assert_close(g_ours, g_full)


def test_standardised_teacher_cannot_be_matched_by_shrinking():
    """S->M against the standardised teacher: a zero (shrunk) student scores 1 per dimension, and
    only a student carrying the teacher's variation scores less."""
    gen = torch.Generator().manual_seed(0)
    teacher = 0.01 * torch.randn(200, 8, generator=gen) + 3.0  # small spread, far from zero
    mean, var = teacher.mean(0), teacher.var(0, unbiased=False)
    target = standardise_teacher(teacher, mean.clone(), var.clone(), momentum=None)
    assert feature_mse(torch.zeros_like(target), target).item() == pytest.approx(1.0, rel=1e-4)
    assert feature_mse(torch.full_like(target, 3.0), target).item() > 1.0  # the raw teacher's mean
    assert feature_mse(target * 0.9, target).item() < 0.02


def test_standardised_teacher_running_statistics_follow_the_batches():
    mean, var = torch.zeros(3), torch.ones(3)
    batch = torch.tensor([[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    standardise_teacher(batch, mean, var, momentum=0.5)
    torch.testing.assert_close(mean, torch.full((3,), 1.5))
    torch.testing.assert_close(var, torch.full((3,), 0.5 + 0.5 * 10.0))  # spread around the old mean 0
    before = mean.clone()
    standardise_teacher(batch, mean, var, momentum=None)  # evaluation: statistics unchanged
    torch.testing.assert_close(mean, before)


def test_standardised_student_passes_gradient_through_constant_statistics():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)
    mean, var = torch.tensor([2.0, 4.0]), torch.tensor([4.0, 16.0])
    z = standardise(x, mean, var, momentum=None)
    torch.testing.assert_close(z, torch.tensor([[-0.5, -0.5], [0.5, 0.5]]))
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.25], [0.5, 0.25]]))
