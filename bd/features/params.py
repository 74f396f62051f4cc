"""``features`` config section: the encoder and data path of ``bd extract``. Without torch, so that
the workflow reads its defaults (threads of the extract rules) when it parses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bd import params
from bd.params import PRECISION_CHOICES, param


@dataclass
class FeatureParams:
    """The encoder that turns each patch into a feature vector (`bd extract`)."""

    encoder: str = param("resnet50", description="a timm name, a foundation-model preset or hf-hub:org/name")
    out_stage: str | None = param("layer3", description="truncate after this stage, then global average pooling; "
                                                         "null for ViTs and presets")
    weights: str | None = param(None, description="local checkpoint file or folder; null: the local Hugging Face cache")
    random_weights: bool = param(False, description="demo only: random (seeded) weights, with a warning")
    model_kwargs: dict[str, Any] = param(
        default_factory=dict, description="passed to timm.create_model (e.g. init_values: 1e-5); layer classes by "
                                          "name (SwiGLUPacked, SiLU)")
    mean: list[float] | None = param(None, min_items=3, max_items=3,
                                     description="input normalisation (R, G, B); null: the encoder's own")
    std: list[float] | None = param(None, exclusive_minimum=0, min_items=3, max_items=3,
                                    description="input normalisation (R, G, B); null: the encoder's own")
    pool: Literal["model", "cls+mean"] | None = param(
        None, description="model: the model's pooled output; cls+mean: class token and mean of the patch tokens; "
                          "null: the preset's, else the model's own")
    input_size: int = param(224, minimum=16, description="encoder input px per side (patches are resized on the device)")
    batch_size: int = param(256, minimum=1, description="patches per encoder batch")
    num_workers: int = param(4, minimum=0, description="patch-reading worker processes")
    device: Literal["auto", "cpu", "cuda"] = param("auto", description="where the encoder runs")
    on_decode_error: Literal["fail", "skip"] = param("fail", description="a patch that cannot be decoded: fail, or skip it")
    reader: Literal["auto", "tiff-jpeg", "slide"] = param(
        "auto", description="stored JPEG tiles (tiff-jpeg) or OpenSlide (slide); auto: the tiles where possible")
    decode: Literal["auto", "cpu", "cuda"] = param(
        "auto", description="stored JPEG tiles: auto = on the GPU when the encoder is and the tiles allow")
    precision: str = param("auto", choices=PRECISION_CHOICES,
                           description="encoder compute type; auto = bf16 where native (bd.device.resolve_precision)")
    compile: bool = param(False, description="torch.compile the encoder (minutes of compilation, then faster on GPUs)")

    def __post_init__(self) -> None:
        params.check(self)
