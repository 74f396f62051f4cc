"""Where torch work runs, and in which precision: one rule for every stage's ``device`` and
``precision`` settings.

``precision: auto`` picks bf16 only where the device computes it natively: CUDA GPUs that
support it, and CPUs with AMX or AVX-512-BF16 (read from ``/proc/cpuinfo`` flags, with torch's
own CPU capability as a second opinion). Elsewhere bf16 is emulated and several times slower
than fp32 (measured on a 2-core AVX2 EPYC: one BD epoch 164.7 s in bf16 against 39.4 s in fp32),
so ``auto`` gives fp32 there.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bd.errors import ConfigError
from bd.params import PRECISION_CHOICES  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without one is a ConfigError
    naming the config ``key`` (e.g. ``features.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' asked for, but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and what it offers for bf16 (for logs and benchmark output)."""

    model: str
    flags: frozenset[str]
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...

    @property
    def bf16_flags(self) -> list[str]:
        return [f for f in BF16_CPU_FLAGS if f in self.flags]

    @property
    def native_bf16(self) -> bool:
        """AMX or AVX-512-BF16 in the flags; without a flag list, torch's AMX capability."""
        if self.flags:
            return bool(self.bf16_flags)
        return "AMX" in self.capability.upper()


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a ``/proc/cpuinfo`` text."""
    model, flags = "unknown CPU", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's :class:`CpuInfo` (empty flags where ``path`` cannot be read)."""
    try:
        model, flags = parse_cpuinfo(Path(path).read_text(errors="replace"))
    except OSError:
        import platform

        model, flags = platform.processor() or "unknown CPU", frozenset()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuInfo(model, flags, capability)


def cpu_summary() -> str:
    """One line: model, torch capability and native bf16 support (benchmarks, logs)."""
    info = cpu_info()
    bf16 = f"native bf16 ({', '.join(info.bf16_flags) or 'AMX'})" if info.native_bf16 else "no native bf16"
    return f"{info.model} ({torch.get_num_threads()} torch threads, {info.capability}, {bf16})"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (one phrase)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported():
            return True, f"CUDA device {name} supports bf16"
        return False, f"CUDA device {name} has no native bf16"
    if device.type == "cpu":
        info = cpu_info()
        if info.native_bf16:
            return True, f"CPU {info.model} has {', '.join(info.bf16_flags) or 'AMX'}"
        return False, f"CPU {info.model} has neither AMX nor AVX-512-BF16 (torch capability {info.capability})"
    return False, f"device {device} is not known to compute bf16 natively"


def resolve_precision(name: str, device: torch.device, key: str = "precision") -> tuple[str, str]:
    """(``bf16`` | ``fp32``, the reason): ``auto`` is bf16 where ``device`` computes it natively."""
    if name not in PRECISION_CHOICES:
        raise ConfigError(f"{key}: {name!r} is not one of {list(PRECISION_CHOICES)}")
    if name != "auto":
        return name, f"{key}: {name} asked for"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"{key}: auto -> {'bf16' if native else 'fp32'}: {why}"


# ---------------------------------------------------------------- one GPU per job

_CLAIMED: dict[str, int] = {}  # GPU id -> the descriptor whose lock this process holds


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, found without starting CUDA (which fixes the visible
    devices for the process's lifetime): ``CUDA_VISIBLE_DEVICES``, else the NVIDIA driver's list."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        return ids[: ids.index("-1")] if "-1" in ids else ids
    root = Path("/proc/driver/nvidia/gpus")
    try:
        return [str(i) for i in range(len(list(root.iterdir())))]
    except OSError:
        return []


def claim_gpu(lock_dir: str | os.PathLike[str] | None = None, poll_s: float = 2.0) -> str | None:
    """Give this process one GPU of its own when it sees several, before CUDA starts: the first
    GPU whose lock file (``bd-gpu-<uid>-<id>.lock`` in ``lock_dir``, default ``$BD_GPU_LOCK_DIR``
    or the temporary folder) no other process holds; ``CUDA_VISIBLE_DEVICES`` is then that GPU
    alone. Waits while every GPU is taken. Returns the GPU id, or None when there is nothing to
    choose (one GPU or none visible, as in a SLURM job that asked for one) or CUDA already started."""
    import fcntl
    import tempfile
    import time

    gpus = visible_gpus()
    if len(gpus) <= 1:
        return None
    if torch.cuda.is_initialized():
        log.warning("CUDA is already initialised: cannot choose one of GPUs %s for this job", ", ".join(gpus))
        return None
    folder = Path(lock_dir or os.environ.get("BD_GPU_LOCK_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for gpu in gpus:
            fd = os.open(folder / f"bd-gpu-{os.getuid()}-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _CLAIMED[gpu] = fd  # held (open) until the process exits
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("GPU %s of %s claimed for this job (CUDA_VISIBLE_DEVICES=%s)", gpu, ",".join(gpus), gpu)
            return gpu
        if not waited:
            log.info("all of GPUs %s are taken by other jobs: waiting for one", ", ".join(gpus))
            waited = True
        time.sleep(poll_s)


def release_gpus() -> None:
    """Let go of the GPUs this process claimed (tests; a process's locks also end with it)."""
    for fd in _CLAIMED.values():
        os.close(fd)
    _CLAIMED.clear()


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 256 << 20  # tensors under this come from the heap and are reused
HEAP_TRIM_THRESHOLD = 1 << 30  # free memory kept by the heap before any goes back to the OS


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (True when set; False off glibc).

    Why: a training step allocates the same large intermediates every step (8-20 MB each at
    ~16 k patches). glibc serves blocks that size with fresh ``mmap`` s and unmaps them when
    freed, or trims them off the heap, so steps page-fault their working set in again (measured:
    2,400-8,000 faults a step depending on the heap's history; 0.6-1.0 s of system time in an
    epoch of 962 k patches). With a fixed mmap threshold of 256 MB and a
    1 GB trim threshold, freed blocks stay in the heap and the next step reuses them; the price
    is that the process keeps up to its peak heap use until it exits. Process-wide, set once.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None) if libc is not None and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    done = mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) == 1
    log.debug("malloc: freed blocks kept for reuse (mmap threshold %d MB): %s", HEAP_MMAP_THRESHOLD >> 20, done)
    return done
