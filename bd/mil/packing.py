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
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType

import numpy as np
import torch

from bd.mil.bags import Batch, Cohort
from bd.mil.models import MILModel, folds_standardisation, input_dtype, input_standardisation, standardised_inputs


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
        self.buffer: torch.Tensor | None = None
        self._context: contextlib.AbstractContextManager[None] | None = None
        if self.transform and capacity:
            self._grow(capacity)

    def _grow(self, rows: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.shape[0] < rows:
            self.buffer = None  # free the old one first
            self.buffer = torch.empty((rows, self.cohort.feature_dim), dtype=self.dtype,
                                      device=self.cohort.features.device)
        return self.buffer

    def batch(self, indices: Sequence[int] | np.ndarray, clinical_present: np.ndarray | None = None,
              slide_present: np.ndarray | None = None) -> Batch:
        """:meth:`Cohort.batch` of the patients at ``indices``, packed into the buffer."""
        if self.transform is None:  # pools that differ in dtype or statistics each do their own
            return self.cohort.batch(indices, clinical_present, slide_present, device=self.device, dtype=self.dtype)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = int(self.cohort.lengths()[idx].sum())
        return self.cohort.batch(idx, clinical_present, slide_present, device=self.device, dtype=self.dtype,
                                 out=self._grow(max(rows, 1)), standardise=self.standardise)

    def __enter__(self) -> Packer:
        if self.standardise is not None:
            self._context = standardised_inputs(self.model)
            self._context.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._context is not None:
            self._context.__exit__(kind, exc, tb)
            self._context = None
