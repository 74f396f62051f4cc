"""Patient bags from feature stores: packing, missing slides, consistency checks, table errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bd.mil.bags import Cohort, feature_identity, load_cohort
from bd.synthetic import synthetic_cohort
from bd.errors import StoreError, TableError
from bd.features.store import write_store

DIM = 8
ATTRS = {"encoder": "resnet18", "weights_sha256": "abc", "patch_size": 256, "target_mpp": 0.5,
         "read_level": 0, "slide_id": "x"}


def store(folder: Path, slide: str, n: int, seed: int, dim: int = DIM, **attrs) -> np.ndarray:
    feats = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float16)
    coords = np.arange(2 * n).reshape(n, 2) * 256
    write_store(folder / f"{slide}.zarr", feats, coords, {**ATTRS, "slide_id": slide, **attrs})
    return feats


@pytest.fixture()
def layout(tmp_path: Path) -> dict:
    """P1: two slides; P2: one slide; P3: an empty store (no tissue); P4: no store at all."""
    feats = tmp_path / "features"
    a = store(feats, "s1a", 5, 1)
    b = store(feats, "s1b", 3, 2)
    c = store(feats, "s2", 4, 3)
    store(feats, "s3", 0, 4)
    samples = pd.DataFrame({
        "slide_id": ["s1a", "s2", "s1b", "s3", "s4", "s9"],
        "patient_id": ["P1", "P2", "P1", "P3", "P4", "P9"],  # P9: not in the clinical table
        "path": ["x"] * 6,
    })
    samples.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    clinical = pd.DataFrame({
        "patient_id": ["P1", "P2", "P3", "P4"], "split": ["train", "val", "test", "train"],
        "label": [1, 0, 1, 0], "fold": [0, 1, 0, 1], "age": [0.1, -0.2, 0.3, 0.0], "size": [1.0, 2.0, 3.0, 4.0],
    })
    clinical.to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    return {"dir": tmp_path, "features": feats, "P1": np.concatenate([a, b]), "P2": c}


def load(layout: dict, **kw) -> Cohort:
    d = layout["dir"]
    return load_cohort(d / "features", d / "samples.tsv", d / "clinical.tsv", progress=False, **kw)


def test_packs_all_slides_of_a_patient_in_sheet_order(layout):
    cohort = load(layout)
    assert cohort.patient_ids == ["P1", "P2", "P3", "P4"]
    assert cohort.offsets.tolist() == [0, 8, 12, 12, 12]
    assert cohort.has_slide.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(cohort.features[0:8].numpy(), layout["P1"])
    np.testing.assert_array_equal(cohort.features[8:12].numpy(), layout["P2"])
    assert [cohort.slide_ids[s] for s in cohort.patch_slide[:8]] == ["s1a"] * 5 + ["s1b"] * 3
    assert cohort.coords[5].tolist() == [0, 256]
    assert cohort.clinical_columns == ["age", "size"]  # fold is not a model input
    assert cohort.clinical.dtype == np.float32 and cohort.clinical[1].tolist() == pytest.approx([-0.2, 2.0])
    assert cohort.labels.tolist() == [1, 0, 1, 0] and cohort.split.tolist() == ["train", "val", "test", "train"]


def test_identity_leaves_out_per_slide_attributes(layout):
    cohort = load(layout)
    assert cohort.identity["encoder"] == "resnet18" and cohort.identity["feature_dim"] == DIM
    assert "slide_id" not in cohort.identity and "read_level" not in cohort.identity
    assert feature_identity({"n_patches": 3, "encoder": "x", "reader": "tiles", "versions": {}}) == {"encoder": "x"}


def test_dtype_is_chosen_at_load(layout):
    assert load(layout, dtype=torch.bfloat16).features.dtype == torch.bfloat16


def test_feature_dims_must_agree(layout):
    store(layout["features"], "s2", 4, 3, dim=DIM + 1)
    with pytest.raises(StoreError, match=r"feature dimension.*s1a\.zarr.*s2\.zarr"):
        load(layout)


def test_encoders_must_agree(layout):
    store(layout["features"], "s2", 4, 3, weights_sha256="other")
    with pytest.raises(StoreError, match=r"'weights_sha256'.*s1a\.zarr.*'abc'.*s2\.zarr.*'other'"):
        load(layout)


def test_incomplete_store_is_an_error(layout):
    import zarr

    zarr.open_group(str(layout["features"] / "s2.zarr"), mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match="s2.zarr.*incomplete"):
        load(layout)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop(columns="label"), "column 'label' is missing"),
        (lambda t: t.assign(age=[0.1, np.nan, 0.3, 0.0]), r"row 3, column 'age'"),
        (lambda t: t.assign(split=["train", "valid", "test", "train"]), r"row 3, column 'split'"),
        (lambda t: t.assign(label=[1, 2, 1, 0]), r"row 3, column 'label'"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "P1.*more than once"),
    ],
)
def test_clinical_table_errors_name_row_and_column(layout, edit, message):
    path = layout["dir"] / "clinical.tsv"
    edit(pd.read_csv(path, sep="\t", dtype={"patient_id": str})).to_csv(path, sep="\t", index=False)
    with pytest.raises(TableError, match=message):
        load(layout)


def test_no_store_at_all_is_an_error(layout, tmp_path):
    d = layout["dir"]
    with pytest.raises(StoreError, match="no non-empty feature store"):
        load_cohort(tmp_path / "nowhere", d / "samples.tsv", d / "clinical.tsv", progress=False)


def test_batch_hides_absent_modalities():
    cohort = synthetic_cohort(6, 4, 3, 2, seed=1)
    batch = cohort.batch([0, 2, 3], clinical_present=np.array([True, False, True]),
                         slide_present=np.array([True, True, False]))
    n0, n2 = (int(cohort.offsets[i + 1] - cohort.offsets[i]) for i in (0, 2))
    assert batch.offsets.tolist() == [0, n0, n0 + n2, n0 + n2]
    torch.testing.assert_close(batch.features[n0:], cohort.features[cohort.offsets[2] : cohort.offsets[3]])
    assert batch.clinical[1].abs().sum() == 0 and torch.equal(batch.clinical[0], torch.from_numpy(cohort.clinical[0]))
    assert batch.slide_present.tolist() == [True, True, False]
    assert batch.labels.tolist() == cohort.labels[[0, 2, 3]].tolist()


def test_select_repacks():
    cohort = synthetic_cohort(6, 4, 3, 2, seed=1)
    sub = cohort.select([4, 1])
    assert sub.patient_ids == [cohort.patient_ids[4], cohort.patient_ids[1]]
    first = cohort.features[cohort.offsets[4] : cohort.offsets[5]]
    torch.testing.assert_close(sub.features[: len(first)], first)
    assert sub.offsets[-1] == len(sub.features) == len(sub.coords)


def test_the_feature_index_says_where_each_store_is(layout):
    d = layout["dir"]
    moved = d / "elsewhere"
    layout["features"].rename(moved)
    index = d / "index.tsv"
    pd.DataFrame({"slide_id": ["s1a", "s1b", "s2", "s3"],
                  "store": [str(moved / f"{s}.zarr") for s in ["s1a", "s1b", "s2", "s3"]]}).to_csv(index, sep="\t", index=False)
    cohort = load_cohort(index, d / "samples.tsv", d / "clinical.tsv", progress=False)
    assert cohort.offsets.tolist() == [0, 8, 12, 12, 12]
    np.testing.assert_array_equal(cohort.features[0:8].numpy(), layout["P1"])
    pd.DataFrame({"slide": ["s1a"]}).to_csv(index, sep="\t", index=False)
    with pytest.raises(StoreError, match="slide_id and store"):
        load_cohort(index, d / "samples.tsv", d / "clinical.tsv", progress=False)


def test_one_split_reads_only_its_patients(layout):
    cohort = load(layout, split="val")
    assert cohort.patient_ids == ["P2"] and cohort.offsets.tolist() == [0, 4]
    np.testing.assert_array_equal(cohort.features.numpy(), layout["P2"])
    with pytest.raises(TableError, match="no patient in the nope split"):
        load(layout, split="nope")
