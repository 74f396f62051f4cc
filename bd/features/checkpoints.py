"""Encoder checkpoints from a local file: timm's keys (bare, or under ``state_dict``/``model``,
with ``module.``/``model.``/``backbone.``/``trunk.`` prefixes: the published UNI, UNI2-h, Virchow2
and H-optimus-0 files) or a Hugging Face transformers DINOv2 layout (Phikon-v2), mapped onto
timm's ViT; position embeddings are resized to the model's grid."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from bd.errors import ConfigError


KEY_PREFIXES = ("module.", "model.", "backbone.", "trunk.", "dinov2.")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.bin/.safetensors checkpoint (timm unwraps state_dict/model, module.)."""
    import timm.models

    if not path.is_file():
        raise ConfigError(f"features.weights: file {path} does not exist")
    try:
        state = timm.models.load_state_dict(str(path), device="cpu")
    except Exception as exc:  # pickle, zip and safetensors errors
        raise ConfigError(f"features.weights: cannot read {path} as a checkpoint ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
        state = state["teacher"]  # DINO training checkpoints
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_hf_dinov2(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def dinov2_to_timm(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Map a Hugging Face transformers DINOv2 state dict (Phikon-v2) onto timm's ViT keys."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    if "embeddings.register_tokens" in state:
        raise ConfigError(f"features.weights: {path} is a transformers DINOv2 with registers; only plain "
                          "DINOv2 layouts (Phikon-v2) are mapped to timm")
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1",
             "mlp.weights_out": "mlp.fc2"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
        if m is None:
            if key != "embeddings.mask_token":
                out[key] = value  # left as is: reported as unexpected if the model lacks it
            continue
        i, module, kind = int(m[1]), m[2], m[3]
        if module.startswith("attention.attention."):
            qkv.setdefault((i, kind), {})[module.rsplit(".", 1)[-1]] = value
        elif module in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{i}.ls{module[-1]}.gamma"] = value
        elif module in block:
            out[f"blocks.{i}.{block[module]}.{kind}"] = value
        else:
            out[key] = value
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def fit_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resample a checkpoint's absolute position embedding to the model's patch grid (bicubic, as
    transformers' DINOv2 does at run time) when the two differ."""
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict().get("pos_embed")
    theirs = state.get("pos_embed")
    if own is None or theirs is None or own.shape == theirs.shape:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        return
    state["pos_embed"] = resample_abs_pos_embed(theirs, list(grid), num_prefix_tokens=prefix,
                                                interpolation="bicubic", antialias=False)


def strip_prefix(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Drop the wrapper prefix (``module.``, ``model.``...) under which most keys match ``own``."""
    best, hits = state, len(own & set(state))
    for prefix in KEY_PREFIXES:
        cut = {k.removeprefix(prefix): v for k, v in state.items()}
        n = len(own & set(cut))
        if n > hits:
            best, hits = cut, n
    return best


def _load_weights(model: nn.Module, path: Path, full_keys: set[str], classifier: str) -> None:
    """Load ``path`` into ``model``: every kept parameter must be there (strict on kept layers);
    extra keys are accepted only for pruned stages, the classifier and a DINO mask token."""
    state = read_checkpoint(path)
    if is_hf_dinov2(state):
        state = dinov2_to_timm(state, path)
    own = set(model.state_dict())
    state = strip_prefix(state, own)
    fit_pos_embed(state, model)
    missing = sorted(own - set(state))
    foreign = sorted(
        k for k in set(state) - own
        if k not in full_keys and not k.startswith(classifier + ".") and k != "mask_token"
    )
    if missing or foreign:
        what = f"missing {missing[:5]}" if missing else f"unexpected {foreign[:5]}"
        raise ConfigError(
            f"features.weights: {path} does not match the encoder ({what}; {len(missing)} missing, "
            f"{len(foreign)} unexpected); check features.encoder, features.out_stage and "
            "features.model_kwargs (e.g. init_values for LayerScale keys ls1.gamma)"
        )
    try:
        model.load_state_dict({k: state[k] for k in own}, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"features.weights: {path} does not fit the encoder: {exc}") from exc
