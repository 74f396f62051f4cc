"""Benchmark output: one JSON object per line on stdout, each naming the device it ran on, and
with ``--save`` the same lines appended to ``benchmarks/results/{benchmark}-{device}.jsonl``
(``train-cpu-amd-epyc.jsonl``, ``extract-nvidia-h200.jsonl``: see benchmarks/results/README.md).
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_slug(name: str) -> str:
    """A file-name form of a device name: ``cpu: AMD EPYC 7B13`` -> ``cpu-amd-epyc-7b13``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "unknown"


class Recorder:
    """Prints rows ``{"metric", "value", "unit", "target", "better", "device", ...}``."""

    def __init__(self, benchmark: str, device: str, save: bool = False, slug: str | None = None) -> None:
        self.benchmark, self.save = benchmark, save
        self.run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.set_device(device, slug)

    def set_device(self, device: str, slug: str | None = None) -> None:
        """Rows from now on name ``device`` (and go to its file with ``--save``)."""
        self.device = device
        self.path = RESULTS / f"{self.benchmark}-{slug or device_slug(device)}.jsonl" if self.save else None

    def __call__(self, metric: str, value: float | None, unit: str, target: Any = None,
                 better: str | None = None, **extra: Any) -> None:
        row = {"metric": metric, "value": None if value is None else round(float(value), 4), "unit": unit,
               "target": target, "better": better, "device": self.device, **extra}
        line = json.dumps(row)
        print(line, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({**row, "run": self.run}) + "\n")
