"""The demo cohort: BCNB layout and formats, messy clinical values, calibration, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from bd.cli import main
from bd.cohort.samples import demo_slides
from bd.demo import DemoParams, generate_cohort
from bd.demo.auc import simulated_auc
from bd.demo.patients import BCNB_COLUMNS, bcnb_table, official_split, simulate_patients
from bd.demo.render import render_slide
from bd.errors import ConfigError
from bd.params import build

TINY = {"patients": 8, "slide_size": 1024, "seed": 0, "test_patients": None}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A tiny demo cohort written through the command line."""
    out = tmp_path_factory.mktemp("demo")
    (out / "WSIs").mkdir()
    (out / "WSIs" / "99.tif").write_bytes(b"stale slide of an earlier, larger cohort")
    assert main(["demo", "--params", json.dumps(TINY), "--out-dir", str(out), "--workers", "1"]) == 0
    return out


def test_files_follow_the_bcnb_layout(cohort):
    planned = [Path(p).name for p in demo_slides(TINY)["path"]]
    assert sorted(p.name for p in (cohort / "WSIs").iterdir()) == sorted(planned)  # 99.tif removed
    assert {n.rsplit(".", 1)[1] for n in planned} == {"tif", "jpg"}
    for name in ("patient-clinical-data.xlsx", "latent_risk.csv", "artefacts.json"):
        assert (cohort / name).is_file()
    assert sorted(p.name for p in (cohort / "dataset-splitting").iterdir()) == ["test_id.txt", "train_id.txt", "val_id.txt"]
    assert sorted(p.name for p in (cohort / "annotations").iterdir()) == sorted(f"{i}.json" for i in range(1, 9))
    assert not list(cohort.rglob(".*tmp-*"))  # atomic writes leave no temporaries


def test_openslide_reads_the_pyramids_with_mpp_and_objective(cohort):
    tifs = sorted((cohort / "WSIs").glob("*.tif"))
    assert tifs
    for path in tifs:
        slide = openslide.OpenSlide(str(path))
        assert slide.dimensions == (1024, 768)
        assert slide.level_count == 2 and slide.level_downsamples == pytest.approx((1.0, 2.0))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "20"
        assert slide.properties["openslide.level[0].tile-width"] == "256"
        region = np.asarray(slide.read_region((0, 0), 0, (1024, 768)).convert("RGB"))
        assert region.std() > 10  # real content, not a blank page


def test_flat_jpegs_have_no_slide_metadata(cohort):
    for path in (cohort / "WSIs").glob("*.jpg"):
        assert openslide.OpenSlide.detect_format(str(path)) is None  # as BCNB's JPEGs
        assert cv2.imread(str(path)).shape == (768, 1024, 3)


def test_bd_slide_opens_both_formats(cohort):
    from bd.slides.slide import SlideWarning, open_slide

    for path in sorted((cohort / "WSIs").iterdir()):
        if path.suffix == ".jpg":  # no MPP in the file: the configured fallback, with a warning
            with pytest.warns(SlideWarning, match="fallback"):
                slide = open_slide(path, fallback_mpp=0.5)
        else:
            slide = open_slide(path, fallback_mpp=0.25)  # the file's own MPP wins
        with slide:
            assert slide.dimensions == (1024, 768) and slide.mpp == pytest.approx(0.5)


def test_clinical_table_has_bcnb_columns_and_messy_values(cohort):
    table = pd.read_excel(cohort / "patient-clinical-data.xlsx", dtype=object)
    assert list(table.columns) == BCNB_COLUMNS
    ki67 = table["Ki67"].astype(str)
    assert ki67.str.fullmatch(r"\d+-\d+%").any()
    assert ki67.str.contains("＜").any()
    assert table["Histological grading"].isna().any()
    assert set(table["ALN status"]) <= {"N0", "N+(1-2)", "N+(>2)"}
    positive = table["HER2"] == "Positive"
    assert set(table.loc[positive, "HER2 Expression"]) <= {"2+", "3+"}
    assert not (table.loc[~positive, "HER2 Expression"] == "3+").any()
    nodes = table["Number of lymph node metastases"].astype(int)
    assert ((nodes == 0) == (table["ALN status"] == "N0")).all()


def test_split_files_are_disjoint_and_cover_every_patient(cohort):
    ids = {name: (cohort / "dataset-splitting" / f"{name}_id.txt").read_text().split() for name in ("train", "val", "test")}
    flat = [i for v in ids.values() for i in v]
    assert len(flat) == len(set(flat)) == 8
    assert set(flat) == {str(i) for i in range(1, 9)}


def test_annotations_are_bcnb_json_on_tumour_pixels(cohort):
    for path in (cohort / "annotations").glob("*.json"):
        ann = json.loads(path.read_text())
        assert set(ann) == {"positive", "negative"} and ann["negative"] == []
        for region in ann["positive"]:
            assert isinstance(region["name"], str)
            xy = np.asarray(region["vertices"])
            assert xy.ndim == 2 and xy.shape[1] == 2 and len(xy) >= 3
            assert xy.min() >= 0 and xy[:, 0].max() <= 1024 and xy[:, 1].max() <= 768
    # tumour regions are darker (denser, larger nuclei) than the rest of the tissue
    truth = json.loads((cohort / "artefacts.json").read_text())["1"]
    slide = openslide.OpenSlide(str(cohort / "WSIs" / "1.tif"))
    grey = cv2.cvtColor(np.asarray(slide.read_region((0, 0), 0, (1024, 768)).convert("RGB")), cv2.COLOR_RGB2GRAY)
    tumour, tissue = _raster(json.loads((cohort / "annotations" / "1.json").read_text())["positive"]), _raster(
        [{"vertices": p} for p in truth["tissue"]])
    blur = truth["blur"]
    tissue[blur["y"]:blur["y"] + blur["h"], blur["x"]:blur["x"] + blur["w"]] = 0
    tumour &= tissue
    assert grey[tumour > 0].mean() < grey[(tissue > 0) & (tumour == 0)].mean() - 10


def _raster(regions) -> np.ndarray:
    mask = np.zeros((768, 1024), np.uint8)
    cv2.fillPoly(mask, [np.asarray(r["vertices"], np.int32) for r in regions], 1)
    return mask


def test_artefacts_are_recorded_and_the_pen_mark_is_off_tissue(cohort):
    truths = json.loads((cohort / "artefacts.json").read_text())
    assert sorted(truths, key=int) == [str(i) for i in range(1, 9)]
    for sid, truth in truths.items():
        tissue = _raster([{"vertices": p} for p in truth["tissue"]])
        x, y, w, h = truth["pen"]["bbox"]
        assert tissue[y:y + h, x:x + w].sum() == 0, f"slide {sid}: pen mark overlaps tissue"
        assert truth["dust"] and truth["blur"]["w"] > 0
        assert 0 < truth["tumour_fraction"] < 1
    path = next((cohort / "WSIs").glob("*.tif"))
    truth = truths[path.stem]
    rgb = np.asarray(openslide.OpenSlide(str(path)).read_region((0, 0), 0, (1024, 768)).convert("RGB")).astype(int)
    px, py = truth["pen"]["path"][len(truth["pen"]["path"]) // 2]
    background = rgb[740:760, 20:40].reshape(-1, 3).mean(0)
    assert 205 < background.mean() < 245 and background.max() < 250  # light grey, not white
    assert rgb[py, px].mean() < background.mean() - 60  # ink is dark


def test_same_seed_same_cohort_other_seed_differs(cohort, tmp_path):
    generate_cohort(build(DemoParams, TINY), tmp_path / "again", workers=2)
    for path in sorted(p for p in cohort.rglob("*") if p.is_file() and p.suffix != ".xlsx"):
        assert (tmp_path / "again" / path.relative_to(cohort)).read_bytes() == path.read_bytes(), path.name
    pd.testing.assert_frame_equal(pd.read_excel(cohort / "patient-clinical-data.xlsx"),
                                  pd.read_excel(tmp_path / "again" / "patient-clinical-data.xlsx"))
    generate_cohort(build(DemoParams, {**TINY, "seed": 1}), tmp_path / "other", slides=False)
    assert (tmp_path / "other" / "latent_risk.csv").read_text() != (cohort / "latent_risk.csv").read_text()


def test_demo_auc_command(cohort, capsys):
    assert main(["demo-auc", "--out-dir", str(cohort)]) == 0
    text = capsys.readouterr().out
    assert "clinical-only" in text and "oracle" in text
    assert main(["demo-auc", "--out-dir", str(cohort), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["clinical_auc"] <= 1 and 0 <= result["oracle_auc"] <= 1
    assert result["n_test"] == len((cohort / "dataset-splitting" / "test_id.txt").read_text().split())


def test_demo_auc_names_a_missing_table(tmp_path, capsys):
    assert main(["demo-auc", "--out-dir", str(tmp_path)]) == 2
    assert "patient-clinical-data.xlsx" in capsys.readouterr().err


def test_bcnb_sized_table_matches_the_published_statistics():
    patients = simulate_patients(1058, seed=0)
    table = bcnb_table(patients)
    assert table["ALN status"].value_counts().to_dict() == {"N0": 655, "N+(1-2)": 210, "N+(>2)": 193}
    assert {k: len(v) for k, v in official_split(patients, 0).items()} == {"train": 630, "val": 210, "test": 218}
    pos = table["ALN status"] != "N0"
    groups = {False: table[~pos], True: table[pos]}
    expected = {  # BCNB's published statistics: N0 vs N+
        "age": (58.5, 56.0, 1.5), "size": (2.08, 2.48, 0.12),
        "ER neg": (0.24, 0.18, 0.05), "PR neg": (0.27, 0.23, 0.05), "HER2 pos": (0.26, 0.27, 0.05),
        "grade blank": (0.14, 0.09, 0.04),
    }
    stats = {
        "age": lambda t: t["Age(years)"].mean(), "size": lambda t: t["Tumour Size(cm)"].mean(),
        "ER neg": lambda t: (t["ER"] == "Negative").mean(), "PR neg": lambda t: (t["PR"] == "Negative").mean(),
        "HER2 pos": lambda t: (t["HER2"] == "Positive").mean(),
        "grade blank": lambda t: t["Histological grading"].isna().mean(),
    }
    for name, (n0, npos, tol) in expected.items():
        assert stats[name](groups[False]) == pytest.approx(n0, abs=tol), name
        assert stats[name](groups[True]) == pytest.approx(npos, abs=tol), name
    assert table["Tumour Size(cm)"].between(0.5, 5.5).all()
    ki67 = table["Ki67"]
    assert ki67.str.fullmatch(r"0?\.\d+|1").mean() > 0.7  # mostly fractions
    assert ki67.str.contains("%").mean() > 0.05


def test_bcnb_sized_clinical_auc_is_weak_and_the_oracle_strong():
    result = simulated_auc(1058, seed=0, slide_signal=1.5)
    assert 0.55 <= result.clinical_auc <= 0.72
    assert result.oracle_auc > result.clinical_auc + 0.1
    assert (result.n_train, result.n_test) == (630, 218)


def test_tumour_fraction_drives_the_look():
    low = render_slide(1024, 0.5, 0.05, np.random.default_rng(0))
    high = render_slide(1024, 0.5, 0.5, np.random.default_rng(0))
    assert low.tumour_fraction == pytest.approx(0.05, abs=0.08)
    assert high.tumour_fraction == pytest.approx(0.5, abs=0.12)
    assert len(high.tumour_polygons) >= 1
    assert high.rgb.mean() < low.rgb.mean()  # more dark, nuclei-dense tissue


def test_params_reject_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="pateints"):
        build(DemoParams, {"pateints": 3})
    with pytest.raises(ConfigError, match="demo.patients"):
        build(DemoParams, {"patients": 2})


def test_default_demo_split_has_30_test_patients():
    """The default demo: 80 patients, 30 of them in the test split (an AUC that means something),
    the rest in BCNB's 630:210 train:val ratio; its clinical-only AUC is reported as it comes out."""
    import yaml

    d = build(DemoParams, yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["demo"])
    result = simulated_auc(d.patients, seed=d.seed, slide_signal=d.slide_signal, test_patients=d.test_patients)
    assert (result.n_train, result.n_test) == (38, 30)
    assert 0.0 <= result.clinical_auc <= 1.0 and result.oracle_auc > 0.5
    with pytest.raises(ConfigError, match="demo.test_patients"):
        build(DemoParams, {"patients": 20, "test_patients": 19})


def test_demo_scale_slide_model_outputs_are_not_constant():
    """With the demo's training settings (config/config.yaml) on a demo-sized cohort whose patch
    features have a random-weight encoder's scale (mean 0.11, sd 0.15: what once left every slide
    model at the class prior), image-only's test probabilities spread (sd >= 0.05) and rank."""
    import torch
    import yaml

    from bd.synthetic import synthetic_cohort
    from bd.evaluation.metrics import auc
    from bd.mil.runs import predict_patients
    from bd.mil.train import TrainParams, train_model

    training = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["training"]
    params = build(TrainParams, {**training, "method": "image_only", "precision": "fp32"})
    cohort = synthetic_cohort(80, 40, 64, 5, seed=0, signal=0.5, splits=(0.475, 0.15))
    cohort.features = 0.11 + 0.15 * cohort.features / cohort.features.std()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_model(cohort, params, 0, progress=False)
    finally:
        torch.set_num_threads(threads)
    test = cohort.indices("test")
    assert len(test) >= 30
    probs, _ = predict_patients(result.model, cohort, test, np.zeros(len(test), bool))
    assert probs.std() >= 0.05, probs
    assert auc(cohort.labels[test], probs) >= 0.7
