"""Bidirectional distillation (Section II) and its slide-missing variant (Section III-E)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from bd.mil.bags import Batch
from bd.errors import ConfigError
from bd.mil.losses import (
    multi_modal_loss,
    single_modal_loss,
    standardise,
    standardise_teacher,
)

from bd.mil.base import (
    COMPLETE, DIRECTIONS, NO_CLINICAL, NO_SLIDE, PROJECTION_DIM, MILModel, Prompt, Stage, _dtype, branch_names,
    classifier, clinical_encoder, pick, probs_of, register,
)
from bd.mil.pooling import AttentionPool, attention_pools

log = logging.getLogger(__name__)



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
        if single and self.missing == "clinical":  # both slide encoders on the same patches at once
            (f_wm, _), (f_ws, _) = attention_pools((self.pool_mul, self.pool_sgl), batch.features, batch.offsets)
        else:
            f_wm, f_ws = self.pool_mul(batch.features, batch.offsets)[0], None
        f_c = self.clin_mul(batch.clinical)
        out = {"f_wm": f_wm, "f_c": f_c, "logits_mul": self.head_mul(torch.cat([f_wm, f_c], 1))}
        if single:
            out.update(self.single_branch(batch, f_ws))
        return out

    def single_branch(self, batch: Batch, f_ws: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The single-modal branch's features and logits; ``f_ws``: its slide feature when computed already."""
        f_p = self.prompt(batch.size)
        if self.missing == "clinical":
            f_ws = self.pool_sgl(batch.features, batch.offsets)[0] if f_ws is None else f_ws
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
