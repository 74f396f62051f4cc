"""Seeded missing-modality masks: which test patients lose their clinical data (or slide).

A mask depends only on ``(seed, kind, repeat)``, the patient ids and the rate: every patient gets a
key from a cryptographic hash of ``(seed, kind, repeat, patient_id)``, and at rate ``r`` the
``round(r/100 * n)`` patients with the smallest keys are missing. So every method and every
training run is tested on exactly the same masks, whatever the order of the patients, the rate is
exact, and masks are nested (a patient missing at 50 % is also missing at 80 %), which makes the
curves over rates compare like with like.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from bd.errors import ConfigError


def patient_keys(patient_ids: Sequence[str], seed: int, kind: str, repeat: int) -> np.ndarray:
    """A uniform pseudo-random key in [0, 1) per patient, stable across processes and platforms."""
    keys = np.empty(len(patient_ids), dtype=np.float64)
    for i, pid in enumerate(patient_ids):
        digest = hashlib.blake2b(f"{seed}|{kind}|{repeat}|{pid}".encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "big") / 2.0**64
    return keys


def n_missing(n: int, rate: float) -> int:
    """How many of ``n`` patients are missing at ``rate`` percent (rounded half up)."""
    if not 0 <= rate <= 100:
        raise ConfigError(f"missing rate {rate!r} is outside 0-100 (percent)")
    return int(np.floor(n * rate / 100.0 + 0.5))


def missing_mask(
    patient_ids: Sequence[str], rate: float, repeat: int, seed: int, kind: str = "clinical"
) -> np.ndarray:
    """Boolean mask, True where the patient's ``kind`` modality is missing at ``rate`` percent."""
    ids = [str(p) for p in patient_ids]
    if len(set(ids)) != len(ids):
        raise ConfigError("missing_mask: patient ids must be unique")
    keys = patient_keys(ids, seed, kind, repeat)
    order = np.lexsort((np.array(ids, dtype=object).astype(str), keys))  # ties broken by id
    mask = np.zeros(len(ids), dtype=bool)
    mask[order[: n_missing(len(ids), rate)]] = True
    return mask

