"""``bd extract``: encoder features of every patch of a slide into one Zarr store (``bd.features.store``).

The data path is built to keep a GPU busy: DataLoader workers read whole batches of consecutive
patches (``bd.slides.readers``: stored JPEG tiles decoded once each, or OpenSlide for other formats) as
uint8 -- or, on CUDA with YCbCr-coded tiles, only the tiles' bytes, decoded batched on the GPU
(``bd.slides.device_decode``, ``features.decode``); the device resizes them to the encoder's input size
(antialiased bilinear), normalises with the model's own pretrained mean/std and runs the encoder
in ``features.precision`` (``auto``: bf16 weights and channels_last where the device computes
bf16 natively -- CUDA, CPUs with AMX or AVX-512-BF16 -- else fp32), optionally compiled
(``features.compile``; the data path is in :mod:`bd.features.patches`). With several slides per invocation the model is loaded once, and the
next slide's reader workers start while the current slide's last batches are encoded. Stores are written under a temporary name and renamed when complete, so an
interrupted job never leaves a store that looks finished; several slides per invocation load the
model once.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bd import __version__, params
from bd.device import claim_gpu, resolve_device, resolve_precision
from bd.errors import BDError, ConfigError, SlideError, StoreError
from bd.slides.grid import PatchGrid, load_grid
from bd.io import atomic_path
from bd.slides.device_decode import TileStreamBatches, assemble, decode_tiles
from bd.slides.readers import ReadSpec, open_reader, plan_reader
from bd.features.patches import FeatureModel, PatchBatches, PatchSource, Preprocess, choose_decode, patch_loader
from bd.features.params import FeatureParams  # noqa: F401 (re-exported: bd.features.extract.FeatureParams)
from bd.features.store import RowWriter, create_store, finish_store, read_store, write_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideJob:
    slide: str
    grid: str
    out: str


# --- one slide -------------------------------------------------------------------------------


class Extractor:
    """The encoder, loaded once, applied to any number of slides."""

    def __init__(self, p: FeatureParams) -> None:
        from bd.features.encoders import create_encoder

        self.params = p
        self.device = resolve_device(p.device, "features.device")
        encoder, data_config = create_encoder(
            p.encoder, p.out_stage, p.weights, p.random_weights, model_kwargs=p.model_kwargs,
            mean=p.mean, std=p.std, pool=p.pool, input_size=p.input_size,
        )
        self.pool = encoder.pool
        self.data_config = data_config
        self.feature_dim = encoder.feature_dim
        self.weights_id = encoder.weights_id
        preprocess = Preprocess(p.input_size, data_config["mean"], data_config["std"])
        self.precision, why = resolve_precision(p.precision, self.device, "features.precision")
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = FeatureModel(preprocess, encoder, self.device, dtype, p.compile, p.batch_size).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if p.decode == "cuda" and self.device.type != "cuda":
            raise ConfigError("features.decode: 'cuda' asked for, but the encoder does not run on CUDA "
                              f"(features.device resolves to {self.device.type})")
        log.info(
            "encoder %s (out_stage %s, %d-d, weights %s) on %s, %s%s; %s",
            p.encoder, p.out_stage, self.feature_dim, self.weights_id[:12], self.device, self.precision,
            ", compiled" if p.compile else "", why,
        )
        self.prefetched: dict[str, Any] = {}  # job.out -> a loader started early (extract_slides)

    def fingerprint(self, job: SlideJob, grid: PatchGrid) -> str:
        """What a store's content depends on: a rerun with the same fingerprint may be skipped."""
        p = self.params
        key = {
            "encoder": p.encoder, "out_stage": p.out_stage, "weights": self.weights_id,
            "model_kwargs": p.model_kwargs, "pool": self.pool, "mean": list(self.data_config["mean"]),
            "std": list(self.data_config["std"]),
            "input_size": p.input_size, "slide": str(Path(job.slide).resolve()),
            "precision": self.precision,
            "grid": {**grid.attrs(), "coords": hashlib.sha256(grid.coords.tobytes()).hexdigest()},
            "on_decode_error": p.on_decode_error, "version": __version__,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def attrs(self, grid: PatchGrid, spec: ReadSpec, fingerprint: str) -> dict[str, Any]:
        import timm

        p, dc = self.params, self.data_config
        return {
            "slide_id": grid.slide_id, "slide_path": spec.path,
            "encoder": p.encoder, "out_stage": p.out_stage,
            "model_kwargs": dict(p.model_kwargs), "pool": self.pool, "encoder_args": dc["encoder_args"],
            "weights": p.weights, "weights_sha256": self.weights_id,
            "input_size": p.input_size, "mean": list(dc["mean"]), "std": list(dc["std"]),
            "resize": "bilinear-antialias", "reader": spec.kind,
            "patch_size": grid.patch_size, "patch_size_level0": grid.patch_size_level0,
            "target_mpp": grid.target_mpp, "mpp": grid.mpp, **slide_facts(grid, spec.path),
            "read_level": grid.read_level, "read_downsample": grid.read_downsample,
            "read_size": grid.read_size, "grid_patches": len(grid),
            "device": self.device.type,
            "precision": self.precision, "compile": bool(p.compile),
            "on_decode_error": p.on_decode_error, "fingerprint": fingerprint,
            "versions": {"bd": __version__, "torch": torch.__version__, "timm": timm.__version__},
        }

    def run(self, job: SlideJob, resume: bool = False, on_slide_error: str = "fail") -> Path:
        """Extract one slide into ``job.out``; with ``resume``, keep an identical complete store.

        A grid without patches (no tissue, or a slide an earlier stage could not read) gives an
        empty complete store without opening the slide. With ``on_slide_error`` skip, a slide that
        fails here also gives an empty store, recording why (``error``, ``error_stage``)."""
        grid = load_grid(job.grid)
        fingerprint = self.fingerprint(job, grid)
        out = Path(job.out)
        if resume and _complete_with(out, fingerprint):
            log.info("%s: complete store with the same settings exists, skipped", out)
            return out
        if len(grid) == 0:
            error = grid.meta.get("error")
            stage = grid.meta.get("error_stage", "segment")
            return self.write_empty(job, grid, fingerprint, (stage, str(error)) if error else None)
        try:
            return self._extract(job, grid, fingerprint)
        except SlideError as exc:
            if on_slide_error == "fail":
                raise
            log.warning("%s: slide could not be read (%s); writing an empty store that records it", out, exc)
            return self.write_empty(job, grid, "", ("extract", str(exc)))  # no fingerprint: --resume retries

    def write_empty(self, job: SlideJob, grid: PatchGrid, fingerprint: str,
                    error: tuple[str, str] | None) -> Path:
        """An empty complete store for a slide without patches; ``error`` = (stage, reason)."""
        attrs = self.attrs(grid, ReadSpec(job.slide, 0, 1.0, grid.read_size, kind="none"), fingerprint)
        attrs.update(mpp=_finite(grid.mpp), patch_size_level0=_finite(grid.patch_size_level0))
        if error is not None:
            attrs.update(error_stage=error[0], error=error[1])
        write_store(job.out, np.zeros((0, self.feature_dim), np.float16), np.zeros((0, 2), np.int64),
                    {**attrs, "skipped_patches": 0, "skipped": []})
        return Path(job.out)

    def _extract(self, job: SlideJob, grid: PatchGrid, fingerprint: str) -> Path:
        """Read, encode and store every patch of a grid with patches."""
        out = Path(job.out)
        started = self.prefetched.pop(job.out, None)
        if isinstance(started, SlideError):
            raise started
        source = started or self.open_source(job, grid)
        spec, shared = source.spec, source.shared
        log.info("%s: %d patches, reader %s, decode on %s%s", grid.slide_id, len(grid), spec.kind, source.decode,
                 " (prefetched)" if started else "")
        stale = sorted(out.parent.glob(f".{out.name}.tmp-*"))
        if stale:
            log.warning(
                "%s: %d temporary store(s) left by interrupted runs (delete them once no "
                "extraction of this slide is running): %s", out, len(stale), stale[0],
            )
        with atomic_path(out) as tmp:
            root = create_store(tmp, len(grid), self.feature_dim, self.attrs(grid, spec, fingerprint))
            try:
                rows, skipped = self._fill(root, grid, source)
            finally:
                if shared is not None:
                    shared.close()
            root.attrs.update(
                {"n_patches": rows, "skipped_patches": len(skipped), "skipped": skipped, "decode": source.decode}
            )
            finish_store(root)
        return out

    def open_source(self, job: SlideJob, grid: PatchGrid) -> PatchSource:
        """The slide's reader, decode path and batch loader (its workers start reading now)."""
        p = self.params
        spec = plan_reader(job.slide, grid.read_level, grid.read_downsample, grid.read_size, grid.mpp, p.reader)
        reader = open_reader(spec)  # fails early, in this process, on a slide that cannot open
        shared = reader if reader.share() else None
        if shared is None:
            reader.close()
        decode, why = choose_decode(p.decode, self.device, shared)
        if decode != "cpu" or p.decode != "auto":
            log.info("%s: tiles decoded on %s (%s)", grid.slide_id, decode, why)
        skip = p.on_decode_error == "skip"
        if decode == "cpu":
            dataset: torch.utils.data.Dataset = PatchBatches(spec, grid.coords, p.batch_size, skip, shared)
        else:
            dataset = TileStreamBatches(shared, grid.coords, p.batch_size)
        loader = patch_loader(dataset, p.num_workers, self.device.type == "cuda")
        return PatchSource(spec, shared, decode, dataset, loader, PatchBatches(spec, grid.coords, p.batch_size, skip, shared))

    def _pixels(self, batch: dict[str, Any], source: PatchSource) -> dict[str, Any]:
        """A CPU-read batch as it comes; a tile-bytes batch decoded on the device, or read again
        by the CPU reader when the device cannot decode it (so on_decode_error applies per patch)."""
        if source.decode == "cpu":
            return batch
        reader = source.shared
        try:
            tiles = decode_tiles(batch["streams"], self.device, reader.tile_h, reader.tile_w)
            pixels = assemble(tiles, batch["tiles"], batch["origins"], reader)
        except RuntimeError as exc:
            log.warning("device decode failed, batch at patch %d read on the CPU instead: %s", batch["start"], exc)
            return source.cpu_batches[int(batch["start"]) // source.cpu_batches.batch_size]
        return {"start": batch["start"], "pixels": pixels, "ok": torch.ones(int(batch["n"]), dtype=torch.bool),
                "error": ""}

    def _fill(self, root: Any, grid: PatchGrid, source: PatchSource) -> tuple[int, list[list[int]]]:
        """Read, encode and write every patch: the rows written and the skipped patches' x, y.

        One batch stays in flight: its features come back to the host asynchronously while the
        next batch is queued, so the GPU does not wait for store writes or the loader. When every
        remaining batch of this slide has been handed to the loader's workers, the next slide's
        loader is started (``on_tail``), so its workers read while this slide's last batches run."""
        writer = RowWriter(root, chunk=root["features"].chunks[0])
        skipped: list[list[int]] = []
        in_flight: tuple[torch.Tensor, Any, np.ndarray] | None = None
        bar = _progress(len(grid), grid.slide_id)
        started = time.perf_counter()
        total, tail = len(source.dataset), max(1, self.params.num_workers) * 4  # batches queued ahead
        try:
            for i, batch in enumerate(source.loader):
                if total - i <= tail and self.on_tail is not None:
                    self.on_tail()
                    self.on_tail = None
                batch = self._pixels(batch, source)
                if batch["error"]:
                    raise SlideError(batch["error"])
                start, ok = int(batch["start"]), batch["ok"].numpy()
                coords = grid.coords[start : start + len(ok)]
                skipped += coords[~ok].tolist()
                if ok.any():
                    pixels = batch["pixels"] if ok.all() else batch["pixels"][torch.from_numpy(ok)]
                    queued = (*self._to_host(self.model(pixels)), coords[ok])
                    if in_flight is not None:
                        _land(in_flight, writer)
                    in_flight = queued
                bar.update(len(ok))
            if in_flight is not None:
                _land(in_flight, writer)
        finally:
            bar.close()
        rows = writer.close()
        seconds = time.perf_counter() - started
        log.info(
            "%s: %d patches in %.1f s (%.0f patches/s), %d skipped",
            grid.slide_id, len(grid), seconds, len(grid) / max(seconds, 1e-9), len(skipped),
        )
        return rows, skipped

    def prefetch(self, job: SlideJob) -> None:
        """Start ``job``'s loader now (its reader workers fill their queue while the current slide
        finishes); an error is kept and raised when ``job`` runs, under its own on_slide_error."""
        try:
            grid = load_grid(job.grid)
            if len(grid) == 0 or (self.resume and _complete_with(Path(job.out), self.fingerprint(job, grid))):
                return
            self.prefetched[job.out] = self.open_source(job, grid)
        except SlideError as exc:
            self.prefetched[job.out] = exc
        except BDError as exc:
            log.debug("%s: not prefetched (%s)", job.slide, exc)

    on_tail: Any = None  # called once when a slide's last batches are queued (extract_slides)
    resume: bool = False

    def _to_host(self, feats: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying device features to the host; returns the tensor and a ready event."""
        if self.device.type != "cuda":
            return feats, None
        host = feats.to("cpu", non_blocking=True)  # lands in pinned memory, asynchronously
        event = torch.cuda.Event()
        event.record()
        return host, event


def _land(in_flight: tuple[torch.Tensor, Any, np.ndarray], writer: RowWriter) -> None:
    """Wait for a batch's features to reach the host, then append them to the store."""
    host, event, coords = in_flight
    if event is not None:
        event.synchronize()
    writer.add(host.numpy(), coords)


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="patch", dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )


def slide_facts(grid: PatchGrid, path: str) -> dict[str, Any]:
    """What identifies the slide a store was made from: level-0 size (checked by ``bd predict
    --features`` with ``mpp``), the MPP's source and the file's size in bytes."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return {"slide_width": int(grid.slide_width), "slide_height": int(grid.slide_height),
            "mpp_source": grid.meta.get("mpp_source"), "slide_bytes": size}


def _finite(value: float) -> float | None:
    """JSON attributes hold no NaN: an unknown size or MPP is null."""
    return float(value) if math.isfinite(value) else None


def _complete_with(out: Path, fingerprint: str) -> bool:
    if not out.exists():
        return False
    try:
        return read_store(out, with_features=False).attrs.get("fingerprint") == fingerprint
    except StoreError:
        return False


def extract_slides(
    jobs: Sequence[SlideJob],
    p: FeatureParams | dict[str, Any] | str,
    resume: bool = False,
    on_slide_error: Literal["fail", "skip"] = "fail",
) -> list[Path]:
    """Extract every job's slide with one encoder (loaded once); ``on_slide_error`` as in
    :meth:`Extractor.run`."""
    if not isinstance(p, FeatureParams):
        p = params.build(FeatureParams, p)
    extractor = Extractor(p)
    extractor.resume = resume
    out = []
    for i, job in enumerate(jobs):
        following = jobs[i + 1] if i + 1 < len(jobs) else None
        extractor.on_tail = (lambda j=following: extractor.prefetch(j)) if following and p.num_workers else None
        out.append(extractor.run(job, resume=resume, on_slide_error=on_slide_error))
    extractor.prefetched.clear()
    return out


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slide", action="append", default=[], help="slide file (repeatable)")
    parser.add_argument("--grid", action="append", default=[], help="patch grid .npz (repeatable)")
    parser.add_argument("--out", action="append", default=[], help="output .zarr (repeatable)")
    parser.add_argument(
        "--jobs", help="TSV with columns slide, grid, out: several slides, the model loaded once"
    )
    parser.add_argument("--params", help="features section: JSON object or YAML/JSON file")
    parser.add_argument(
        "--resume", action="store_true",
        help="skip slides whose store is complete and was made with the same settings",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--on-error", choices=["fail", "skip"], default="fail",
        help="skip: a slide that cannot be read gets an empty store recording why (exit 0)",
    )


def read_jobs(path: str) -> list[SlideJob]:
    """The ``--jobs`` TSV: one slide per row, columns slide, grid, out."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise BDError(f"--jobs {path}: {exc.strerror or exc}") from exc
    jobs = []
    for i, row in enumerate(rows, start=2):
        missing = [c for c in ("slide", "grid", "out") if not (row.get(c) or "").strip()]
        if missing:
            raise BDError(f"--jobs {path}: row {i}: column '{missing[0]}' is missing or empty")
        jobs.append(SlideJob(row["slide"].strip(), row["grid"].strip(), row["out"].strip()))
    return jobs


def run(args: argparse.Namespace) -> int:
    if not (len(args.slide) == len(args.grid) == len(args.out)):
        raise BDError("--slide, --grid and --out must be given the same number of times")
    jobs = [SlideJob(*t) for t in zip(args.slide, args.grid, args.out)]
    if args.jobs:
        jobs += read_jobs(args.jobs)
    if not jobs:
        raise BDError("nothing to do: give --slide/--grid/--out or --jobs")
    if args.threads:
        torch.set_num_threads(args.threads)
    p = params.build(FeatureParams, args.params)
    if p.device != "cpu":
        claim_gpu()  # several GPUs on this node: this job takes one of its own (bd.device)
    extract_slides(jobs, p, resume=args.resume, on_slide_error=args.on_error)
    return 0
