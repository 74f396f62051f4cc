"""Exports and cohort inference: per-patch attention as a table and QuPath GeoJSON, tissue contours
as QuPath annotations, the heatmap scale bar, the QC image's excluded pixels, and
`bd predict --samples` over many slides with the model loaded once."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from test_predict import SLIDE, trained  # noqa: F401  (module fixture: a tiny BD run on the real slide)

from bd.cli import main
from bd.exports import attention_geojson, attention_table, draw_scale_bar, scale_bar
from bd.paper.heatmaps import patch_side_level0, thumbnail_um_per_px
from bd.features.store import read_store

PARAMS = json.dumps({"features": {"num_workers": 0, "batch_size": 64}})


def _squares_match_the_grid(geo: dict, coords: np.ndarray, side: float) -> None:
    """Every feature a closed level-0 square of side ``side`` at a grid patch, one per patch."""
    corners = set()
    for feat in geo["features"]:
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert feat["geometry"]["type"] == "Polygon" and len(feat["geometry"]["coordinates"]) == 1
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        x0, y0 = ring.min(0)
        np.testing.assert_allclose(ring.max(0) - ring.min(0), [side, side])
        corners.add((int(x0), int(y0)))
    assert corners == {tuple(c) for c in coords.tolist()} and len(geo["features"]) == len(coords)


@pytest.mark.parametrize("object_type", ["tile", "detection"])
def test_predict_exports_attention_as_table_and_qupath_geojson(trained, tmp_path, object_type):  # noqa: F811
    root, ckpt, _ = trained
    store = root / "fixture.zarr"
    assert main(["predict", "--run", str(ckpt), "--slide", str(SLIDE), "--features", str(store),
                 "--out-dir", str(tmp_path), "--object-type", object_type]) == 0
    rec = json.loads((tmp_path / "prediction.json").read_text())
    fs = read_store(store, with_features=False)
    side = patch_side_level0(fs.attrs)
    table = pd.read_csv(rec["attention_table"], sep="\t")
    assert list(table.columns[:5]) == ["slide_id", "x", "y", "patch_size_level0", "patch_size"]
    assert len(table) == len(fs.coords) and set(zip(table.x, table.y)) == {tuple(c) for c in fs.coords.tolist()}
    assert table["attention"].sum() == pytest.approx(1.0, abs=1e-4)  # attention weights of one bag
    assert table["attention_norm"].min() == 0.0 and table["attention_norm"].max() == 1.0
    assert (table["patch_size_level0"] == side).all() and (table["patch_size"] == fs.attrs["patch_size"]).all()
    geo = json.loads(Path(rec["attention_geojson"]).read_text())
    assert geo["type"] == "FeatureCollection"
    _squares_match_the_grid(geo, fs.coords, side)
    props = geo["features"][0]["properties"]
    assert props["objectType"] == object_type and props["classification"]["name"] == "Attention"
    assert len(props["classification"]["color"]) == 3 and all(isinstance(v, int) for v in props["classification"]["color"])
    by_corner = {tuple(np.asarray(f["geometry"]["coordinates"][0]).min(0).astype(int)): f["properties"]["measurements"]
                 for f in geo["features"]}
    for row in table.itertuples():
        assert by_corner[(row.x, row.y)]["attention"] == pytest.approx(row.attention)


def test_tissue_contours_are_qupath_annotations_with_holes(tmp_path):
    from bd.slides.segment import SegmentParams, segment_slide, write_segmentation
    from bd.slides.slide import open_slide

    with open_slide(SLIDE) as slide:
        seg = segment_slide(slide, SegmentParams())
    write_segmentation(seg, SegmentParams(), tmp_path, "fixture")
    geo = json.loads((tmp_path / "contours.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(seg.polygons) > 0
    for feat, polygon in zip(geo["features"], seg.polygons):
        props = feat["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tissue"
        rings = feat["geometry"]["coordinates"]
        assert len(rings) == 1 + props["holes"] == len(polygon)  # exterior, then the holes as interiors
        for ring in rings:
            assert ring[0] == ring[-1]
        xy = np.asarray(rings[0])
        assert (xy >= 0).all() and (xy[:, 0] <= seg.level0_size[0]).all() and (xy[:, 1] <= seg.level0_size[1]).all()


def test_qc_image_marks_pen_ink_and_debris_in_their_colours():
    from bd.slides.segment import QC_LEGEND, Segmentation, SegmentParams, artefact_mask, qc_image, tissue_mask

    rgb = np.full((200, 300, 3), 235, np.uint8)
    cv2.circle(rgb, (150, 100), 70, (190, 90, 170), -1)  # H&E-pink tissue
    cv2.line(rgb, (20, 20), (120, 20), (30, 160, 40), 6)  # green pen
    cv2.circle(rgb, (260, 170), 8, (5, 5, 5), -1)  # dark debris
    params = SegmentParams(close_kernel=0)
    arte: list[np.ndarray] = []
    mask, meta = tissue_mask(rgb, 16.0, params, arte)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    assert artefact_mask(hsv, params)[20, 70] and artefact_mask(hsv, params)[170, 260]
    seg = Segmentation(mask, arte[0], rgb, (1.0, 1.0), (300, 200), 16.0, [], meta)
    plain = qc_image(seg, "no params")
    marked = qc_image(seg, "with params", params)
    assert marked.shape[0] > plain.shape[0]  # the legend band and the 'excluded' caption line
    offset, plain_offset = 18 * 3 + 8, 18 * 2 + 8  # caption bands (3 and 2 lines) above the image
    pen_px, debris_px = marked[offset + 20, 70].astype(int), marked[offset + 170, 260].astype(int)
    pen_bgr, debris_bgr = np.array(QC_LEGEND["pen"][1]), np.array(QC_LEGEND["debris"][1])
    assert np.abs(pen_px - pen_bgr).sum() < np.abs(pen_px - debris_bgr).sum()  # magenta, not cyan
    assert np.abs(debris_px - debris_bgr).sum() < np.abs(debris_px - pen_bgr).sum()
    assert (marked[offset + 100, 150] == plain[plain_offset + 100, 150]).all()  # tissue untouched


@pytest.mark.parametrize(("mpp", "width", "um", "px"), [(16.0, 1000, 2000.0, 125.0), (0.5, 1024, 100.0, 200.0),
                                                        (4.0, 512, 500.0, 125.0)])
def test_scale_bar_length_comes_from_the_mpp(mpp, width, um, px):
    assert scale_bar(mpp, width) == (um, px)
    assert px * mpp == pytest.approx(um) and px <= 0.25 * width


def test_heatmap_scale_bar_is_drawn_at_the_slides_physical_scale():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from bd.slides.slide import open_slide

    with open_slide(SLIDE) as slide:
        thumb = slide.get_thumbnail((512, 512))
        um_per_px = thumbnail_um_per_px(slide.mpp, slide.dimensions, thumb.shape)
        assert um_per_px == pytest.approx(slide.mpp * slide.dimensions[0] / thumb.shape[1])
    fig, ax = plt.subplots()
    ax.imshow(thumb)
    length_um, length_px = draw_scale_bar(ax, um_per_px, thumb.shape)
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_facecolor()[:3] == (0.0, 0.0, 0.0)]
    assert len(bars) == 1 and bars[0].get_width() == pytest.approx(length_um / um_per_px) == pytest.approx(length_px)
    assert any(t.get_text() in (f"{length_um:g} µm", f"{length_um / 1000:g} mm") for t in ax.texts)
    plt.close(fig)


def test_attention_table_and_geojson_from_arrays():
    coords = np.array([[0, 0], [512, 0], [0, 512]])
    table = attention_table("s", coords, np.array([0.2, 0.5, 0.3]), 512.0, 256, 0.5)
    assert table["attention_percentile"].tolist() == [0.0, 1.0, 0.5]
    geo = attention_geojson(table, "detection")
    _squares_match_the_grid(geo, coords, 512.0)
    assert {f["properties"]["objectType"] for f in geo["features"]} == {"detection"}


# ---------------------------------------------------------------- cohort inference


def _external(root: Path, tmp: Path, slides: list[int], rows: list[dict]) -> tuple[Path, Path]:
    sheet = tmp / "sheet.tsv"
    pd.DataFrame({"slide_id": [f"S{i}" for i in slides], "patient_id": [f"E{k}" for k in range(len(slides))],
                  "path": [str(SLIDE)] * len(slides)}).to_csv(sheet, sep="\t", index=False)
    table = tmp / "external.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return sheet, table


ROWS = [
    {"Patient ID": "E0", "ALN status": "N0", "Age(years)": 50, "Tumour Size(cm)": 2.0, "ER": "Positive",
     "PR": "Negative", "HER2": "Negative"},
    {"Patient ID": "E1", "ALN status": "N+(>2)", "Age(years)": 61, "Tumour Size(cm)": 3.1, "ER": "Negative",
     "PR": "Negative", "HER2": "Positive"},
    {"Patient ID": "E2", "ALN status": "", "Age(years)": "", "Tumour Size(cm)": "", "ER": "", "PR": "", "HER2": ""},
]


def test_cohort_predict_writes_one_table_and_evaluates_like_the_test_split(trained, tmp_path):  # noqa: F811
    root, ckpt, _ = trained
    sheet, table = _external(root, tmp_path, [12, 13, 14, 15], ROWS)  # E3: no row in the table
    out = tmp_path / "out"
    assert main(["predict", "--run", str(ckpt), "--samples", str(sheet), "--clinical-table", str(table),
                 "--feature-index", str(root / "features"), "--require-labels", "--out-dir", str(out)]) == 0
    preds = pd.read_csv(out / "predictions.tsv", sep="\t", dtype={"patient_id": str})
    assert preds["patient_id"].tolist() == ["E0", "E1", "E2", "E3"]
    assert preds["clinical_present"].tolist() == [True, True, False, False]
    assert preds["branch"].tolist()[:2] == ["multi", "multi"] and set(preds["branch"][2:]) == {"single"}
    assert preds["label"].tolist()[:2] == [0.0, 1.0] and preds["label"][2:].isna().all()
    assert ((preds["prob_n_plus"] >= preds["threshold"]) == (preds["prediction"] == "N+")).all()
    assert preds["slides"].tolist() == ["S12", "S13", "S14", "S15"]
    clinical = pd.read_csv(out / "clinical.tsv", sep="\t")
    assert clinical["patient_id"].tolist() == ["E0", "E1"] and set(clinical["split"]) == {"test"}
    index = pd.read_csv(out / "features" / "index.tsv", sep="\t")  # the stores it read, for bd evaluate
    assert index["slide_id"].tolist() == ["S12", "S13", "S14", "S15"]
    assert [Path(p) for p in index["store"]] == [root / "features" / f"S{i}.zarr" for i in (12, 13, 14, 15)]
    assert main(["evaluate", "--run", str(ckpt), "--feature-index", str(out / "features" / "index.tsv"),
                 "--samples", str(out / "samples.tsv"), "--clinical", str(out / "clinical.tsv"),
                 "--params", json.dumps({"missing_rates": [0.0, 100.0], "repeats": 1, "bootstrap": 10}),
                 "--experiment", "external", "--seed", "0", "--out-dir", str(out / "evaluate")]) == 0
    evaluated = pd.read_csv(out / "evaluate" / "predictions.csv", dtype={"patient_id": str})
    assert set(evaluated["patient_id"]) == {"E0", "E1"}
    # the cohort's probabilities are the single-slide command's
    single = tmp_path / "single"
    assert main(["predict", "--run", str(ckpt), "--slide", str(SLIDE), "--features", str(root / "features" / "S12.zarr"),
                 "--clinical", *[f"{k}={v}" for k, v in ROWS[0].items() if k not in ("Patient ID", "ALN status")],
                 "--out-dir", str(single)]) == 0
    rec = json.loads((single / "prediction.json").read_text())
    assert rec["prob_n_plus"] == pytest.approx(preds["prob_n_plus"][0], abs=1e-5)
    assert rec["threshold"] == pytest.approx(preds["threshold"][0])


def test_cohort_predict_extracts_each_slide_with_the_encoder_built_once(trained, tmp_path, monkeypatch):  # noqa: F811
    import bd.features.extract

    root, ckpt, fixture = trained
    built = []
    original = bd.features.extract.Extractor.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(bd.features.extract.Extractor, "__init__", counting)
    sheet, _ = _external(root, tmp_path, [0, 1], ROWS)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(ckpt), "--samples", str(sheet), "--params", PARAMS, "--out-dir", str(out)]) == 0
    assert len(built) == 1
    for sid in ("S0", "S1"):
        fs = read_store(out / "features" / f"{sid}.zarr")
        assert fs.features.shape == fixture.features.shape  # the run's own patch settings
        assert (out / "segment" / sid / "contours.geojson").exists()
    preds = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(preds) == 2 and preds["prob_n_plus"].nunique() == 1  # the same slide twice
    assert not (out / "clinical.tsv").exists()  # no labels: nothing to evaluate
    for sid in ("S0", "S1"):
        geo = json.loads((out / "attention" / f"{sid}.attention.geojson").read_text())
        _squares_match_the_grid(geo, read_store(out / "features" / f"{sid}.zarr", with_features=False).coords,
                                patch_side_level0(read_store(out / "features" / f"{sid}.zarr", with_features=False).attrs))


def test_cohort_predict_errors_name_file_row_and_key(trained, tmp_path, capsys):  # noqa: F811
    root, ckpt, _ = trained
    bad_rows = [dict(ROWS[0]), {**ROWS[1], "Age(years)": "old"}]
    sheet, table = _external(root, tmp_path, [12, 13], bad_rows)
    base = ["predict", "--run", str(ckpt), "--samples", str(sheet), "--feature-index", str(root / "features"),
            "--out-dir", str(tmp_path / "o")]
    assert main([*base, "--clinical-table", str(table)]) == 2
    assert f"{table}: row 3: column 'Age(years)'" in capsys.readouterr().err
    broken = tmp_path / "broken.tsv"
    broken.write_text("slide_id\tpath\nS12\tx.svs\n")
    assert main(["predict", "--run", str(ckpt), "--samples", str(broken), "--out-dir", str(tmp_path / "o")]) == 2
    assert f"{broken}: missing column(s) ['patient_id']" in capsys.readouterr().err
    sheet2, _ = _external(root, tmp_path, [12, 99], ROWS)
    assert main(["predict", "--run", str(ckpt), "--samples", str(sheet2), "--feature-index", str(root / "features"),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "no store for slide(s) S99" in capsys.readouterr().err
    unlabelled = [{k: v for k, v in r.items() if k != "ALN status"} for r in ROWS]
    sheet3, table3 = _external(root, tmp_path, [12, 13], unlabelled)
    assert main([*base[:4], str(sheet3), *base[5:], "--clinical-table", str(table3), "--require-labels"]) == 2
    assert "no patient has a label (column 'ALN status')" in capsys.readouterr().err
    assert main([*base, "--slide", str(SLIDE)]) == 2
    assert "--samples predicts a cohort" in capsys.readouterr().err


def test_cohort_patient_without_any_modality_gets_no_prediction(trained, tmp_path):  # noqa: F811
    import shutil

    from bd.features.store import write_store

    root, ckpt, _ = trained
    stores = tmp_path / "stores"
    shutil.copytree(root / "features" / "S12.zarr", stores / "S12.zarr")
    attrs = read_store(stores / "S12.zarr", with_features=False).attrs
    write_store(stores / "S98.zarr", np.zeros((0, attrs["feature_dim"])), np.zeros((0, 2)), dict(attrs))  # no tissue
    sheet = tmp_path / "sheet.tsv"
    pd.DataFrame({"slide_id": ["S12", "S98"], "patient_id": ["E0", "E9"], "path": [str(SLIDE)] * 2}).to_csv(
        sheet, sep="\t", index=False)
    assert main(["predict", "--run", str(ckpt), "--samples", str(sheet), "--feature-index", str(stores),
                 "--out-dir", str(tmp_path / "out")]) == 0
    preds = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t", keep_default_na=False)
    assert preds["branch"].tolist() == ["single", "none"] and preds["prediction"].tolist()[1] == ""
    assert preds["prob_n_plus"].tolist()[1] == "" and preds["slide_present"].tolist() == [True, False]
