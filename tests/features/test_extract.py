"""bd extract: store layout and attributes, reproducibility across batch sizes and workers,
atomic stores under SIGKILL, decode errors (fail or skip), several slides per job, config sync."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import timm
import torch
import torch.nn.functional as F

from bd import cli
from bd.features.encoders import create_encoder
from bd.errors import ConfigError, SlideError, StoreError
from bd.features.extract import FeatureParams, SlideJob, extract_slides
from bd.slides.grid import PatchGrid, save_grid
from bd.params import build
from bd.features.store import read_store

ROOT = Path(__file__).resolve().parents[2]
TINY = {  # a tiny encoder keeps these tests fast; the pipeline is the same as resnet50/layer3
    "encoder": "resnet18", "out_stage": "layer1", "random_weights": True, "input_size": 64,
    "batch_size": 16, "num_workers": 0, "device": "cpu",
}
SIZE, TILE = 96, 128  # patch pixels at the read level; JPEG tile side


def write_jpeg_pyramid(path: Path, rgb: np.ndarray, levels: int = 2) -> Path:
    with tifffile.TiffWriter(path) as tif:
        for i in range(levels):
            tif.write(rgb[:: 2**i, :: 2**i].copy(), tile=(TILE, TILE), photometric="rgb",
                      compression="jpeg", compressionargs={"level": 90},
                      subfiletype=1 if i else 0, maxworkers=1)
    return path


def make_grid(path: Path, slide_id: str, coords: np.ndarray, width: int = 640, height: int = 512) -> Path:
    grid = PatchGrid(
        coords=coords, slide_id=slide_id, slide_width=width, slide_height=height, mpp=0.5,
        target_mpp=0.75, patch_size=64, patch_size_level0=float(SIZE), read_level=0,
        read_downsample=1.0, read_size=SIZE,
    )
    return save_grid(grid, path)


def grid_coords(width: int = 640, height: int = 512, step: int = 80) -> np.ndarray:
    """Patches every 80 px (not tile-aligned), the last ones overlapping the borders."""
    xs, ys = np.meshgrid(np.arange(0, width, step), np.arange(0, height, step))
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, make_rgb) -> tuple[Path, Path]:
    """A 640 x 512 two-level JPEG-tiled TIFF and a grid of 56 patches over it."""
    folder = tmp_path_factory.mktemp("extract")
    slide = write_jpeg_pyramid(folder / "s1.tif", make_rgb(640, 512, seed=7))
    return slide, make_grid(folder / "s1.npz", "s1", grid_coords())


def extract(slide: Path, grid: Path, out: Path, **overrides) -> Path:
    (path,) = extract_slides([SlideJob(str(slide), str(grid), str(out))], {**TINY, **overrides})
    return path


def test_store_layout_and_attributes(case, tmp_path: Path) -> None:
    import zarr

    slide, grid = case
    fs = read_store(extract(slide, grid, tmp_path / "s1.zarr"))
    n = len(grid_coords())
    assert fs.features.shape == (n, 64) and fs.features.dtype == np.float16
    np.testing.assert_array_equal(fs.coords, grid_coords())
    assert np.isfinite(fs.features).all() and fs.features.std() > 0
    root = zarr.open_group(str(tmp_path / "s1.zarr"), mode="r")
    assert root["features"].chunks == (n, 64) and root["coords"].dtype == np.int64
    a = fs.attrs
    assert a["complete"] is True and a["n_patches"] == n and a["feature_dim"] == 64
    assert (a["encoder"], a["out_stage"], a["weights_sha256"]) == ("resnet18", "layer1", "random")
    assert (a["patch_size"], a["target_mpp"], a["mpp"], a["read_level"], a["read_size"]) == (
        64, 0.75, 0.5, 0, SIZE)
    from bd.device import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"))[0]  # fp32 unless the CPU has native bf16
    assert a["input_size"] == 64 and a["reader"] == "tiff-jpeg" and a["precision"] == auto
    assert a["skipped_patches"] == 0 and a["skipped"] == []
    assert set(a["versions"]) == {"bd", "torch", "timm"} and a["versions"]["torch"] == torch.__version__
    assert a["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert (a["model_kwargs"], a["pool"], a["encoder_args"]["architecture"]) == ({}, "model", "resnet18")
    assert (a["slide_id"], a["slide_width"], a["slide_height"]) == ("s1", 640, 512)  # checked by bd predict


def test_features_equal_an_independent_computation(case, tmp_path: Path) -> None:
    """OpenSlide pixels, resized and normalised by hand, through the same encoder."""
    slide, grid = case
    fs = read_store(extract(slide, grid, tmp_path / "s1.zarr"))
    encoder, config = create_encoder("resnet18", "layer1", random_weights=True)
    osr = openslide.OpenSlide(str(slide))
    rows = [0, 9, 55]
    patches = []
    for x, y in grid_coords()[rows]:
        rgba = np.asarray(osr.read_region((int(x), int(y)), 0, (SIZE, SIZE))).astype(np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255) + 255 * (1 - rgba[..., 3:] / 255)
        patches.append(torch.from_numpy(rgb).permute(2, 0, 1) / 255)
    x = F.interpolate(torch.stack(patches), size=(64, 64), mode="bilinear", antialias=True)
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = encoder((x - mean) / std).half().float().numpy()
    np.testing.assert_allclose(fs.features[rows].astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_same_features_across_batch_sizes_workers_and_runs(case, tmp_path: Path) -> None:
    slide, grid = case
    base = read_store(extract(slide, grid, tmp_path / "a.zarr")).features
    again = read_store(extract(slide, grid, tmp_path / "b.zarr")).features
    np.testing.assert_array_equal(base, again)  # same slide twice on CPU: identical
    workers = read_store(extract(slide, grid, tmp_path / "c.zarr", num_workers=2)).features
    np.testing.assert_array_equal(base, workers)  # same batches, read in worker processes
    for batch_size, num_workers in [(7, 2), (56, 0)]:
        other = extract(slide, grid, tmp_path / f"b{batch_size}.zarr", batch_size=batch_size,
                        num_workers=num_workers)
        np.testing.assert_allclose(read_store(other).features.astype(np.float32),
                                   base.astype(np.float32), rtol=2e-3, atol=2e-3)  # fp16 rounding


def test_generic_reader_gives_the_same_features(case, tmp_path: Path) -> None:
    slide, grid = case
    fast = read_store(extract(slide, grid, tmp_path / "fast.zarr"))
    slow = read_store(extract(slide, grid, tmp_path / "slow.zarr", reader="slide"))
    assert (fast.attrs["reader"], slow.attrs["reader"]) == ("tiff-jpeg", "slide")
    np.testing.assert_allclose(fast.features.astype(np.float32), slow.features.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def test_flat_jpeg_is_read_through_bd_slide_and_shared_by_workers(flat_jpeg: Path, tmp_path: Path) -> None:
    """BCNB-style flat JPEGs: decoded once in the parent, inherited by forked workers."""
    grid = make_grid(tmp_path / "flat.npz", "flat", grid_coords(3000, 2000, step=700), 3000, 2000)
    one = read_store(extract(flat_jpeg, grid, tmp_path / "w0.zarr"))
    two = read_store(extract(flat_jpeg, grid, tmp_path / "w2.zarr", num_workers=2, batch_size=4))
    assert one.attrs["reader"] == "slide" and one.features.shape == (15, 64)
    np.testing.assert_allclose(one.features.astype(np.float32), two.features.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def test_empty_grid_gives_an_empty_complete_store(case, tmp_path: Path) -> None:
    slide, _ = case
    grid = make_grid(tmp_path / "empty.npz", "empty", np.zeros((0, 2), np.int64))
    fs = read_store(extract(slide, grid, tmp_path / "empty.zarr"))
    assert fs.features.shape == (0, 64) and fs.coords.shape == (0, 2)
    assert fs.attrs["complete"] and fs.attrs["n_patches"] == 0


def test_killed_job_leaves_no_complete_store_and_rerun_completes(case, tmp_path: Path) -> None:
    slide, _ = case
    coords = np.tile(grid_coords(), (12, 1))  # 672 patches in batches of 2: a few seconds
    grid = make_grid(tmp_path / "big.npz", "big", coords)
    out = tmp_path / "big.zarr"
    params = {**TINY, "batch_size": 2}
    cmd = [sys.executable, "-m", "bd", "extract", "--slide", str(slide), "--grid", str(grid),
           "--out", str(out), "--params", json.dumps(params)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".big.zarr.tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "extraction finished before it could be killed mid-slide"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    (partial,) = tmp_path.glob(".big.zarr.tmp-*")
    with pytest.raises(StoreError, match="incomplete"):
        read_store(partial)
    fs = read_store(extract(slide, grid, out, batch_size=64))
    assert fs.features.shape == (len(coords), 64)


def test_unreadable_slide_names_slide_and_region(data_dir: Path, tmp_path: Path) -> None:
    slide = tmp_path / "unreadable.svs"
    shutil.copy(data_dir / "unreadable.svs", slide)
    grid = make_grid(tmp_path / "u.npz", "u", np.array([[0, 0], [8, 8]]), width=16, height=16)
    out = tmp_path / "u.zarr"
    for reader in ("auto", "slide"):
        with pytest.raises(SlideError) as info:
            extract(slide, grid, out, reader=reader)
        assert str(slide) in str(info.value) and "x=0, y=0, level=0" in str(info.value)
        assert not out.exists() and not list(tmp_path.glob(".u.zarr.tmp-*"))
    skipped = read_store(extract(slide, grid, out, on_decode_error="skip", num_workers=2))
    assert skipped.features.shape == (0, 64)
    assert skipped.attrs["skipped_patches"] == 2 and skipped.attrs["skipped"] == [[0, 0], [8, 8]]


def test_cli_reports_decode_errors_without_traceback(data_dir: Path, tmp_path: Path, capsys) -> None:
    grid = make_grid(tmp_path / "u.npz", "u", np.array([[0, 0]]), width=16, height=16)
    code = cli.main(["extract", "--slide", str(data_dir / "unreadable.svs"), "--grid", str(grid),
                     "--out", str(tmp_path / "u.zarr"), "--params", json.dumps(TINY)])
    err = capsys.readouterr().err
    assert code == 2 and "unreadable.svs: region x=0, y=0, level=0" in err and "Traceback" not in err


def test_corrupt_tile_is_skipped_and_counted(case, tmp_path: Path) -> None:
    slide, grid = case
    broken = tmp_path / "broken.tif"
    shutil.copy(slide, broken)
    with tifffile.TiffFile(broken) as tif:  # tile (row 1, column 2): x 256-383, y 128-255
        page = tif.pages[0]
        index = 1 * 5 + 2  # 5 tiles per row
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(broken, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\x00" * (count - 2))
    with pytest.raises(SlideError, match=r"broken\.tif: region x=\d+, y=\d+, level=0"):
        extract(broken, grid, tmp_path / "fail.zarr")
    fs = read_store(extract(broken, grid, tmp_path / "skip.zarr", on_decode_error="skip"))
    coords = grid_coords()
    hit = ((coords[:, 0] < 384) & (coords[:, 0] + SIZE > 256)
           & (coords[:, 1] < 256) & (coords[:, 1] + SIZE > 128))
    assert fs.attrs["skipped_patches"] == hit.sum() > 0
    assert fs.attrs["skipped"] == coords[hit].tolist()
    np.testing.assert_array_equal(fs.coords, coords[~hit])
    full = read_store(extract(slide, grid, tmp_path / "full.zarr")).features
    np.testing.assert_array_equal(fs.features, full[~hit])


def test_several_slides_per_job_and_resume(case, tmp_path: Path, make_rgb, caplog) -> None:
    slide, grid = case
    slide2 = write_jpeg_pyramid(tmp_path / "s2.tif", make_rgb(640, 512, seed=8))
    grid2 = make_grid(tmp_path / "s2.npz", "s2", grid_coords()[:10])
    out1, out2 = tmp_path / "s1.zarr", tmp_path / "s2.zarr"
    jobs = tmp_path / "jobs.tsv"
    jobs.write_text(f"slide\tgrid\tout\n{slide2}\t{grid2}\t{out2}\n")
    args = ["extract", "--slide", str(slide), "--grid", str(grid), "--out", str(out1),
            "--jobs", str(jobs), "--params", json.dumps(TINY)]
    assert cli.main(args) == 0
    assert read_store(out1).features.shape[0] == 56 and read_store(out2).features.shape[0] == 10
    stamp = (out1 / "zarr.json").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bd.features.extract"):
        assert cli.main([*args, "--resume"]) == 0
    assert (out1 / "zarr.json").stat().st_mtime_ns == stamp
    assert caplog.text.count("same settings exists, skipped") == 2
    assert cli.main([*args[:-1], json.dumps({**TINY, "input_size": 48}), "--resume"]) == 0
    assert read_store(out1).attrs["input_size"] == 48  # other settings: extracted again


def test_mismatched_arguments_and_bad_params_fail(case, tmp_path: Path) -> None:
    slide, grid = case
    assert cli.main(["extract", "--slide", str(slide), "--out", str(tmp_path / "x.zarr")]) == 2
    with pytest.raises(ConfigError, match="unknown key 'features.batchsize'"):
        extract_slides([SlideJob(str(slide), str(grid), str(tmp_path / "x.zarr"))],
                       {**TINY, "batchsize": 4})
    with pytest.raises(ConfigError, match="features.batch_size"):
        build(FeatureParams, {**TINY, "batch_size": 0})


def test_issue_example_vit_checkpoint_offline_through_bd_extract(svs_path: Path, tmp_path: Path, monkeypatch) -> None:
    """A LayerScale ViT-S/16 checkpoint with model_kwargs, its own mean/std and no out_stage: 384-d
    features of a real SVS through `bd extract`, with the network off; they equal the ViT applied by
    hand to OpenSlide's pixels normalised with the configured mean/std."""
    import socket

    from bd.slides.segment import SegmentParams, segment_slide
    from bd.slides.slide import open_slide
    from bd.slides.tiling import TileParams, tile_slide

    with open_slide(svs_path) as slide:
        seg = segment_slide(slide, SegmentParams())
        grid = tile_slide(slide, seg.mask, seg.scale, TileParams(target_mpp=0.5, patch_size=224, max_patches=4),
                          "cmu1")
    assert len(grid) == 4
    grid_path = save_grid(grid, tmp_path / "grid.npz")
    torch.manual_seed(7)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, init_values=1e-5)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))  # off the init, so the LayerScale blocks matter
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    mean, std = [0.70, 0.58, 0.70], [0.21, 0.23, 0.18]
    params = {"encoder": "vit_small_patch16_224", "out_stage": None, "model_kwargs": {"init_values": 1e-5},
              "weights": str(tmp_path / "vit.pth"), "mean": mean, "std": std, "input_size": 224,
              "batch_size": 4, "num_workers": 0, "device": "cpu"}

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    out = tmp_path / "cmu1.zarr"
    assert cli.main(["extract", "--slide", str(svs_path), "--grid", str(grid_path), "--out", str(out),
                     "--params", json.dumps(params)]) == 0
    fs = read_store(out)
    assert fs.features.shape == (4, 384)
    assert fs.attrs["mean"] == pytest.approx(mean) and fs.attrs["std"] == pytest.approx(std)
    assert fs.attrs["model_kwargs"] == {"init_values": 1e-5} and fs.attrs["out_stage"] is None
    osr = openslide.OpenSlide(str(svs_path))
    patches = []
    for x, y in fs.coords:
        rgba = np.asarray(osr.read_region((int(x), int(y)), 0, (grid.read_size, grid.read_size)))
        patches.append(torch.from_numpy(rgba[..., :3].astype(np.float32)).permute(2, 0, 1) / 255)
    x = F.interpolate(torch.stack(patches), size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = vit.eval()(x).numpy()
    np.testing.assert_allclose(fs.features.astype(np.float32), expected, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- device path (decode, precision, compile, prefetch)


def write_ycbcr_pyramid(path: Path, rgb: np.ndarray) -> Path:
    """YCbCr-coded JPEG tiles with shared tables (abbreviated streams, as most TIFF writers)."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                  compressionargs={"level": 90, "outcolorspace": "ycbcr"}, maxworkers=1)
    return path


@pytest.fixture(scope="module")
def ycbcr_case(tmp_path_factory: pytest.TempPathFactory, make_rgb) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ycbcr")
    slide = write_ycbcr_pyramid(folder / "y.tif", make_rgb(640, 512, seed=9))
    return slide, make_grid(folder / "y.npz", "y", grid_coords())


def test_decode_choice(ycbcr_case, data_dir: Path, flat_jpeg: Path) -> None:
    from bd.features.extract import choose_decode
    from bd.slides.readers import ReadSpec, SlideReader, TiffJpegReader

    slide, _ = ycbcr_case
    ycbcr = TiffJpegReader(ReadSpec(str(slide), 0, 1.0, SIZE, kind="tiff-jpeg"))
    aperio = TiffJpegReader(ReadSpec(str(data_dir / "cmu-1-small-region.svs"), 0, 1.0, SIZE, kind="tiff-jpeg"))
    flat = SlideReader(ReadSpec(str(flat_jpeg), 0, 1.0, SIZE, mpp=0.5))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_decode("auto", cuda, ycbcr)[0] == "cuda"
    assert choose_decode("cuda", cuda, ycbcr)[0] == "cuda"
    assert choose_decode("auto", cpu, ycbcr) == ("cpu", "the encoder runs on cpu")
    assert choose_decode("cpu", cuda, ycbcr)[0] == "cpu"
    decode, why = choose_decode("auto", cuda, aperio)
    assert decode == "cpu" and "RGB-coded" in why  # Aperio's RGB-coded tiles stay on the CPU reader
    assert choose_decode("cuda", cuda, flat)[0] == "cpu"
    assert choose_decode("auto", cuda, None)[0] == "cpu"  # a reader that cannot be shared
    for reader in (ycbcr, aperio, flat):
        reader.close()


def test_decode_cuda_without_cuda_is_a_config_error(case, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    slide, grid = case
    with pytest.raises(ConfigError, match="features.decode"):
        extract(slide, grid, tmp_path / "x.zarr", decode="cuda")


def test_batched_tile_decode_and_gather_equal_the_cpu_reader(ycbcr_case, data_dir: Path) -> None:
    """decode_jpeg (here on the CPU: torchvision's libjpeg) + one gather give the reader's pixels,
    borders, outside and sub-tile offsets included."""
    from bd.slides.device_decode import TileStreamBatches, assemble, decode_tiles
    from bd.slides.readers import ReadSpec, TiffJpegReader

    slide, _ = ycbcr_case
    from bd.slides.device_decode import full_stream
    from bd.slides.readers import decode_tile

    aperio = TiffJpegReader(ReadSpec(str(data_dir / "cmu-1-small-region.svs"), 0, 1.0, SIZE, kind="tiff-jpeg"))
    assert aperio.tables  # abbreviated streams: decode_jpeg gets the tables spliced in
    data = bytes(TileStreamBatches(aperio, np.array([[0, 0]]), 1)[0]["streams"][0].numpy())
    np.testing.assert_array_equal(decode_tile(data, None, rgb=True)[:SIZE, :SIZE], aperio.read(0, 0))
    assert full_stream(b"\xff\xd8tile", None) == b"\xff\xd8tile"
    aperio.close()
    reader = TiffJpegReader(ReadSpec(str(slide), 0, 1.0, SIZE, kind="tiff-jpeg"))
    coords = np.array([*grid_coords(), [-50, -40], [600, 480], [2000, 10], [127, 129]])
    batches = TileStreamBatches(reader, coords, 16)
    worst = 0
    for i in range(len(batches)):
        b = batches[i]
        tiles = decode_tiles(b["streams"], torch.device("cpu"), reader.tile_h, reader.tile_w)
        patches = assemble(tiles, b["tiles"], b["origins"], reader).numpy()
        for k in range(b["n"]):
            ref = reader.read(*(int(v) for v in coords[b["start"] + k]))
            worst = max(worst, int(np.abs(patches[k].astype(int) - ref.astype(int)).max()))
    assert worst <= 2  # JPEG decoders may round differently; here both are libjpeg-turbo
    assert (assemble(*_one(batches, reader, [2000, 10])) == 255).all()  # outside: white
    reader.close()


def _one(batches, reader, xy):
    from bd.slides.device_decode import decode_tiles

    b = batches.__class__(reader, np.array([xy]), 1)[0]
    return decode_tiles(b["streams"], torch.device("cpu"), reader.tile_h, reader.tile_w), b["tiles"], b["origins"], reader


def force_device_decode(monkeypatch) -> None:
    """Take the device-decode path with the CPU as the device (how it is tested without a GPU)."""
    import bd.features.extract

    monkeypatch.setattr(bd.features.extract, "choose_decode", lambda asked, device, reader: ("cuda", "forced by the test"))


def test_device_decode_path_gives_the_cpu_readers_features(ycbcr_case, tmp_path: Path, monkeypatch) -> None:
    slide, grid = ycbcr_case
    ref = read_store(extract(slide, grid, tmp_path / "cpu.zarr"))
    force_device_decode(monkeypatch)
    got = read_store(extract(slide, grid, tmp_path / "dev.zarr", num_workers=1))
    assert (got.attrs["decode"], ref.attrs["decode"]) == ("cuda", "cpu")  # the path each store took
    np.testing.assert_array_equal(got.coords, ref.coords)
    np.testing.assert_allclose(got.features.astype(np.float32), ref.features.astype(np.float32), atol=2e-2, rtol=2e-2)


def test_failed_device_decode_falls_back_to_the_cpu_reader(ycbcr_case, tmp_path: Path, monkeypatch) -> None:
    slide, grid = ycbcr_case
    broken = tmp_path / "broken.tif"
    shutil.copy(slide, broken)
    with tifffile.TiffFile(broken) as tif:
        page = tif.pages[0]
        index = 1 * 5 + 2
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(broken, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\x00" * (count - 4))  # the end-of-image marker stays: libjpeg decodes grey, nvJPEG fails
    import bd.features.extract
    from bd.slides.device_decode import decode_tiles as real

    calls = []

    def failing(streams, device, th, tw):
        calls.append(len(streams))
        if any(len(s) and bytes(s[-count:-2]) == b"\x00" * (count - 4) for s in streams):
            raise RuntimeError("nvJPEG: bad stream")
        return real(streams, device, th, tw)

    force_device_decode(monkeypatch)
    monkeypatch.setattr(bd.features.extract, "decode_tiles", failing)
    with pytest.raises(SlideError, match=r"broken\.tif: region x=\d+, y=\d+"):
        extract(broken, grid, tmp_path / "fail.zarr")
    fs = read_store(extract(broken, grid, tmp_path / "skip.zarr", on_decode_error="skip"))
    assert calls and fs.attrs["skipped_patches"] > 0  # the CPU reader judged the batch patch by patch
    monkeypatch.undo()
    ref = read_store(extract(broken, grid, tmp_path / "cpu.zarr", on_decode_error="skip"))
    assert fs.attrs["skipped"] == ref.attrs["skipped"]
    np.testing.assert_array_equal(fs.features, ref.features)


def test_bf16_encoder_runs_in_bf16_channels_last(case, tmp_path: Path) -> None:
    from bd.features.extract import Extractor

    slide, grid = case
    extractor = Extractor(build(FeatureParams, {**TINY, "precision": "bf16"}))
    weight = next(extractor.model.encoder.parameters())
    assert weight.dtype == torch.bfloat16 and extractor.precision == "bf16"
    conv = next(m for m in extractor.model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = read_store(extract(slide, grid, tmp_path / "bf16.zarr", precision="bf16"))
    ref = read_store(extract(slide, grid, tmp_path / "fp32.zarr", precision="fp32"))
    assert got.attrs["precision"] == "bf16" and ref.attrs["precision"] == "fp32"
    a, b = got.features.astype(np.float32), ref.features.astype(np.float32)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99  # bf16 rounding, same features


def test_compiled_encoder_gives_the_same_features(case, tmp_path: Path) -> None:
    """features.compile: torch.compile of the encoder (skipped where inductor cannot build here)."""
    slide, grid = case
    ref = read_store(extract(slide, grid, tmp_path / "eager.zarr"))
    start = time.perf_counter()
    try:
        got = read_store(extract(slide, grid, tmp_path / "compiled.zarr", compile=True))
    except Exception as exc:  # noqa: BLE001 - no C++ toolchain, unsupported platform
        pytest.skip(f"torch.compile is not usable here: {type(exc).__name__}: {str(exc)[:200]}")
    assert got.attrs["compile"] is True and time.perf_counter() - start < 600
    np.testing.assert_allclose(got.features.astype(np.float32), ref.features.astype(np.float32), atol=2e-2, rtol=2e-2)


def test_next_slide_is_prefetched_in_a_group_job(case, tmp_path: Path, make_rgb, caplog) -> None:
    slide, grid = case
    slide2 = write_jpeg_pyramid(tmp_path / "s2.tif", make_rgb(640, 512, seed=8))
    grid2 = make_grid(tmp_path / "s2.npz", "s2", grid_coords()[:20])
    jobs = [SlideJob(str(slide), str(grid), str(tmp_path / "a1.zarr")),
            SlideJob(str(slide2), str(grid2), str(tmp_path / "a2.zarr")),
            SlideJob(str(tmp_path / "missing.tif"), str(grid2), str(tmp_path / "a3.zarr"))]
    with caplog.at_level(logging.INFO, logger="bd.features.extract"):
        outs = extract_slides(jobs, {**TINY, "num_workers": 1}, on_slide_error="skip")
    assert caplog.text.count("(prefetched)") == 1  # slide 2; slide 3 failed when prefetched ...
    assert read_store(outs[2]).attrs["error_stage"] == "extract"  # ... and is recorded when its turn came
    one = [extract(s, g, tmp_path / f"b{i}.zarr") for i, (s, g) in enumerate([(slide, grid), (slide2, grid2)])]
    for a, b in zip(outs, one):
        np.testing.assert_array_equal(read_store(a).features, read_store(b).features)


def test_each_job_claims_a_gpu_of_its_own(tmp_path: Path, monkeypatch) -> None:
    """On a node with several GPUs each extraction job sees only its own (lock files, set before
    CUDA starts); one visible GPU (a SLURM job's) is left as it is."""
    import threading

    from bd import device

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    try:
        assert device.claim_gpu(tmp_path) == "0"
        assert device.visible_gpus() == ["0"]  # this process now sees GPU 0 only
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # as a second job starts
        assert device.claim_gpu(tmp_path) == "1"  # GPU 0's lock is held
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        got: list[str | None] = []
        waiter = threading.Thread(target=lambda: got.append(device.claim_gpu(tmp_path, poll_s=0.05)))
        waiter.start()
        time.sleep(0.3)
        assert not got  # both taken: the third job waits ...
        fd = device._CLAIMED.pop("1")
        os_close = __import__("os").close
        os_close(fd)  # ... until one ends
        waiter.join(5)
        assert got == ["1"]
    finally:
        device.release_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert device.claim_gpu(tmp_path) is None and device.visible_gpus() == ["3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device.visible_gpus() == []
