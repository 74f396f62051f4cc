"""Fault injection: broken slides under both ``on_slide_error`` policies, processes killed mid-job,
a full disk, an unwritable output folder, bad configs, and an audit that every write is atomic.

Each corrupt-slide kind (corrupt, truncated TIFF and JPEG, zero bytes, missing, unsupported
format, a text file renamed) goes through the real command line, segment -> tile -> extract, with a
tiny encoder. With ``fail`` the first stage stops, naming the file, and leaves no output; with
``skip`` every stage exits 0, the error travels from the mask to the grid to an empty complete
feature store, ``bd qc`` lists it, and the patient's bag is empty (the patient counts as missing
the slide). One Snakemake run (marked slow) shows the same through the workflow.
"""

from __future__ import annotations

import ast
import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from bd import cli
from bd.mil.bags import load_cohort
from bd.errors import BDError
from bd.slides.grid import PatchGrid, load_grid, save_grid
from bd.io import write_json
from bd.features.store import read_store, write_store
from conftest import synthetic_rgb

ROOT = Path(__file__).resolve().parents[2]
SEGMENT = json.dumps({"min_tissue_area_um2": 500, "min_hole_area_um2": 100})
TILE = json.dumps({"target_mpp": 1.0, "patch_size": 64, "tissue_threshold": 0.25})
TINY = {"encoder": "resnet18", "out_stage": "layer1", "random_weights": True, "input_size": 32,
        "batch_size": 16, "num_workers": 0, "device": "cpu"}
PLAIN_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread (several crawl on a busy machine), also in the forked processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- slides, good and broken


def write_pyramid(path: Path, rgb: np.ndarray, levels: int = 3) -> Path:
    """A JPEG-tiled pyramidal TIFF at 0.5 um/px (OpenSlide reads it as a generic TIFF)."""
    with tifffile.TiffWriter(path) as tif:
        for i in range(levels):
            tif.write(rgb[:: 2**i, :: 2**i].copy(), tile=(128, 128), photometric="rgb", compression="jpeg",
                      subfiletype=1 if i else 0, resolution=(20000, 20000), resolutionunit="CENTIMETER",
                      maxworkers=1)
    return path


def _half(source: Path, path: Path) -> Path:
    """The first half of ``source`` (a copy cut short) at ``path``."""
    data = source.read_bytes()
    return _write(path, data[: len(data) // 2])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# kind -> how to make it in a folder holding good.tif and good.jpg (tests/data for the real fixtures)
KINDS: dict[str, Callable[[Path], Path]] = {
    "corrupt": lambda d: Path(shutil.copy(ROOT / "tests/data/unreadable.svs", d / "corrupt.svs")),
    "truncated_tiff": lambda d: _half(d / "good.tif", d / "truncated.tif"),
    "truncated_jpeg": lambda d: _half(d / "good.jpg", d / "truncated.jpg"),
    "zero_bytes": lambda d: _write(d / "zero.svs", b""),
    "missing": lambda d: d / "gone.tif",
    "unsupported": lambda d: Path(shutil.copy(ROOT / "tests/data/broken.svs", d / "broken.svs")),
    "renamed_text": lambda d: _write(d / "notes.tif", b"patient notes\n" * 50),
}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """slide id -> file: ``good`` (readable pyramid) and one slide of each broken kind."""
    folder = tmp_path_factory.mktemp("slides")
    rgb = synthetic_rgb(768, 512, seed=3)
    write_pyramid(folder / "good.tif", rgb)
    assert cv2.imwrite(str(folder / "good.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return {"good": folder / "good.tif", **{kind: make(folder) for kind, make in KINDS.items()}}


def bd(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


def run_stages(slide: Path, sid: str, results: Path, policy: str) -> list[int]:
    """segment -> tile -> extract of one slide through the command line; exit codes of those run."""
    seg, grid, store = results / "segment" / sid, results / "tiles" / f"{sid}.npz", results / "features" / f"{sid}.zarr"
    codes = [bd("segment", "--slide", slide, "--out-dir", seg, "--params", SEGMENT, "--fallback-mpp", "0.5",
                "--on-error", policy)]
    if codes[-1] == 0:
        codes.append(bd("tile", "--slide", slide, "--mask", seg / "mask.png", "--out", grid, "--qc",
                        results / "tiles" / f"{sid}.qc.png", "--params", TILE, "--fallback-mpp", "0.5",
                        "--on-error", policy))
    if codes[-1] == 0:
        codes.append(bd("extract", "--slide", slide, "--grid", grid, "--out", store, "--params", json.dumps(TINY),
                        "--on-error", policy))
    return codes


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of interrupted or failed atomic writes."""
    return [p for p in folder.rglob(".*.tmp-*")] if folder.exists() else []


@pytest.fixture(scope="module")
def skipped(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[int]]]:
    """Every slide through the three stages under ``skip``: the results folder and exit codes."""
    results = tmp_path_factory.mktemp("skip") / "results"
    codes = {sid: run_stages(path, sid, results, "skip") for sid, path in slides.items()}
    return results, codes


# ---------------------------------------------------------------- each kind under each policy


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_broken_slide_under_fail_stops_naming_the_file(kind, slides, tmp_path, capsys):
    results = tmp_path / "results"
    assert run_stages(slides[kind], kind, results, "fail") == [2]
    err = capsys.readouterr().err
    assert str(slides[kind]) in err and "bd segment: error:" in err and "Traceback" not in err
    assert not (results / "segment" / kind / "mask.png").exists() and not leftovers(results)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_broken_slide_under_skip_is_recorded_by_every_stage(kind, slides, skipped):
    results, codes = skipped
    assert codes[kind] == [0, 0, 0]
    info = json.loads((results / "segment" / kind / "mask.json").read_text())
    assert str(slides[kind]) in info["error"] and info["error_stage"] == "segment"
    grid = load_grid(results / "tiles" / f"{kind}.npz")
    assert len(grid) == 0 and grid.meta["error"] == info["error"] and grid.meta["error_stage"] == "segment"
    store = read_store(results / "features" / f"{kind}.zarr")
    assert store.attrs["complete"] and store.features.shape == (0, 64) and store.attrs["n_patches"] == 0
    assert store.attrs["error"] == info["error"] and store.attrs["error_stage"] == "segment"
    assert not leftovers(results)


def test_good_slide_is_unaffected_by_skip(skipped):
    results, codes = skipped
    assert codes["good"] == [0, 0, 0]
    store = read_store(results / "features" / "good.zarr")
    assert store.features.shape[0] > 10 and "error" not in store.attrs


def test_qc_table_lists_each_broken_slide_and_its_patient_counts_as_missing(slides, skipped, tmp_path):
    results, _ = skipped
    samples = pd.DataFrame({"slide_id": list(slides), "patient_id": [f"P-{s}" for s in slides],
                            "path": [str(p) for p in slides.values()]})
    samples.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    raw = pd.DataFrame({"Patient ID": samples["patient_id"], "ALN status": ["N0", "N+(1-2)"] * 4})
    raw.to_csv(tmp_path / "raw.csv", index=False)
    config = {"on_slide_error": "skip", "cohort": {"clinical_table": str(tmp_path / "raw.csv")}, "clinical": {}}
    assert bd("qc", "--samples", tmp_path / "samples.tsv", "--results", results, "--config", json.dumps(config),
              "--out", tmp_path / "qc" / "slide_errors.tsv", "--checks-out", tmp_path / "qc" / "checks.tsv") == 0

    errors = pd.read_csv(tmp_path / "qc" / "slide_errors.tsv", sep="\t", dtype=str)
    assert sorted(errors["slide_id"]) == sorted(KINDS)
    by_slide = errors.set_index("slide_id")
    for kind in KINDS:
        assert by_slide.loc[kind, "stage"] == "segment"  # run by hand, even the missing file had a segment job
        assert str(slides[kind]) in by_slide.loc[kind, "reason"] and by_slide.loc[kind, "patient_id"] == f"P-{kind}"
    checks = pd.read_csv(tmp_path / "qc" / "checks.tsv", sep="\t").set_index("check")
    assert checks.loc["slide_not_read", "count"] == len(KINDS) - 1  # the missing file is 'missing_slide_file'
    assert checks.loc["missing_slide_file", "count"] == 1 and checks.loc["missing_slide_file", "level"] == "warning"
    assert checks.loc["patient_without_usable_slide", "count"] == len(KINDS)

    clinical = pd.DataFrame({"patient_id": samples["patient_id"], "split": "train", "label": [0, 1] * 4, "age": 0.0})
    clinical.to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    cohort = load_cohort(results / "features", tmp_path / "samples.tsv", tmp_path / "clinical.tsv", progress=False)
    assert dict(zip(cohort.patient_ids, cohort.has_slide.tolist())) == {f"P-{s}": s == "good" for s in slides}


def test_slide_that_fails_during_extraction(skipped, slides, tmp_path, capsys):
    """A slide read by segmentation and tiling that breaks before extraction (re-copied badly)."""
    results, _ = skipped
    grid = results / "tiles" / "good.npz"
    broken = _half(slides["good"], tmp_path / "recopied.tif")
    out = tmp_path / "features" / "recopied.zarr"
    assert bd("extract", "--slide", broken, "--grid", grid, "--out", out, "--params", json.dumps(TINY)) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)

    assert bd("extract", "--slide", broken, "--grid", grid, "--out", out, "--params", json.dumps(TINY),
              "--on-error", "skip") == 0
    store = read_store(out)
    assert store.features.shape == (0, 64) and store.attrs["error_stage"] == "extract"
    assert str(broken) in store.attrs["error"] and not leftovers(tmp_path)


def test_recorded_error_grid_is_extracted_without_opening_the_slide(skipped, tmp_path):
    results, _ = skipped
    out = tmp_path / "gone.zarr"
    assert bd("extract", "--slide", tmp_path / "no-such-file.svs", "--grid", results / "tiles" / "corrupt.npz",
              "--out", out, "--params", json.dumps(TINY)) == 0  # even under fail: the grid records the error
    assert read_store(out).attrs["error_stage"] == "segment"


# ---------------------------------------------------------------- killed processes


def _run_logged(argv: list[str], log_path: str) -> None:
    """Child process: ``bd argv`` with its log in ``log_path``."""
    import logging

    logging.getLogger().handlers[:] = [logging.FileHandler(log_path)]
    logging.getLogger().setLevel(logging.INFO)
    os._exit(cli.main(argv))


def run_and_kill(argv: list[str], log: Path, ready: Callable[[], bool], after: float = 0.0,
                 timeout: float = 120) -> None:
    """Start ``bd argv`` in a forked process (the modules are loaded already: no start-up cost) and
    SIGKILL it once ``ready()`` holds and ``after`` seconds more; it must still be running then."""
    proc = multiprocessing.get_context("fork").Process(target=_run_logged, args=(argv, str(log)))
    proc.start()
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.is_alive(), f"finished before it could be killed:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "never reached the point to kill it"
        time.sleep(0.01)
    time.sleep(after)
    assert proc.is_alive(), "finished before it could be killed mid-job"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


def test_extraction_killed_then_rerun_equals_an_uninterrupted_run(skipped, slides, tmp_path):
    results, _ = skipped
    good = load_grid(results / "tiles" / "good.npz")
    grid = PatchGrid(**{**good.attrs(), "coords": np.tile(good.coords, (60, 1))})  # about a second of work
    save_grid(grid, tmp_path / "big.npz")
    argv = ["extract", "--slide", str(slides["good"]), "--grid", str(tmp_path / "big.npz"),
            "--params", json.dumps({**TINY, "batch_size": 2}), "--out"]
    killed = tmp_path / "killed" / "big.zarr"
    run_and_kill([*argv, str(killed)], tmp_path / "killed.log", lambda: bool(leftovers(killed.parent)), after=0.1)
    assert not killed.exists() and leftovers(killed.parent)  # a partial store under a temporary name only

    assert bd(*argv, killed) == 0  # the rerun, beside the partial store
    assert bd(*argv, tmp_path / "clean.zarr") == 0  # an uninterrupted run
    rerun, clean = read_store(killed), read_store(tmp_path / "clean.zarr")
    assert rerun.features.shape == (len(grid), 64)
    assert np.array_equal(rerun.features, clean.features) and np.array_equal(rerun.coords, clean.coords)


def write_training_layout(root: Path, n: int = 16) -> list[str]:
    """Feature stores, sample sheet and clinical table of a small cohort; the ``bd train`` arguments."""
    from synthetic_results import write_cohort_layout

    write_cohort_layout(root, n, patches=12, dim=16, clin=4, seed=2, signal=2.0, last_without_store=False)
    params = {"method": "bd", "hidden_dim": 16, "clinical_dim": 8, "prompt_length": 6, "precision": "fp32",
              "max_epochs": 15, "patience": 15, "lr": 0.02, "batch_size": 1, "device": "cpu"}
    return ["train", "--feature-index", str(root / "features"), "--samples", str(root / "samples.tsv"),
            "--clinical", str(root / "clinical.tsv"), "--seed", "1", "--params", json.dumps(params),
            "--threads", "1", "--no-progress", "--out-dir"]


def test_training_killed_then_rerun_equals_an_uninterrupted_run(tmp_path):
    argv = write_training_layout(tmp_path)
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    run_and_kill([*argv, str(killed)], log, lambda: log.exists() and log.read_text().count(" epoch ") >= 2)
    assert not (killed / "checkpoint.pt").exists() and not leftovers(tmp_path)

    assert bd(*argv, killed) == 0  # the rerun
    assert bd(*argv, tmp_path / "clean") == 0  # an uninterrupted run
    rerun = torch.load(killed / "checkpoint.pt", weights_only=True)
    clean = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    assert rerun["epoch"] == clean["epoch"] and rerun["thresholds"] == clean["thresholds"]
    states = [k for k, v in clean.items() if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())]
    assert states, sorted(clean)
    for key in states:
        assert rerun[key].keys() == clean[key].keys()
        for name, tensor in clean[key].items():
            assert torch.equal(rerun[key][name], tensor), f"{key}.{name} differs after the rerun"
    assert (killed / "curve.csv").read_text() == (tmp_path / "clean" / "curve.csv").read_text()


# ---------------------------------------------------------------- full disk, unwritable folder


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_gives_a_clear_error_and_no_partial_output(tiny_disk, slides, capsys):
    out = tiny_disk / "segment" / "good"
    assert bd("segment", "--slide", slides["good"], "--out-dir", out, "--params", SEGMENT) == 2
    err = capsys.readouterr().err
    assert f"bd segment: error: could not write {out}/" in err and "No space left on device" in err
    assert "Traceback" not in err and not leftovers(tiny_disk)
    if (out / "mask.json").exists():  # what was written before the disk filled up is whole
        assert json.loads((out / "mask.json").read_text())["mask_width"] > 0
    store = tiny_disk / "good.zarr"
    feats = np.random.default_rng(0).normal(size=(4000, 64)).astype(np.float16)  # 512 KB: does not fit
    with pytest.raises(BDError, match=f"could not write {store}: No space left on device"):
        write_store(store, feats, np.zeros((4000, 2), np.int64), {"encoder": "toy"})
    assert not store.exists() and not leftovers(tiny_disk)
    with pytest.raises(BDError, match="no space left on device"):  # torch.save raises RuntimeError itself
        from bd.io import atomic_path

        with atomic_path(tiny_disk / "checkpoint.pt") as tmp:
            torch.save({"w": torch.zeros(200_000)}, tmp)
    assert not (tiny_disk / "checkpoint.pt").exists() and not leftovers(tiny_disk)


def test_full_disk_simulated_by_enospc(monkeypatch, tmp_path):
    """The same without mount rights: the final rename fails with ENOSPC."""
    import bd.io

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(bd.io.os, "replace", no_space)
    with pytest.raises(BDError, match=f"could not write {tmp_path / 'a.json'}: No space left on device"):
        write_json(tmp_path / "a.json", {"a": 1})
    assert not list(tmp_path.iterdir())


def test_unwritable_output_folder_is_named(slides, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert bd("segment", "--slide", slides["good"], "--out-dir", blocker / "seg", "--params", SEGMENT) == 2
    err = capsys.readouterr().err
    assert f"cannot create output folder {blocker / 'seg'}" in err and "Traceback" not in err

    readonly = tmp_path / "ro"
    readonly.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (the path-under-a-file case passed)")
    try:
        assert bd("segment", "--slide", slides["good"], "--out-dir", readonly, "--params", SEGMENT) == 2
        assert f"output folder {readonly} is not writable" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


# ---------------------------------------------------------------- bad configs, before any job


def dry_run(work: Path, override: dict) -> subprocess.CompletedProcess:
    """``snakemake -n`` of the project with config/config.yaml plus ``override`` (a --configfile)."""
    import yaml

    (work / "override.yaml").write_text(yaml.safe_dump(override))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(ROOT / "config" / "config.yaml"), str(work / "override.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, env=PLAIN_ENV, cwd=work, timeout=300)


def user_cohort(work: Path, features: dict | None = None, **cohort: str) -> dict:
    """A non-demo override whose clinical table, sample sheet and split folder exist, then ``cohort``
    and ``features`` changes (slides are not needed: the run stops before)."""
    (work / "table.csv").write_text("Patient ID,ALN status\n")
    (work / "split").mkdir(exist_ok=True)
    (work / "samples.tsv").write_text("slide_id\tpatient_id\tpath\n")
    paths = {"clinical_table": str(work / "table.csv"), "split_dir": str(work / "split"),
             "sample_sheet": str(work / "samples.tsv")}
    return {"demo": {"enabled": False}, "features": features or {}, "cohort": {**paths, **cohort}}


@pytest.mark.parametrize(("override", "named"), [
    (lambda w: {"features": {"batch_sizee": 64}}, "unknown key 'features.batch_sizee'"),
    (lambda w: {"on_slide_errors": "skip"}, "unknown key 'on_slide_errors'"),
    (lambda w: {"training": {"lr": "fast"}}, "key 'training.lr': 'fast' is not of type 'number'"),
    (lambda w: {"on_slide_error": "ignore"}, "key 'on_slide_error': 'ignore' is not one of ['fail', 'skip']"),
    (lambda w: {"demo": {"enabled": False}, "cohort": {"clinical_table": "no/such/table.xlsx"}},
     "cohort.clinical_table: no/such/table.xlsx does not exist"),
    (lambda w: user_cohort(w, sample_sheet="no/such/samples.tsv"),
     "cohort.sample_sheet: no/such/samples.tsv does not exist"),
    (lambda w: user_cohort(w, split_dir="no/such/split"), "cohort.split_dir: no/such/split is not a folder"),
    (lambda w: user_cohort(w, {"weights": "no/such/weights.pth"}),
     "features.weights: no/such/weights.pth does not exist"),
], ids=["unknown-key", "unknown-top-level-key", "wrong-type", "wrong-value", "missing-table", "missing-sheet",
        "missing-split-folder", "missing-weights"])
def test_bad_config_fails_before_any_job_naming_the_key(override, named, tmp_path):
    proc = dry_run(tmp_path, override(tmp_path))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and named in text, text[-3000:]
    assert "Job stats" not in text and not (tmp_path / "results").exists()


# ---------------------------------------------------------------- every write is atomic


WRITERS = {"to_csv", "to_excel", "to_parquet", "to_json", "to_markdown", "savefig", "write_text", "write_bytes",
           "imwrite", "savez", "savez_compressed", "create_store", "TiffWriter", "ExcelWriter"}
SAFE_CONTEXTS = {"atomic_path", "TemporaryDirectory"}
# Functions that write into a path their caller got from atomic_path (each caller is audited too).
WRITE_INTO_CALLERS_TMP = {("bd/features/store.py", "create_store")}


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _is_write(call: ast.Call) -> bool:
    name, func = _name(call.func), call.func
    if name == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")
    if name in ("save", "dump"):  # np.save, torch.save, json.dump, pickle.dump (not bd.paper.plot.save)
        modules = ("np", "numpy", "torch", "json", "pickle", "yaml")
        return isinstance(func, ast.Attribute) and _name(func.value) in modules
    if name == "open_group":
        mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and mode.value != "r"
    if name in ("to_csv", "to_json", "to_markdown"):  # with no path they return text
        return bool(call.args) or any(k.arg in ("path_or_buf", "buf") for k in call.keywords)
    if name == "write_text" and isinstance(func, ast.Name):
        return False  # bd.io.write_text (atomic)
    return name in WRITERS


def unsafe_writes(path: Path) -> list[str]:
    """Write calls in ``path`` outside any ``with atomic_path(...)`` (or a temporary directory)."""
    found: list[str] = []
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name

    def visit(node: ast.AST, safe: bool, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
            safe = safe or (rel, function) in WRITE_INTO_CALLERS_TMP
        if isinstance(node, ast.With) and any(
            isinstance(i.context_expr, ast.Call) and _name(i.context_expr.func) in SAFE_CONTEXTS for i in node.items
        ):
            safe = True
        if isinstance(node, ast.Call) and _is_write(node) and not safe:
            found.append(f"{rel}:{node.lineno} ({function}): {ast.unparse(node.func)}")
        for child in ast.iter_child_nodes(node):
            visit(child, safe, function)

    visit(ast.parse(path.read_text()), False, "<module>")
    return found


def test_every_bd_write_goes_through_atomic_path():
    unsafe = [w for path in sorted((ROOT / "bd").rglob("*.py")) for w in unsafe_writes(path)]
    assert not unsafe, "non-atomic writes (wrap them in bd.io.atomic_path):\n" + "\n".join(unsafe)


def test_audit_catches_a_plain_write(tmp_path):
    """The audit itself can fail: direct writes outside atomic_path are reported, wrapped ones not."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f(frame, p):\n    frame.to_csv(p)\n    torch.save({}, p)\n"
                      "    with open(p, 'w') as fh:\n        fh.write('x')\n"
                      "    with atomic_path(p) as tmp:\n        frame.to_csv(tmp)\n    text = frame.to_csv()\n")
    assert [line.split(" ")[0] for line in unsafe_writes(sample)] == ["sample.py:2", "sample.py:3", "sample.py:4"]


# ---------------------------------------------------------------- the workflow, end to end


@pytest.mark.slow
def test_workflow_skips_a_broken_and_a_missing_slide_and_still_trains(tmp_path):
    """A demo cohort as a user's data (sample sheet, official split), slide 1 truncated and slide 2
    missing, on_slide_error: skip: the QC tables name both, and training runs without them."""
    import yaml

    demo = tmp_path / "cohort"
    assert bd("demo", "--params", json.dumps({"patients": 8, "slide_size": 2048, "out_dir": str(demo)}),
              "--out-dir", demo) == 0
    paths = {str(i): next((demo / "WSIs").glob(f"{i}.*")) for i in range(1, 9)}
    _half(paths["1"], paths["1"])
    paths["2"].unlink()
    pd.DataFrame({"slide_id": list(paths), "patient_id": list(paths), "path": [str(p) for p in paths.values()]}).to_csv(
        tmp_path / "samples.tsv", sep="\t", index=False)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(results=str(tmp_path / "results"), on_slide_error="skip")
    config["demo"]["enabled"] = False
    config["cohort"].update(sample_sheet=str(tmp_path / "samples.tsv"), annotations_dir=None,
                            clinical_table=str(demo / "patient-clinical-data.xlsx"),
                            split_dir=str(demo / "dataset-splitting"))
    config["features"].update(TINY)
    config["training"].update(methods=["bd"], seeds=[0], max_epochs=1, min_epochs=1, patience=1)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    targets = [str(results / "qc" / "slide_errors.tsv"), str(results / "train" / "bd" / "seed0" / "checkpoint.pt")]
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", *targets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=PLAIN_ENV, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    text = proc.stdout + proc.stderr
    assert "cohort check: 1 slide files that do not exist" in text and str(paths["2"]) in text  # pre-run warning

    errors = pd.read_csv(results / "qc" / "slide_errors.tsv", sep="\t", dtype=str).set_index("slide_id")
    assert sorted(errors.index) == ["1", "2"]
    assert errors.loc["1", "stage"] == "segment" and "truncated" in errors.loc["1", "reason"]
    assert errors.loc["2", "stage"] == "input" and str(paths["2"]) in errors.loc["2", "reason"]
    checks = pd.read_csv(results / "qc" / "cohort_checks.tsv", sep="\t").set_index("check")
    assert checks.loc["patient_without_usable_slide", "count"] == 2 and checks.loc["slides", "count"] == 8
    assert not (results / "segment" / "2").exists()  # a missing file gets no job
    assert (results / "train" / "bd" / "seed0" / "checkpoint.pt").is_file()
    log = (results / "logs" / "train" / "bd" / "seed0.log").read_text()
    assert "slide 1: not read (segment: " in log and "have no feature store" in log and "e.g. 2" in log
