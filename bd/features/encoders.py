"""Patch encoders: any timm model by name, a pathology foundation-model preset, or an ``hf-hub:``
name resolved from a local folder; weights come from a local file (compute nodes are often
offline) or, only when asked, are random. Nothing here touches the network.

The default in WSI work is ResNet50 truncated after ``layer3`` with global average pooling
(1024-d). ``out_stage`` names a module of the model's ``feature_info`` (``layer3``, ``stages.2``,
``blocks.8``...); ``None`` keeps the whole network and its own pooled features (a ViT's class
token, or ``pool: cls+mean``: the class token next to the mean of the patch tokens, as Virchow2).
Later stages and the classifier are pruned, so their weights are neither needed nor computed.

Checkpoints (.pth, .pt, .bin or .safetensors) may hold timm's keys (bare, or under
``state_dict``/``model``, with ``module.``/``model.``/``backbone.``/``trunk.`` prefixes: the
published UNI, UNI2-h, Virchow2 and H-optimus-0 files) or a Hugging Face transformers DINOv2
layout (Phikon-v2), whose keys are mapped onto timm's ViT (:mod:`bd.features.checkpoints`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bd.errors import ConfigError
from bd.features.checkpoints import _load_weights
from bd.io import file_sha256

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random weights are seeded, so a rerun gives the same features
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POOLS = ("model", "cls+mean")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".tar")
HUB = "hf-hub:"


@dataclass(frozen=True)
class Preset:
    """A published encoder: its timm architecture and arguments, input normalisation, pooling,
    feature size, checkpoint layout and Hugging Face repository."""

    architecture: str
    model_kwargs: dict[str, Any]
    feature_dim: int
    hub_id: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pool: str = "model"


PRESETS: dict[str, Preset] = {
    "uni": Preset("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                            "dynamic_img_size": True}, 1024, "MahmoodLab/UNI"),
    "uni2-h": Preset("vit_giant_patch14_224", {
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
        "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
        "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True}, 1536, "MahmoodLab/UNI2-h"),
    "virchow2": Preset("vit_huge_patch14_224", {
        "img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
        "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        2560, "paige-ai/Virchow2", pool="cls+mean"),
    "h-optimus-0": Preset("vit_giant_patch14_reg4_dinov2", {
        "img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
        1536, "bioptimus/H-optimus-0", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
    "phikon-v2": Preset("vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
                        1024, "owkin/phikon-v2"),  # a transformers DINOv2 ViT-L/16: keys mapped to timm
}
LAYER_KEYS = ("mlp_layer", "act_layer", "norm_layer")


@dataclass
class Spec:
    """What to build: timm architecture and arguments, normalisation, pooling, and where from."""

    name: str  # as configured: timm name, preset name or hf-hub:org/name
    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pool: str = "model"
    feature_dim: int | None = None  # the published size (presets)
    weights: Path | None = None


class Encoder(nn.Module):
    """A timm backbone returning one pooled vector per image: (B, 3, H, W) -> (B, feature_dim)."""

    def __init__(
        self, model: nn.Module, stage_index: int | None, feature_dim: int, weights_id: str,
        pool: str = "model", architecture: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.stage_index = stage_index
        self.feature_dim = feature_dim
        self.weights_id = weights_id  # SHA-256 of the weights file, or "random"
        self.pool = pool
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage_index is not None:
            (fmap,) = self.model.forward_intermediates(
                x, indices=[self.stage_index], intermediates_only=True
            )
            return fmap.mean(dim=(2, 3))  # global average pooling
        if self.pool == "cls+mean":  # class token next to the mean of the patch tokens (Virchow)
            tokens = self.model.forward_features(x)
            return torch.cat([tokens[:, 0], tokens[:, self.model.num_prefix_tokens :].mean(1)], dim=-1)
        return self.model(x)  # timm model with num_classes=0: pooled pre-logits features


# --- what to build ---------------------------------------------------------------------------


def preset_for(name: str) -> Preset | None:
    """The preset named ``name``, or the one published under ``hf-hub:<its repository>``."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    if key.startswith(HUB):
        return next((p for p in PRESETS.values() if p.hub_id.lower() == key[len(HUB):]), None)
    return None


def hub_cache_folder(repo_id: str) -> Path:
    """Where Hugging Face's cache keeps ``repo_id`` (HF_HUB_CACHE / HF_HOME honoured)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def hub_folder(repo_id: str, weights: Path | None) -> Path:
    """The local folder of Hugging Face model ``repo_id``: ``weights`` when it is a folder (or the
    folder of a weights file), else its snapshot in the local cache. Never downloads."""
    if weights is not None:
        folder = weights if weights.is_dir() else weights.parent
        if not folder.is_dir():
            raise ConfigError(f"features.weights: folder {folder} does not exist")
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends: never a network call
        raise ConfigError(
            f"features.encoder: {repo_id} is not in the local Hugging Face cache "
            f"({hub_cache_folder(repo_id)} is absent or incomplete; no network is used). On a machine "
            f"with network access run `hf download {repo_id} --local-dir DIR`, copy DIR here and set "
            f"features.weights: DIR (or fill the cache there and copy it)"
        ) from exc


def weights_in_folder(folder: Path) -> Path:
    """The checkpoint file of a downloaded model folder."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(found) == 1:
        return found[0]
    raise ConfigError(
        f"features.weights: no single checkpoint in {folder} (looked for {', '.join(WEIGHT_FILES)}; "
        f"found {[p.name for p in found]}); name the file in features.weights"
    )


def hub_config(folder: Path, repo_id: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """timm's ``config.json`` of a hub model folder: architecture, model_args, pretrained_cfg."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"features.encoder: hf-hub:{repo_id}: {path} does not exist (a timm model "
                          "folder holds config.json next to its weights)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"features.encoder: {path}: not readable JSON ({exc})") from exc
    arch = cfg.get("architecture")
    if not isinstance(arch, str):
        kind = cfg.get("model_type") or cfg.get("architectures")
        raise ConfigError(
            f"features.encoder: {path} is not a timm model config (no 'architecture'"
            + (f"; a transformers {kind} model: use a preset such as phikon-v2, or a timm encoder name "
               "with features.model_kwargs" if kind else "") + ")")
    return arch, dict(cfg.get("model_args") or {}), dict(cfg.get("pretrained_cfg") or {})


def resolve_spec(
    name: str, model_kwargs: dict[str, Any] | None, weights: str | os.PathLike[str] | None,
    random_weights: bool,
) -> Spec:
    """Encoder name + overrides -> what to build and which weights file to load (``None``: random)."""
    path = Path(weights) if weights is not None else None
    preset = preset_for(name)
    user = dict(model_kwargs or {})
    if preset is not None:
        spec = Spec(name, preset.architecture, {**preset.model_kwargs, **user}, preset.mean, preset.std,
                    preset.pool, preset.feature_dim)
        if path is not None and path.is_dir() or path is None and not random_weights:
            spec.weights = weights_in_folder(hub_folder(preset.hub_id, path))
        else:
            spec.weights = path
        return spec
    if name.startswith(HUB):
        repo_id = name[len(HUB):]
        folder = hub_folder(repo_id, path)
        arch, args, pretrained = hub_config(folder, repo_id)
        mean, std = pretrained.get("mean"), pretrained.get("std")
        spec = Spec(name, arch, {**args, **user}, tuple(mean) if mean else None, tuple(std) if std else None)
        if not random_weights:
            spec.weights = path if path is not None and path.is_file() else weights_in_folder(folder)
        return spec
    return Spec(name, name, user, weights=weights_in_folder(path) if path is not None and path.is_dir() else path)


def layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer classes named in ``model_kwargs`` (``SwiGLUPacked``, ``torch.nn.SiLU``...) -> classes."""
    import timm.layers

    known = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SwiGLU": timm.layers.SwiGLU,
             "GluMlp": timm.layers.GluMlp, "Mlp": timm.layers.Mlp, "SiLU": nn.SiLU, "GELU": nn.GELU,
             "LayerNorm": nn.LayerNorm}
    out = {k: _number(v) for k, v in kwargs.items()}
    for key in LAYER_KEYS:
        value = out.get(key)
        if not isinstance(value, str):
            continue
        short = value.rsplit(".", 1)[-1]
        if short in known:
            out[key] = known[short]
        elif key == "mlp_layer":
            raise ConfigError(f"features.model_kwargs.mlp_layer: {value!r} is not one of {sorted(known)}")
    return out


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML, Snakemake) reads ``1e-5`` as text: such a string is taken as the number."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def json_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with layer classes as their names: for store attributes."""
    return {k: getattr(v, "__name__", None) or str(v) if callable(v) else v for k, v in kwargs.items()}


def normalisation(spec: Spec, model: nn.Module, mean: Any, std: Any) -> dict[str, Any]:
    """The data config: timm's for the model, then the spec's (preset, hub), then the overrides."""
    import timm.data

    config = dict(timm.data.resolve_data_config({}, model=model))
    for key, value in (("mean", spec.mean), ("std", spec.std), ("mean", mean), ("std", std)):
        if value is not None:
            config[key] = tuple(float(v) for v in value)
    for key in ("mean", "std"):
        value = config[key]
        if len(value) != 3 or key == "std" and min(value) <= 0:
            raise ConfigError(f"features.{key}: expected 3 numbers (R, G, B){' > 0' if key == 'std' else ''}, "
                              f"got {list(value)}")
    return config


# --- building --------------------------------------------------------------------------------


def _build(spec: Spec) -> nn.Module:
    import timm

    kwargs = {**layer_kwargs(spec.kwargs), "num_classes": 0}
    if spec.architecture.startswith(HUB):
        raise ConfigError(f"features.encoder: {spec.architecture}: nested hub names are not supported")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return timm.create_model(spec.architecture, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model"
        raise ConfigError(f"features.encoder: {exc}") from exc
    except (TypeError, ValueError, AssertionError) as exc:  # an argument it does not take, or a bad value
        raise ConfigError(f"features.model_kwargs: {spec.architecture} does not accept "
                          f"{json_kwargs(spec.kwargs)} ({type(exc).__name__}: {exc})") from exc


def _check_input_size(model: nn.Module, name: str, input_size: int | None) -> None:
    """A ViT without ``dynamic_img_size`` takes only its own image size: say so before extraction."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if input_size is None or size is None or getattr(model, "dynamic_img_size", False):
        return
    if not getattr(embed, "strict_img_size", True):
        return
    if tuple(size) != (input_size, input_size):
        raise ConfigError(
            f"features.input_size: {name} takes {size[0]} x {size[1]} inputs, not {input_size}; set "
            f"features.input_size: {size[0]} or features.model_kwargs.dynamic_img_size: true"
        )


def _pooled_dim(model: nn.Module, name: str, pool: str) -> int:
    if pool == "model":
        return int(model.num_features)
    if not hasattr(model, "forward_features") or not hasattr(model, "num_prefix_tokens"):
        raise ConfigError(f"features.pool: cls+mean needs a ViT-family model with a class token; "
                          f"{name} has none (use pool: model)")
    return 2 * int(model.num_features)


def create_encoder(
    name: str,
    out_stage: str | None = "layer3",
    weights: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    *,
    model_kwargs: dict[str, Any] | None = None,
    mean: Any = None,
    std: Any = None,
    pool: str | None = None,
    input_size: int | None = None,
) -> tuple[Encoder, dict[str, Any]]:
    """Build encoder ``name`` (timm name, preset or ``hf-hub:`` folder) in eval mode and its data
    config (mean, std...; ``features.mean``/``std`` override it). ``encoder.weights_id`` is the
    weights file's SHA-256, or ``"random"``; ``data_config['encoder_args']`` the timm arguments."""
    if weights is None and not random_weights and preset_for(name) is None and not name.startswith(HUB):
        raise ConfigError(
            "features.weights: no weights file given; name a local checkpoint "
            "(features.weights) or set features.random_weights: true (demo only)"
        )
    spec = resolve_spec(name, model_kwargs, weights, random_weights)
    if pool is not None:
        if pool not in POOLS:
            raise ConfigError(f"features.pool: {pool!r} is not one of {list(POOLS)}")
        spec.pool = pool
    if out_stage is not None and (spec.pool != "model" or spec.architecture != name):
        raise ConfigError(f"features.out_stage: {name} gives its pooled token output; set out_stage: null")
    model = _build(spec)
    data_config = normalisation(spec, model, mean, std)
    data_config["encoder_args"] = {"architecture": spec.architecture, **json_kwargs(spec.kwargs)}
    full_keys = set(model.state_dict())
    classifier = str(model.pretrained_cfg.get("classifier") or "fc")
    stage_index, dim = None, _pooled_dim(model, name, spec.pool)
    if out_stage is not None:
        stage_index = _stage_index(model, name, out_stage)
        dim = int(model.feature_info[stage_index]["num_chs"])  # type: ignore[index]
        model.prune_intermediate_layers([stage_index], prune_norm=True, prune_head=True)
    else:
        _check_input_size(model, name, input_size)
    if spec.feature_dim is not None and dim != spec.feature_dim:
        raise ConfigError(f"features.model_kwargs: {name} gives {dim}-d features, the published "
                          f"{spec.feature_dim}-d need its own embed_dim")
    if spec.weights is not None:
        _load_weights(model, spec.weights, full_keys, classifier)
        weights_id = file_sha256(spec.weights)
    else:
        log.warning("features: encoder %s has RANDOM weights (demo only, seed %d)", name, RANDOM_SEED)
        weights_id = "random"
    encoder = Encoder(model, stage_index, dim, weights_id, spec.pool, spec.architecture)
    return encoder.eval(), data_config


def _stage_index(model: nn.Module, name: str, out_stage: str) -> int:
    stages = [info["module"] for info in model.feature_info]  # type: ignore[attr-defined]
    if out_stage not in stages:
        raise ConfigError(
            f"features.out_stage: {out_stage!r} is not a stage of {name} "
            f"(stages: {', '.join(stages)}; or null for the full model)"
        )
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"features.out_stage: timm model {name} cannot be truncated; set out_stage: null"
        )
    return stages.index(out_stage)
