"""Packing batches for a model: a step's bags in one reused buffer, converted to the model's
patch-layer dtype and z-scored with its statistics in the same pass.

Why: on a CPU the patch layer's matmuls are most of a step, and what is left is memory traffic.
Packing into a fresh tensor, converting it (the cohort is held as fp16 or bf16) and then
standardising it (two more full-size tensors) made three passes over ~16 k x 1,024 values a step,
each into newly mapped memory whose page faults cost as much as the copy. The packer makes one
pass, chunk by chunk, into a buffer allocated once; the model's pools then skip their own
standardisation (:func:`bd.mil.pooling.standardised_inputs`). The values are those the pools compute
(the same ops in the same order). On a CPU in fp32 the pools fold the z-scoring into their
patch layer (:func:`bd.mil.pooling.folds_standardisation`), and the packer only converts. A
batch's features are a view of the buffer: the next :meth:`Packer.batch` overwrites them, so use
one batch at a time (a training step's backward pass, or an inference batch read out, comes
before the next).

:meth:`Packer.batches` packs the next batch of a known sequence into a second buffer while the
caller works on this one, on a thread of idle priority (``SCHED_IDLE`` on Linux): it runs only
on a core the step leaves idle (the serial heads and losses, the optimiser, the waits at the end
of parallel work: ~10 % of a 2-core step's core time, measured at 16 k patches a step), so packing
mostly leaves the step's critical path. The values are those of :meth:`Packer.batch`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np
import torch

from bd.mil.bags import Batch, Cohort
from bd.mil.models import MILModel, folds_standardisation, input_dtype, input_standardisation, standardised_inputs


BACKGROUND_PACKING = True  # Packer.batches packs the next batch on an idle-priority thread
_BACKGROUND: list[concurrent.futures.ThreadPoolExecutor] = []
os.register_at_fork(after_in_child=_BACKGROUND.clear)  # a forked child has none of the parent's threads


def _idle_priority() -> None:
    """Run the calling thread (and the OpenMP threads it starts) only on otherwise idle cores."""
    with contextlib.suppress(AttributeError, OSError):  # Linux only; elsewhere it runs at normal priority
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _background_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one idle-priority packing thread of the process (started on first use)."""
    if not _BACKGROUND:
        _BACKGROUND.append(concurrent.futures.ThreadPoolExecutor(1, "bd-pack", initializer=_idle_priority))
    return _BACKGROUND[0]


def largest_step(cohort: Cohort, indices: np.ndarray, batch_size: int) -> int:
    """Rows of the largest batch of ``batch_size`` of the patients at ``indices`` (a buffer
    that size never has to grow)."""
    lengths = np.sort(cohort.lengths()[np.asarray(indices, np.int64)])[::-1]
    return int(lengths[:batch_size].sum())


class Packer:
    """Batches of ``cohort`` for ``model`` (see the module docstring); use as a context manager
    around the model's forward passes."""

    def __init__(self, model: MILModel, cohort: Cohort, device: torch.device | str, capacity: int = 0):
        self.model, self.cohort, self.device = model, cohort, torch.device(device)
        transform = input_standardisation(model)
        where = cohort.features.device  # packing happens where the features are
        self.transform = (transform[0], transform[1].to(where), transform[2].to(where)) if transform else None
        self.dtype = self.transform[0] if self.transform else input_dtype(model)
        self.standardise = None if self.transform is None or folds_standardisation(model, self.device) \
            else self.transform[1:]  # (mean, scale) applied while packing, else left to the patch layer
        self.buffers: list[torch.Tensor | None] = [None, None]  # the second for Packer.batches
        self.capacity = capacity
        self._context: contextlib.AbstractContextManager[None] | None = None
        if self.transform and capacity:
            self._grow(capacity)

    @property
    def buffer(self) -> torch.Tensor | None:
        """The buffer :meth:`batch` packs into."""
        return self.buffers[0]

    def _grow(self, rows: int, slot: int = 0) -> torch.Tensor:
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[0] < rows:
            self.buffers[slot] = buffer = None  # free the old one first
            self.buffers[slot] = buffer = torch.empty((max(rows, self.capacity), self.cohort.feature_dim),
                                                      dtype=self.dtype, device=self.cohort.features.device)
        return buffer

    def batch(self, indices: Sequence[int] | np.ndarray, clinical_present: np.ndarray | None = None,
              slide_present: np.ndarray | None = None, slot: int = 0, with_features: bool = True) -> Batch:
        """:meth:`Cohort.batch` of the patients at ``indices``, packed into the buffer (``slot``
        1: the second one, see :meth:`batches`; ``with_features`` as there)."""
        if self.transform is None or not with_features:  # pools that differ each do their own
            return self.cohort.batch(indices, clinical_present, slide_present, device=self.device, dtype=self.dtype,
                                     with_features=with_features)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = int(self.cohort.lengths()[idx].sum())
        return self.cohort.batch(idx, clinical_present, slide_present, device=self.device, dtype=self.dtype,
                                 out=self._grow(max(rows, 1), slot), standardise=self.standardise)

    def batches(self, parts: Sequence[Sequence[int] | np.ndarray],
                clinical_present: Sequence[np.ndarray | None] | None = None,
                slide_present: Sequence[np.ndarray | None] | None = None,
                with_features: Sequence[bool] | None = None) -> Iterator[Batch]:
        """:meth:`batch` of each of ``parts`` (with its presence arrays and ``with_features``) in
        turn; while the caller works on one, the next is packed in the background into the other
        buffer (see the module docstring). As with :meth:`batch`, a batch is valid until the next
        one is asked for."""
        n = len(parts)
        args = list(zip(parts, [None] * n if clinical_present is None else clinical_present,
                        [None] * n if slide_present is None else slide_present,
                        [True] * n if with_features is None else with_features))
        if not BACKGROUND_PACKING or n < 2 or self.cohort.features.device.type != "cpu":
            for part, clin, slide, feats in args:
                yield self.batch(part, clin, slide, with_features=feats)
            return
        packer = _background_thread()

        def pack(k: int) -> concurrent.futures.Future[Batch]:
            part, clin, slide, feats = args[k]
            return packer.submit(self.batch, part, clin, slide, k % 2, feats)

        pending: concurrent.futures.Future[Batch] | None = pack(0)
        try:
            for k in range(n):
                batch = pending.result()
                pending = pack(k + 1) if k + 1 < n else None
                yield batch
        finally:  # the caller stopped early: let the packing in flight finish before the buffers go
            if pending is not None:
                concurrent.futures.wait([pending])

    def __enter__(self) -> Packer:
        if self.standardise is not None:
            self._context = standardised_inputs(self.model)
            self._context.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._context is not None:
            self._context.__exit__(kind, exc, tb)
            self._context = None
