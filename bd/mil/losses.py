"""The loss terms of the paper's equations (2)-(6), with the gradient routing of Section II.

Bidirectional distillation trains two branches at once:

* multi-modal branch (eq. 4): ``L_mul = CE(G_mul([f_wm, f_c]), y) + lambda_m * MSE(z(M_mul(f_wm)),
  z(M_sgl(f_ws)))`` -- S->M: the single-modal slide feature is the *teacher*, so its side is
  detached and only the multi-modal branch learns from the term. ``z`` standardises each
  projection per dimension with its own running statistics over the training patients (see
  :func:`standardise`), so that the term cannot be satisfied by shrinking, by a drifting mean or
  by matching a near-constant teacher: a constant student scores 1 per dimension, and only one
  whose ``f_wm`` carries the patient-to-patient variation of ``f_ws`` scores less (for unit-variance
  sides the MSE is 2 (1 - correlation) per dimension);
* single-modal branch (eq. 6): ``L_sgl = CE(G_sgl([f_ws, f_p]), y) + lambda_s * (MSE([f_ws, f_p],
  [f_wm, f_c]) + KL(G_mul || G_sgl at temperature tau))`` -- M->S: the multi-modal branch is frozen
  (detached), and the distillation part reaches *only the prompt path*: ``f_ws`` is detached inside
  it and ``G_sgl`` is applied with detached parameters, so the gradient passes through the
  classifier to ``f_p`` without changing the classifier. The classification part ``CE`` trains
  the whole single-modal branch (``H_sgl``, ``G_sgl`` and the prompt path). With both slide
  halves detached, the ``f_ws`` vs ``f_wm`` part of eq. (5)'s MSE is a constant; it is left out
  (the prompt half keeps the gradient of the full MSE: squared error over the concatenated width).

Because neither loss has a path into the other branch, one backward pass of ``L_mul + L_sgl``
gives each branch exactly the gradient of its own loss (the same as two optimisers stepping in
turn on the same forward pass). Losses are means over the batch (the paper writes sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (2): cross-entropy of two-class logits [B, 2] against labels [B]."""
    return F.cross_entropy(logits, labels)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The distance D of eqs. (3) and (5): mean squared error over all elements."""
    return F.mse_loss(student, teacher)


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) between softmax(logits / tau), times tau^2 (Hinton et al.), so that
    the gradient scale does not shrink as tau grows; averaged over the batch. The paper's
    ``KL(G_sgl, G_mul)`` is read in PyTorch's ``kl_div(input, target)`` order: the multi-modal
    teacher's distribution is the target."""
    log_student = F.log_softmax(student_logits / tau, dim=1)
    log_teacher = F.log_softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * tau**2


def frozen_call(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``module(*inputs)`` with its parameters detached: gradients reach the inputs only."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, inputs)


def standardise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, momentum: float | None) -> torch.Tensor:
    """``(x - mean) / sqrt(var)`` per dimension, the statistics treated as constants (gradients
    reach ``x`` only). With ``momentum`` (training), the running ``mean`` and ``var`` buffers are
    first moved toward this batch's statistics (in place, like batch normalisation's running
    statistics; a batch of one updates the mean and the spread around the running mean), so they
    follow the branch as it learns."""
    if momentum:
        with torch.no_grad():
            values = x.detach().float()
            batch_var = ((values - mean) ** 2).mean(0)
            mean.mul_(1 - momentum).add_(momentum * values.mean(0))
            var.mul_(1 - momentum).add_(momentum * batch_var)
    return (x.float() - mean) / var.clamp_min(1e-8).sqrt()


def standardise_teacher(teacher: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                        momentum: float | None) -> torch.Tensor:
    """:func:`standardise` of the detached teacher: a target with zero mean and unit variance
    per dimension over the training patients, whatever the teacher's own scale."""
    return standardise(teacher.detach(), mean, var, momentum)


def multi_modal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    projected: torch.Tensor,
    teacher_projected: torch.Tensor,
    lambda_m: float,
) -> dict[str, torch.Tensor]:
    """Eq. (4): ``L_mul = CE + lambda_m * MSE(M_mul(f_wm), teacher)``; the teacher side (the caller
    passes the standardised ``M_sgl(f_ws)``) is detached, so S->M moves only the multi-modal
    branch. ``lambda_m = 0`` switches S->M off."""
    ce = classification_loss(logits, labels)
    distill = feature_mse(projected, teacher_projected.detach())
    return {"mul_ce": ce, "mul_distill": distill, "mul": ce + lambda_m * distill if lambda_m else ce}


def single_modal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kept: torch.Tensor,
    prompt: torch.Tensor,
    teacher_kept: torch.Tensor,
    teacher_missing: torch.Tensor,
    teacher_logits: torch.Tensor,
    classifier: nn.Module,
    lambda_s: float,
    tau: float,
    prompt_first: bool = False,
) -> dict[str, torch.Tensor]:
    """Eq. (6): ``L_sgl = CE + lambda_s * (MSE([f_ws, f_p], [f_wm, f_c]) + KL)`` (eq. 5).

    ``kept`` is the single-modal branch's own feature (``f_ws``; the clinical feature in the
    slide-missing variant, where the prompt comes first: ``prompt_first``); ``prompt`` is ``f_p``.
    The multi-modal side is detached, ``kept`` is detached and ``classifier`` (``G_sgl``) runs
    with detached parameters inside the distillation part, so that part updates the prompt path
    only. The MSE is the prompt half of eq. (5)'s: squared error of ``f_p`` against the teacher's
    missing-modality feature, divided by the concatenated width (the kept half, detached on both
    sides, is a constant and is left out; the gradient is that of the full MSE). ``teacher_kept``
    is not part of any gradient; it stays an argument for callers that log it.
    ``lambda_s = 0`` switches M->S off.
    """
    ce = classification_loss(logits, labels)
    parts = [prompt, kept.detach()] if prompt_first else [kept.detach(), prompt]
    student = torch.cat(parts, dim=1)
    width = kept.shape[1] + prompt.shape[1]
    mse = ((prompt - teacher_missing.detach()) ** 2).sum() / (prompt.shape[0] * width)
    kl = kl_distillation(frozen_call(classifier, student), teacher_logits.detach(), tau)
    distill = mse + kl
    return {
        "sgl_ce": ce,
        "sgl_mse": mse,
        "sgl_kl": kl,
        "sgl_distill": distill,
        "sgl": ce + lambda_s * distill if lambda_s else ce,
    }
