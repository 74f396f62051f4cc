"""Stored JPEG tiles decoded on the GPU: nvJPEG through ``torchvision.io.decode_jpeg``, batched.

On a GPU node the CPU decode of the tiles, not the encoder, caps extraction (16 processes of cv2:
16,289 patches/s against the compiled encoder's 27,196 on one H200; nvJPEG: 22,558). Here the
loader only reads each batch's tile bytes (``os.pread``, no decode); the main process decodes the
batch's tiles in one ``decode_jpeg`` call on the device and cuts the patches out of them with one
gather (:func:`assemble`), so the pixels never cross the PCIe bus as RGB.

Used when ``features.decode`` is ``auto`` (the default) and the encoder runs on CUDA and the tiles
allow it (:func:`device_decode_support`): YCbCr-coded 8-bit JPEG tiles, the usual TIFF and many
SVS files. RGB-coded tiles (Aperio's photometric RGB) stay on the CPU reader, which sets their
colour space as OpenSlide does; a batch that fails to decode on the device is read again by the
CPU reader, so ``on_decode_error`` applies per patch as before. The same code runs with
``device="cpu"`` (torchvision's libjpeg decode), which is how it is tested without a GPU.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch

from bd.slides.readers import TiffJpegReader


def device_decode_support(reader: Any) -> tuple[bool, str]:
    """Whether ``reader``'s tiles can be decoded by nvJPEG with the CPU reader's colours, and why."""
    if not isinstance(reader, TiffJpegReader):
        return False, f"reader {getattr(reader, 'kind', '?')} has no stored JPEG tiles"
    if reader.rgb:  # the reader takes only RGB- or YCbCr-coded 8-bit 3-sample tiles
        return False, "RGB-coded JPEG tiles (photometric RGB): nvJPEG would read them as YCbCr"
    return True, "YCbCr-coded JPEG tiles"


def full_stream(data: bytes, tables: bytes | None) -> bytes:
    """An abbreviated tile stream made complete: the page's tables (without their EOI) + the tile
    (without its SOI). nvJPEG, unlike libjpeg, takes no separate tables."""
    if not tables:
        return data
    return tables[:-2] + data[2:]


class TileStreamBatches(torch.utils.data.Dataset):
    """Batch ``i`` = patches ``[i*B, (i+1)*B)``: the complete JPEG streams of the tiles they cover
    (uint8 tensors, each tile once), those tiles' indices and each patch's level origin."""

    def __init__(self, reader: TiffJpegReader, coords: np.ndarray, batch_size: int) -> None:
        self.reader = reader  # shared with forked workers: pread on its descriptor, no decode
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.batch_size)

    def origins(self, coords: np.ndarray) -> np.ndarray:
        """Level-pixel top-left corners, rounded as :meth:`TiffJpegReader.read` does."""
        return np.floor(coords / self.reader.spec.downsample + 0.5).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = index * self.batch_size
        coords = self.coords[start : start + self.batch_size]
        r = self.reader
        origins = self.origins(coords)
        tiles: set[int] = set()
        for lx, ly in origins.tolist():
            box = r.inside(lx, ly)
            if box is not None:
                tiles.update(ty * r.tiles_x + tx for ty, tx in r.tiles_under(box))
        ids = sorted(t for t in tiles if r.counts[t] > 0)  # sparse tiles: never written, white
        streams = [torch.frombuffer(bytearray(full_stream(os.pread(r.fd, int(r.counts[t]), int(r.offsets[t])),
                                                          r.tables)), dtype=torch.uint8) for t in ids]
        return {"start": start, "n": len(coords), "tiles": torch.tensor(ids, dtype=torch.int64),
                "streams": streams, "origins": torch.from_numpy(origins)}


def decode_tiles(streams: list[torch.Tensor], device: torch.device, tile_h: int, tile_w: int) -> torch.Tensor:
    """[T, tile_h, tile_w, 3] uint8 on ``device`` from complete JPEG streams (one batched call)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return torch.empty((0, tile_h, tile_w, 3), dtype=torch.uint8, device=device)
    with warnings.catch_warnings():  # torchvision 0.29 announces torchcodec as the successor
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    bad = [tuple(im.shape) for im in images if tuple(im.shape) != (3, tile_h, tile_w)]
    if bad:
        raise RuntimeError(f"a tile decoded to {bad[0]}, not (3, {tile_h}, {tile_w})")
    return torch.stack(images).permute(0, 2, 3, 1)


def assemble(tiles: torch.Tensor, tile_ids: torch.Tensor, origins: torch.Tensor, reader: TiffJpegReader) -> torch.Tensor:
    """Patches [b, S, S, 3] uint8 cut from decoded ``tiles`` (of tile indices ``tile_ids``) at the
    level origins ``origins`` [b, 2], white outside the slide and on sparse tiles: one gather."""
    device, size = tiles.device, reader.spec.size
    th, tw, n = reader.tile_h, reader.tile_w, tiles.shape[0]
    white = torch.full((1, th, tw, 3), 255, dtype=torch.uint8, device=device)
    canvas = torch.cat([tiles, white]).reshape(-1, 3)
    lut = torch.full((reader.tiles_x * reader.tiles_y,), n, dtype=torch.int64, device=device)
    lut[tile_ids.to(device)] = torch.arange(n, device=device)
    step = torch.arange(size, device=device)
    origins = origins.to(device)
    gx, gy = origins[:, :1] + step, origins[:, 1:] + step  # [b, S] level pixel columns / rows
    inside = ((gy >= 0) & (gy < reader.height))[:, :, None] & ((gx >= 0) & (gx < reader.width))[:, None, :]
    gx, gy = gx.clamp(0, reader.width - 1), gy.clamp(0, reader.height - 1)
    slot = lut[(gy // th)[:, :, None] * reader.tiles_x + (gx // tw)[:, None, :]]
    slot = torch.where(inside, slot, n)
    flat = (slot * th + (gy % th)[:, :, None]) * tw + (gx % tw)[:, None, :]
    return canvas[flat]
