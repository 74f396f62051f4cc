"""CLAM / TRIDENT .h5 feature files as feature stores: reading, errors, and training and evaluation
from a folder of them (the layout is written here with h5py, as CLAM's extract_features_fp.py and
create_patches_fp.py and TRIDENT write it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

h5py = pytest.importorskip("h5py")

from bd.mil.bags import load_cohort  # noqa: E402
from bd.cli import main  # noqa: E402
from bd.errors import StoreError  # noqa: E402
from bd.features.h5store import IDENTITY_FILE, H5FeatureParams, write_identity  # noqa: E402
from bd.features.store import read_store, store_path  # noqa: E402

DIM = 16


def clam_h5(path: Path, n: int, seed: int, shift: float = 0.0, patch_level: int = 1) -> np.ndarray:
    """A CLAM feature file: float32 'features' (N, D), int32 level-0 'coords' (N, 2); the patch
    attributes CLAM's create_patches_fp.py puts on 'coords' (patch_size at patch_level, downsample)."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, DIM)).astype(np.float32) + shift
    coords = (np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) * 512).astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, maxshape=(None, DIM), chunks=True)
        c = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=True)
        c.attrs.update({"patch_size": 256, "patch_level": patch_level, "downsample": np.array([2.0, 2.0]),
                        "downsampled_level_dim": np.array([4096, 4096]), "level_dim": np.array([4096, 4096]),
                        "name": path.stem, "save_path": "patches"})
    return feats


def trident_h5(path: Path, n: int) -> None:
    """A TRIDENT feature file: patch_size at the target magnification and patch_size_level0."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((n, DIM), np.float32))
        c = f.create_dataset("coords", data=np.arange(2 * n).reshape(n, 2) * 448)
        c.attrs.update({"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": path.stem})


IDENTITY = H5FeatureParams(dir="h5", encoder="resnet50_trunc", weights="clam-imagenet", target_mpp=0.5)


def test_clam_file_reads_as_a_store(tmp_path):
    feats = clam_h5(tmp_path / "s1.h5", 20, 0)
    write_identity(IDENTITY, tmp_path / IDENTITY_FILE)
    fs = read_store(tmp_path / "s1.h5")
    np.testing.assert_array_equal(fs.features, feats)
    assert fs.coords.dtype == np.int64 and fs.coords.shape == (20, 2) and fs.coords[9].tolist() == [512, 512]
    assert fs.attrs["patch_size"] == 256 and fs.attrs["patch_size_level0"] == 512.0  # 256 px at level 1 (2x)
    assert fs.attrs["encoder"] == "resnet50_trunc" and fs.attrs["weights_sha256"] == "clam-imagenet"
    assert fs.attrs["feature_dim"] == DIM and fs.attrs["n_patches"] == 20 and fs.attrs["h5_patch_level"] == 1
    assert store_path(tmp_path, "s1") == tmp_path / "s1.h5"
    assert read_store(tmp_path / "s1.h5", with_features=False).features.size == 0


def test_trident_file_gives_its_level0_patch_size(tmp_path):
    trident_h5(tmp_path / "t.h5", 5)
    write_identity(H5FeatureParams(encoder="uni_v1", target_mpp=0.5), tmp_path / IDENTITY_FILE)
    fs = read_store(tmp_path / "t.h5")
    assert fs.attrs["patch_size"] == 224 and fs.attrs["patch_size_level0"] == 448.0


def test_errors_name_the_file_and_the_dataset(tmp_path):
    clam_h5(tmp_path / "s1.h5", 4, 0)
    with pytest.raises(StoreError, match=f"s1.h5: an .h5 feature file needs the encoder identity in .*{IDENTITY_FILE}"):
        read_store(tmp_path / "s1.h5")
    write_identity(IDENTITY, tmp_path / IDENTITY_FILE)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("features", data=np.ones((3, DIM), np.float32))
    with pytest.raises(StoreError, match=r"bad.h5: dataset 'coords' is missing"):
        read_store(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f.create_dataset("features", data=np.ones((3, DIM), np.float32))
        f.create_dataset("coords", data=np.ones((2, 2), np.int32))
    with pytest.raises(StoreError, match=r"short.h5: dataset 'coords' has shape \(2, 2\), expected \(3, 2\)"):
        read_store(tmp_path / "short.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match="junk.h5: not a readable HDF5 file"):
        read_store(tmp_path / "junk.h5")
    write_identity(H5FeatureParams(encoder="x", target_mpp=0.5, patch_size=512), tmp_path / IDENTITY_FILE)
    with pytest.raises(StoreError, match="s1.h5: attribute patch_size is 256"):
        read_store(tmp_path / "s1.h5")


def test_identity_needs_encoder_and_mpp():
    from bd.errors import ConfigError

    with pytest.raises(ConfigError, match="h5_features.encoder"):
        H5FeatureParams(dir="x").identity()
    with pytest.raises(ConfigError, match="h5_features.target_mpp"):
        H5FeatureParams(dir="x", encoder="uni").identity()


@pytest.fixture(scope="module")
def h5_cohort(tmp_path_factory):
    """12 patients whose CLAM .h5 features carry a class signal, with a normalised clinical table."""
    root = tmp_path_factory.mktemp("h5cohort")
    n = 12
    labels = np.arange(n) % 2
    splits = np.array(["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    for i in range(n):
        clam_h5(root / "h5" / f"S{i}.h5", 10 + i, i, shift=1.5 * labels[i])
    write_identity(IDENTITY, root / "h5" / IDENTITY_FILE)
    ids = [f"P{i}" for i in range(n)]
    pd.DataFrame({"slide_id": [f"S{i}" for i in range(n)], "patient_id": ids, "path": ["none.svs"] * n}).to_csv(
        root / "samples.tsv", sep="\t", index=False)
    rng = np.random.default_rng(0)
    pd.DataFrame({"patient_id": ids, "split": splits, "label": labels, "c0": rng.normal(size=n),
                  "c1": rng.normal(size=n)}).to_csv(root / "clinical.tsv", sep="\t", index=False)
    return root


def test_cohort_from_h5_files(h5_cohort):
    cohort = load_cohort(h5_cohort / "h5", h5_cohort / "samples.tsv", h5_cohort / "clinical.tsv", progress=False)
    assert cohort.n_patients == 12 and cohort.has_slide.all() and cohort.feature_dim == DIM
    assert cohort.identity["encoder"] == "resnet50_trunc" and cohort.lengths().tolist() == list(range(10, 22))


def test_train_and_evaluate_from_h5_files(h5_cohort, tmp_path):
    params = {"method": "image_only", "max_epochs": 2, "min_epochs": 1, "patience": 2, "hidden_dim": 8,
              "precision": "fp32", "device": "cpu"}
    common = ["--feature-index", str(h5_cohort / "h5"), "--samples", str(h5_cohort / "samples.tsv"),
              "--clinical", str(h5_cohort / "clinical.tsv")]
    assert main(["train", *common, "--params", json.dumps(params), "--out-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert main(["evaluate", "--run", str(tmp_path / "run" / "checkpoint.pt"), *common,
                 "--params", json.dumps({"missing_rates": [0.0], "repeats": 1, "bootstrap": 10}),
                 "--out-dir", str(tmp_path / "eval"), "--experiment", "image_only", "--seed", "0"]) == 0
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert set(preds["patient_id"]) == {"P9", "P10", "P11"}  # the test split
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert {"auc", "f1", "rate"} <= set(metrics.columns) and metrics["n"].iloc[0] == 3
    # bd predict takes an .h5 store of the slide as --features (the identity file beside it)
    slide = Path(__file__).resolve().parents[1] / "data" / "cmu-1-small-region.svs"
    single = tmp_path / "h5one"
    clam_h5(single / f"{slide.stem}.h5", 12, 5, shift=1.5)
    write_identity(IDENTITY, single / IDENTITY_FILE)
    assert main(["predict", "--run", str(tmp_path / "run" / "checkpoint.pt"), "--slide", str(slide),
                 "--features", str(single / f"{slide.stem}.h5"), "--out-dir", str(tmp_path / "pred")]) == 0
    rec = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert rec["patches"] == 12 and rec["features"].endswith(".h5") and 0 <= rec["prob_n_plus"] <= 1
    # a run trained on .h5 features refuses features of another identity
    write_identity(H5FeatureParams(encoder="uni_v1", target_mpp=0.5), single / IDENTITY_FILE)
    assert main(["predict", "--run", str(tmp_path / "run" / "checkpoint.pt"), "--slide", str(slide),
                 "--features", str(single / f"{slide.stem}.h5"), "--out-dir", str(tmp_path / "pred2")]) == 2
