"""The data path of ``bd extract``: patches of one slide read in batches (in DataLoader workers or on
the device from stored JPEG tiles), preprocessed on the device, and encoded (:class:`FeatureModel`)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bd.errors import SlideError
from bd.slides.device_decode import device_decode_support
from bd.slides.readers import PatchReader, ReadSpec, open_reader

log = logging.getLogger(__name__)


class PatchBatches(torch.utils.data.Dataset):
    """Batch ``i`` = patches ``[i*B, (i+1)*B)`` of one slide as uint8 (b, S, S, 3), read in the
    process that asks for it. A ``shared`` reader (fork-safe: pread-based tiles, or a flat image
    decoded once in the parent) is inherited by forked workers; otherwise each process opens its
    own (OpenSlide handles must not cross a fork)."""

    def __init__(
        self,
        spec: ReadSpec,
        coords: np.ndarray,
        batch_size: int,
        skip_errors: bool,
        shared: PatchReader | None = None,
    ) -> None:
        self.spec = spec
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.batch_size = batch_size
        self.skip_errors = skip_errors
        self._shared = shared
        self._reader: PatchReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.batch_size)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawn/forkserver workers): readers are reopened on the other side."""
        return {**self.__dict__, "_shared": None, "_reader": None, "_pid": -1}

    def reader(self) -> PatchReader:
        if self._shared is not None:
            return self._shared
        if self._reader is None or self._pid != os.getpid():  # never share handles across fork
            self._reader, self._pid = open_reader(self.spec), os.getpid()
        return self._reader

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = index * self.batch_size
        coords = self.coords[start : start + self.batch_size]
        size = self.spec.size
        pixels = np.empty((len(coords), size, size, 3), dtype=np.uint8)
        ok = np.ones(len(coords), dtype=bool)
        error = ""
        try:
            reader = self.reader()
        except SlideError as exc:
            return _batch(start, pixels, ~ok, str(exc))
        for i, (x, y) in enumerate(coords):
            try:
                reader.read(int(x), int(y), out=pixels[i])
            except SlideError as exc:
                ok[i] = False
                if not self.skip_errors:
                    error = str(exc)
                    break
                log.warning("skipping patch: %s", exc)
        return _batch(start, pixels, ok, error)


def _batch(start: int, pixels: np.ndarray, ok: np.ndarray, error: str) -> dict[str, Any]:
    return {
        "start": start,
        "pixels": torch.from_numpy(pixels),
        "ok": torch.from_numpy(ok),
        "error": error,
    }


def patch_loader(dataset: PatchBatches, num_workers: int, pin_memory: bool) -> Iterator[dict]:
    """DataLoader over ready-made batches (no per-sample collation). Workers run one torch
    thread each (DataLoader's own setting); OpenCV's thread pool is left alone: resizing it in a
    forked child can deadlock on the parent's pool state."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )
    return iter(loader)


class Preprocess(nn.Module):
    """uint8 (B, H, W, 3) on the device -> normalised float (B, 3, S, S), channels_last.

    Resizing here, batched, on the device (antialiased bilinear) replaces a per-patch PIL resize
    on the CPU; mean and std are the encoder's own pretrained config. On CPU the resize runs on
    uint8 (torch's SIMD kernel) and the output buffer is reused from call to call (fresh 40 MB
    tensors cost more in page faults than the arithmetic): consume it before the next call."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.input_size = input_size
        shape = (1, 3, input_size, input_size)  # full planes: the inner loops stay contiguous
        mean_t = (torch.tensor(mean, dtype=torch.float32) * 255).view(1, 3, 1, 1).expand(shape)
        scale = (1 / (torch.tensor(std, dtype=torch.float32) * 255)).view(1, 3, 1, 1).expand(shape)
        self.register_buffer("mean", mean_t.contiguous(memory_format=torch.channels_last))
        self.register_buffer("scale", scale.contiguous(memory_format=torch.channels_last))
        self._out: torch.Tensor | None = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        size = (self.input_size, self.input_size)
        if x.device.type != "cpu":
            x = x.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        if x.device.type != "cpu":
            return ((x - self.mean) * self.scale).contiguous(memory_format=torch.channels_last)
        out = self._out
        if out is None or out.shape[0] < x.shape[0]:
            out = torch.empty(x.shape, dtype=torch.float32, memory_format=torch.channels_last)
            self._out = out
        out = out[: x.shape[0]]
        return out.copy_(x).sub_(self.mean).mul_(self.scale)


class FeatureModel(nn.Module):
    """Preprocessing + encoder: uint8 patches in, float16 feature rows out. In bf16 the encoder's
    weights and inputs are bf16 and channels_last (no autocast casts per layer); ``compiled``
    runs the encoder through ``torch.compile``, every batch padded to ``batch_size`` rows so that
    it compiles once."""

    def __init__(self, preprocess: Preprocess, encoder: nn.Module, device: torch.device,
                 dtype: torch.dtype = torch.float32, compiled: bool = False, batch_size: int = 0) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.encoder = encoder
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.to(device)
        if device.type == "cuda" or dtype != torch.float32:
            self.encoder.to(dtype=dtype, memory_format=torch.channels_last)
        self.run_encoder: Any = torch.compile(self.encoder) if compiled else self.encoder
        self.compiled = compiled

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(pixels.to(self.device, non_blocking=True))
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        n = x.shape[0]
        if self.compiled and 0 < n < self.batch_size:  # one input shape: one compilation
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        return self.run_encoder(x)[:n].float().half()


@dataclass
class PatchSource:
    """One slide's way in: read spec, shared reader, where tiles are decoded, and its loader."""

    spec: ReadSpec
    shared: PatchReader | None
    decode: str  # "cpu" (the reader decodes) or a device type ("cuda")
    dataset: torch.utils.data.Dataset
    loader: Iterator[dict]
    cpu_batches: PatchBatches  # the CPU reader's batches: the fallback of a failed device decode


def choose_decode(asked: str, device: torch.device, reader: PatchReader | None) -> tuple[str, str]:
    """Where stored tiles are decoded ("cpu" or "cuda") for ``features.decode`` = ``asked``, and why:
    on the GPU when the encoder runs there and the tiles allow it (``device_decode_support``)."""
    if asked == "cpu":
        return "cpu", "features.decode: cpu"
    if device.type != "cuda":
        return "cpu", f"the encoder runs on {device.type}"
    supported, why = device_decode_support(reader)
    if not supported:
        if asked == "cuda":
            log.warning("features.decode: cuda asked for, but %s: decoding on the CPU", why)
        return "cpu", why
    return "cuda", why
