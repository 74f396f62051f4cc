"""`bd predict` on a real slide with a tiny trained BD run, with and without clinical data, and
its refusal of features made with other encoder or patch settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bd.cli import main
from bd.identity import identity_mismatches
from bd.predict import parse_clinical
from bd.features.store import read_store, write_store

SLIDE = Path(__file__).parent / "data" / "cmu-1-small-region.svs"
FEATURES = {"encoder": "resnet18", "out_stage": "layer1", "random_weights": True, "input_size": 32,
            "batch_size": 64, "num_workers": 0, "device": "cpu"}
TILING = {"target_mpp": 2.0, "patch_size": 64}
CLINICAL = ["Age(years)=55", "Tumour Size(cm)=2.4", "ER=Positive", "PR=Negative", "HER2=Negative"]


def extract_fixture(out: Path, slide_path: Path = SLIDE, fallback_mpp: float | None = None,
                    slide_id: str = "fixture") -> Path:
    """The fixture slide segmented, tiled and encoded by the pipeline's own functions."""
    from bd.features.extract import Extractor, FeatureParams, SlideJob
    from bd.slides.grid import save_grid
    from bd.slides.segment import SegmentParams, segment_slide
    from bd.slides.slide import open_slide
    from bd.slides.tiling import TileParams, tile_slide

    with open_slide(slide_path, fallback_mpp=fallback_mpp) as slide:
        seg = segment_slide(slide, SegmentParams())
        grid = tile_slide(slide, seg.mask, seg.scale, TileParams(**TILING), slide_id, artefacts=seg.artefacts)
    assert len(grid) >= 10
    save_grid(grid, out / f"{slide_id}.npz")
    return Extractor(FeatureParams(**FEATURES)).run(
        SlideJob(str(slide_path), str(out / f"{slide_id}.npz"), str(out / f"{slide_id}.zarr")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BD run trained on 16 patients whose bags are subsets of the fixture's real features."""
    root = tmp_path_factory.mktemp("predict")
    fixture = read_store(extract_fixture(root))
    rng = np.random.default_rng(0)
    n = 16
    labels = (np.arange(n) // 4) % 2
    splits = np.array(["train", "train", "val", "test"] * 4)
    for i in range(n):
        rows = rng.choice(len(fixture.features), size=8, replace=False)
        feats = fixture.features[rows].astype(np.float32) * (1.0 + 0.5 * labels[i])
        write_store(root / "features" / f"S{i}.zarr", feats, fixture.coords[rows], dict(fixture.attrs))
    ids = [f"P{i}" for i in range(n)]
    pd.DataFrame({"slide_id": [f"S{i}" for i in range(n)], "patient_id": ids, "path": [str(SLIDE)] * n}).to_csv(
        root / "samples.tsv", sep="\t", index=False)
    pd.DataFrame({
        "Patient ID": ids, "ALN status": np.where(labels == 1, "N+(1-2)", "N0"),
        "Age(years)": rng.integers(35, 75, n), "Tumour Size(cm)": np.round(rng.uniform(1, 4, n), 1),
        "ER": rng.choice(["Positive", "Negative"], n), "PR": rng.choice(["Positive", "Negative"], n),
        "HER2": rng.choice(["Positive", "Negative"], n),
    }).to_csv(root / "table.csv", index=False)
    pd.DataFrame({"patient_id": ids, "split": splits, "label": labels}).to_csv(root / "split.tsv", sep="\t", index=False)
    assert main(["clinical", "--table", str(root / "table.csv"), "--split", str(root / "split.tsv"),
                 "--out-dir", str(root / "clinical")]) == 0
    params = {"method": "bd", "max_epochs": 2, "patience": 2, "hidden_dim": 8, "clinical_dim": 6,
              "prompt_length": 5, "precision": "fp32", "device": "cpu"}
    assert main(["train", "--feature-index", str(root / "features"), "--samples", str(root / "samples.tsv"),
                 "--clinical", str(root / "clinical" / "clinical.tsv"), "--params", json.dumps(params),
                 "--out-dir", str(root / "run"), "--no-progress"]) == 0
    return root, root / "run" / "checkpoint.pt", fixture


def _predict(trained, out: Path, *extra: str) -> int:
    root, ckpt, _ = trained
    return main(["predict", "--run", str(ckpt), "--slide", str(SLIDE), "--out-dir", str(out),
                 "--params", json.dumps({"features": {"num_workers": 0, "batch_size": 64}}), *extra])


def test_predict_with_clinical_data(trained, tmp_path, capsys):
    _, _, fixture = trained
    assert _predict(trained, tmp_path, "--clinical", *CLINICAL) == 0
    rec = json.loads((tmp_path / "prediction.json").read_text())
    assert rec["branch"] == "multi" and rec["clinical_present"] is True
    assert 0.0 <= rec["prob_n_plus"] <= 1.0 and rec["prediction"] in ("N+", "N0")
    assert rec["clinical_input"]["Age(years)_missing"] == 0.0
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "segment" / "qc.png").exists()
    # the slide was re-encoded with the run's recorded settings: the same features as training's
    new = read_store(rec["features"])
    assert new.features.shape == fixture.features.shape
    np.testing.assert_allclose(new.features.astype(np.float32), fixture.features.astype(np.float32), atol=1e-2)
    assert "multi" in capsys.readouterr().out


def test_predict_without_clinical_data(trained, tmp_path):
    _, _, fixture = trained
    store = Path(str(trained[0] / "fixture.zarr"))
    assert _predict(trained, tmp_path, "--features", str(store)) == 0
    rec = json.loads((tmp_path / "prediction.json").read_text())
    assert rec["branch"] == "single" and rec["clinical_present"] is False and rec["clinical_input"] is None
    assert rec["patches"] == len(fixture.features)


def test_partial_clinical_values_are_imputed(trained, tmp_path):
    store = trained[0] / "fixture.zarr"
    assert _predict(trained, tmp_path, "--features", str(store), "--clinical", "ER=Negative") == 0
    rec = json.loads((tmp_path / "prediction.json").read_text())
    assert rec["branch"] == "multi" and rec["clinical_input"]["Age(years)_missing"] == 1.0


def test_refuses_other_patch_settings(trained, tmp_path, capsys):
    root, ckpt, _ = trained
    rc = main(["predict", "--run", str(ckpt), "--slide", str(SLIDE), "--out-dir", str(tmp_path),
               "--params", json.dumps({"tiling": {"patch_size": 128}})])
    assert rc == 2
    err = capsys.readouterr().err
    assert "patch_size is 128, the run's is 64" in err
    assert not (tmp_path / "features").exists()  # refused before any work


def test_refuses_a_store_from_another_encoder(trained, tmp_path, capsys):
    _, _, fixture = trained
    other = tmp_path / "other.zarr"
    write_store(other, fixture.features, fixture.coords, {**fixture.attrs, "encoder": "resnet50", "weights_sha256": "abc"})
    assert _predict(trained, tmp_path / "out", "--features", str(other)) == 2
    err = capsys.readouterr().err
    assert "encoder is 'resnet50', the run's is 'resnet18'" in err and "weights_sha256" in err


def test_bad_clinical_input_is_named(trained, tmp_path, capsys):
    store = trained[0] / "fixture.zarr"
    assert _predict(trained, tmp_path, "--features", str(store), "--clinical", "Agee=50") == 2
    assert "unknown column 'Agee'" in capsys.readouterr().err
    assert _predict(trained, tmp_path, "--features", str(store), "--clinical", "ER=maybe") == 2
    assert "ER" in capsys.readouterr().err


def test_parse_clinical_forms(tmp_path):
    assert parse_clinical(None) is None and parse_clinical([]) is None
    assert parse_clinical(["Age(years)=54", "ER= Positive"]) == {"Age(years)": "54", "ER": "Positive"}
    assert parse_clinical(['{"ER": "Negative", "Age(years)": 60}']) == {"ER": "Negative", "Age(years)": 60}
    f = tmp_path / "c.json"
    f.write_text('{"PR": "Positive"}')
    assert parse_clinical([str(f)]) == {"PR": "Positive"}
    assert identity_mismatches({"target_mpp": 0.5, "mean": [0.1, 0.2]}, {"target_mpp": 0.5000000001, "mean": (0.1, 0.2)}) == []


def test_the_answering_branch_threshold_decides(trained, tmp_path):
    """A patient between the pooled threshold and its branch's own is called by the branch's, as
    bd evaluate does (the pooled threshold would call it N0)."""
    import torch

    root, ckpt, _ = trained
    store = root / "fixture.zarr"
    assert _predict(trained, tmp_path / "a", "--features", str(store)) == 0
    first = json.loads((tmp_path / "a" / "prediction.json").read_text())
    prob, branch = first["prob_n_plus"], first["branch"]
    from bd.mil.runs import load_run

    run = load_run(ckpt)
    assert first["threshold"] == pytest.approx(run.thresholds.get(branch, run.threshold))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["threshold"] = prob + 0.05  # pooled: N0
    state["thresholds"] = {"multi": prob + 0.1, "single": prob + 0.1, branch: prob - 0.05}  # branch: N+
    torch.save(state, tmp_path / "edited.pt")
    assert main(["predict", "--run", str(tmp_path / "edited.pt"), "--slide", str(SLIDE), "--out-dir",
                 str(tmp_path / "b"), "--features", str(store)]) == 0
    rec = json.loads((tmp_path / "b" / "prediction.json").read_text())
    assert rec["prob_n_plus"] == pytest.approx(prob) and rec["branch"] == branch
    assert rec["threshold"] == pytest.approx(prob - 0.05) and rec["pooled_threshold"] == pytest.approx(prob + 0.05)
    assert rec["prediction"] == "N+"


def test_refuses_another_slides_store_naming_both(trained, tmp_path, capsys):
    _, _, fixture = trained
    other = tmp_path / "other.zarr"
    write_store(other, fixture.features, fixture.coords,
                {**fixture.attrs, "slide_id": "S42", "slide_path": "/data/S42.svs", "slide_width": 4000})
    assert _predict(trained, tmp_path / "out", "--features", str(other)) == 2
    err = capsys.readouterr().err
    assert "slide 'S42' (/data/S42.svs)" in err and "cmu-1-small-region.svs" in err
    assert "level-0 size 4000 x 2967, the slide's is 2220 x 2967" in err
    # a store that records no size (older bd) is refused on its slide id alone
    legacy = tmp_path / "legacy.zarr"
    attrs = {k: v for k, v in fixture.attrs.items() if k not in ("slide_width", "slide_height")}
    write_store(legacy, fixture.features, fixture.coords, {**attrs, "slide_id": "S42"})
    assert _predict(trained, tmp_path / "out", "--features", str(legacy)) == 2
    assert "slide 'S42'" in capsys.readouterr().err


def test_flat_jpeg_store_gives_the_mpp(trained, tmp_path, capsys):
    """A flat JPEG has no MPP: with --features, the store's (recorded by bd extract) is used, no
    --fallback-mpp needed; a --fallback-mpp that contradicts the store is refused."""
    import cv2
    import openslide

    rgba = np.asarray(openslide.OpenSlide(str(SLIDE)).read_region((0, 0), 0, (2220, 2967)))
    jpeg = tmp_path / "cmu1.jpg"
    assert cv2.imwrite(str(jpeg), cv2.cvtColor(rgba[..., :3], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    store = extract_fixture(tmp_path, jpeg, fallback_mpp=0.499, slide_id="cmu1")
    assert read_store(store, with_features=False).attrs["mpp"] == pytest.approx(0.499)
    root, ckpt, _ = trained
    args = ["predict", "--run", str(ckpt), "--slide", str(jpeg), "--features", str(store)]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    assert not [w for w in caught if "fallback" in str(w.message)]  # the store's MPP, not a guess
    assert (tmp_path / "a" / "heatmap.png").exists()
    assert main([*args, "--out-dir", str(tmp_path / "b"), "--fallback-mpp", "0.25"]) == 2
    assert "0.499 um/px, --fallback-mpp gives 0.25" in capsys.readouterr().err
