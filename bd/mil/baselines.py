"""The baselines of Table I (image only, clinical only, Filling, AE, Ensemble, SMIL) and modality
dropout, each registered under its method name."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from bd.mil.bags import Batch
from bd.errors import ConfigError
from bd.mil.losses import (
    classification_loss,
    feature_mse,
)

from bd.mil.base import (
    COMPLETE, NO_CLINICAL, MILModel, Stage, _dtype, branch_names, classifier, clinical_encoder, pick, probs_of,
    register,
)
from bd.mil.pooling import AttentionPool, mlp

log = logging.getLogger(__name__)



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
