"""Peak memory and time of `bd segment`, `bd tile` and the pyramidal conversion on a generated
BCNB-sized flat JPEG (65,000 x 16,600 px, 1.08 gigapixels, no MPP), with no environment variable
set, each step on one core, against one full-resolution libvips decode of the same file.

The JPEG is written once by libvips (streaming): biopsy-like strips drawn at 1:32 (as in
``benchmarks/tiling.py``), upsampled, with a replicated noise texture (sd 7 in tissue, 2.1 on
glass) so that it compresses like a scan, not like a flat colour. Every step runs in a fresh child
process pinned to one CPU (``sched_setaffinity``), with ``VIPS_CONCURRENCY=1`` and OpenCV at one
thread, and ``OPENCV_IO_MAX_IMAGE_PIXELS`` removed from its environment; peak memory is the
child's own peak resident set (``VmHWM``: interpreter and libraries included). Each step
reports wall seconds and CPU seconds (user + system of the child: on a shared machine wall time
includes waiting for the core, CPU time does not).

Steps timed:
- reference: one sequential full-resolution decode (``vips avg``) of the JPEG, the least any
  reader of every pixel must pay;
- segment: ``bd segment --slide big.jpg`` (a 1/8 DCT-scaled decode, box shrink to 1:32, masks);
- tile: ``bd tile`` (mask, grid, QC thumbnail);
- convert: ``bd.slides.flat.write_pyramid`` (the pyramidal JPEG-tiled TIFF that extraction reads);
- read: ``bd.slides.readers.plan_reader`` on the JPEG (the conversion, as ``bd extract`` does it) and
  2,000 patches of the grid through the stored-tile reader.

Prints one JSON object per line: {"metric", "value", "unit", "target", "better"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from record import cpu_name  # noqa: E402  (benchmarks/record.py)


def emit(metric: str, value: float, unit: str, target: float | None = None, better: str | None = None) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "target": target, "better": better}),
          flush=True)


def generate(path: Path, width: int, height: int, seed: int) -> None:
    """A flat JPEG of tissue strips on glass, written by libvips without holding it in memory."""
    import cv2
    import numpy as np
    import pyvips

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tiling import draw_tissue  # benchmarks/tiling.py

    low = draw_tissue(max(width, height) // 32, seed)
    low = cv2.resize(low, (width // 32, height // 32), interpolation=cv2.INTER_AREA)
    base = pyvips.Image.new_from_array(np.ascontiguousarray(low)).resize(32, kernel="linear")
    base = base.embed(0, 0, width, height, extend="copy")
    rng = np.random.default_rng(seed)
    tile = rng.normal(0, 7, (1024, 1024, 3)).astype(np.float32)
    noise = pyvips.Image.new_from_array(tile).replicate(width // 1024 + 1, height // 1024 + 1).crop(0, 0, width, height)
    glass = (np.abs(low.astype(np.float32) - [236, 234, 240]).sum(-1) < 20).astype(np.float32)  # 1 on glass
    amount = pyvips.Image.new_from_array(np.ascontiguousarray(1 - 0.7 * glass)).resize(32, kernel="linear")
    amount = amount.embed(0, 0, width, height, extend="copy")
    image = (base.cast("float") + noise * amount).cast("uchar").copy(interpretation="srgb")
    image.jpegsave(str(path), Q=85, strip=True)


def child(step: str, args: list[str]) -> None:
    """Run one step in this (fresh) process on one CPU and print seconds and peak memory."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)
    start = time.perf_counter()
    if step == "reference":
        import pyvips

        pyvips.Image.new_from_file(args[0], access="sequential").avg()
    elif step in ("segment", "tile"):
        from bd import cli

        if cli.main([step, *args]) != 0:
            raise SystemExit(f"bd {step} failed")
    elif step == "convert":
        from bd.slides.flat import write_pyramid

        write_pyramid(Path(args[0]), Path(args[1]), 0.5)
    elif step == "read":
        import numpy as np

        from bd.slides.grid import load_grid
        from bd.slides.readers import open_reader, plan_reader

        grid = load_grid(args[1])
        spec = plan_reader(args[0], grid.read_level, grid.read_downsample, grid.read_size, grid.mpp)
        reader = open_reader(spec)
        coords = grid.coords[np.linspace(0, len(grid) - 1, min(2000, len(grid))).astype(int)]
        for x, y in coords:
            reader.read(int(x), int(y))
        reader.close()
        print(json.dumps({"reader": spec.kind, "patches": len(coords)}), file=sys.stderr)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory since it was exec'd (VmHWM; ``ru_maxrss`` would carry
    the forking parent's over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(step: str, *args: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    env.update(VIPS_CONCURRENCY="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", step, *args], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=65_000)
    parser.add_argument("--height", type=int, default=16_600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the JPEG and outputs (default: a temporary one)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2:])
        return 0
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bd-gigapixel-", dir=args.workdir) as tmp:
        work = Path(tmp)
        jpeg = work / "big.jpg"
        start = time.perf_counter()
        generate(jpeg, args.width, args.height, args.seed)
        print(json.dumps({"metric": "cpu", "value": cpu_name(), "unit": "", "target": None, "better": None}))
        emit("image_pixels", args.width * args.height / 1e9, "gigapixels")
        emit("jpeg_size", jpeg.stat().st_size / 2**20, "MiB")
        emit("generation_time", time.perf_counter() - start, "s")
        ref = run_child("reference", str(jpeg))
        emit("reference_full_decode_time", ref["seconds"], "s")
        emit("reference_full_decode_cpu_time", ref["cpu_seconds"], "s")
        emit("reference_full_decode_peak_memory", ref["peak_mb"], "MB")
        seg_dir, grid = work / "seg", work / "big.npz"
        seg = run_child("segment", "--slide", str(jpeg), "--out-dir", str(seg_dir), "--fallback-mpp", "0.5")
        emit("segment_time", seg["seconds"], "s", 60.0, "lower")
        emit("segment_cpu_time", seg["cpu_seconds"], "s", 60.0, "lower")
        emit("segment_peak_memory", seg["peak_mb"], "MB", 1000.0, "lower")
        emit("segment_time_vs_full_decode", seg["cpu_seconds"] / ref["cpu_seconds"], "ratio")
        tile = run_child("tile", "--slide", str(jpeg), "--mask", str(seg_dir / "mask.png"), "--out", str(grid),
                         "--qc", str(work / "big.qc.png"), "--fallback-mpp", "0.5")
        emit("tile_time", tile["seconds"], "s", 60.0, "lower")
        emit("tile_cpu_time", tile["cpu_seconds"], "s", 60.0, "lower")
        emit("tile_peak_memory", tile["peak_mb"], "MB", 1000.0, "lower")
        conv = run_child("convert", str(jpeg), str(work / "big.tif"))
        emit("convert_time", conv["seconds"], "s", 30.0, "lower")
        emit("convert_cpu_time", conv["cpu_seconds"], "s", 30.0, "lower")
        emit("convert_peak_memory", conv["peak_mb"], "MB", 1000.0, "lower")
        emit("convert_time_vs_full_decode", conv["cpu_seconds"] / ref["cpu_seconds"], "ratio")
        emit("pyramid_size", (work / "big.tif").stat().st_size / 2**20, "MiB")
        (work / "big.tif").unlink()
        read = run_child("read", str(jpeg), str(grid))
        emit("plan_and_read_2000_patches_time", read["seconds"], "s")
        emit("plan_and_read_2000_patches_cpu_time", read["cpu_seconds"], "s")
        emit("plan_and_read_peak_memory", read["peak_mb"], "MB", 1000.0, "lower")
        from bd.slides.grid import load_grid

        emit("patches_kept", len(load_grid(grid)), "patches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
