"""The paper's figures from synthetic `bd evaluate` outputs, and the heatmap renderer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bd.cli import main
from bd.errors import TableError
from bd.paper.figures import fig5, fig5_titles, rate_curve, read_predictions
from bd.paper.heatmaps import attention_overlay, choose_patients, percentile_scores, render_slide_heatmap
from bd.paper.s2m import linear_cka
from bd.paper.tables import read_metrics
from bd.mil.runs import load_run

from synthetic_results import PROMPTS, write_run

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    runs = {name: [write_run(root, name, s) for s in (0, 1)] for name in
            ["image_only", "clinical_only", "filling", "bd", "bd_wsi"]}
    runs.update({name: [write_run(root, name, 0)] for name in PROMPTS})
    return root, runs


def _png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:4] == b"\x89PNG"
    with Image.open(path) as im:
        return im.size


def test_rate_curve_pools_masks_and_seeds(results):
    _, runs = results
    m = read_metrics(runs["bd"])
    c = rate_curve(m, "clinical", "bd", "auc").set_index("rate")
    raw = m[(m.kind == "clinical") & (m.rate == 60)].auc
    assert c.loc[60, "mean"] == pytest.approx(raw.mean()) and c.loc[60, "sd"] == pytest.approx(raw.std(ddof=0))
    assert list(c.index) == [0, 20, 40, 50, 60, 80, 100]


def test_figure_commands(results):
    root, runs = results
    out = root / "figures"
    metrics = [str(p) for name in ("image_only", "filling", "bd") for p in runs[name]]
    assert main(["figures", "fig1", "--metrics", *metrics, "--out", str(out / "fig1.png")]) == 0
    w, h = _png(out / "fig1.png")
    assert w > 400 and h > 300
    wsi = [str(p) for name in ("bd_wsi", "filling", "clinical_only") for p in runs[name]]
    assert main(["figures", "fig4ab", "--metrics", *wsi, "--out", str(out / "fig4ab.png")]) == 0
    w2, _ = _png(out / "fig4ab.png")
    assert w2 > w  # two panels
    preds = [str(Path(p).with_name("predictions.csv")) for name in PROMPTS for p in runs[name]]
    assert main(["figures", "fig4c", "--predictions", *preds, "--out", str(out / "fig4c.png")]) == 0
    _png(out / "fig4c.png")
    all_preds = [str(Path(p).with_name("predictions.csv")) for name in ("image_only", "filling", "bd") for p in runs[name]]
    assert main(["figures", "roc", "--predictions", *all_preds, "--rates", "[0, 80, 100]", "--out", str(out / "roc.png")]) == 0
    w3, _ = _png(out / "roc.png")
    assert w3 > w2  # three panels


def test_fig4c_needs_prompt_runs(results):
    _, runs = results
    preds = read_predictions([Path(runs["bd"][0]).with_name("predictions.csv")])
    from bd.paper.figures import fig4c

    with pytest.raises(TableError, match="bd-prompt"):
        fig4c(preds, preds.iloc[:0], 100, Path("unused.png"))


def test_fig5_tsne(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 15)
    tight = rng.normal(size=(30, 8)) + 4 * labels[:, None]
    loose = rng.normal(size=(30, 8)) + 0.5 * labels[:, None]
    out = fig5([("single-modal", tight), ("multi-modal", loose)], labels, 30, tmp_path / "fig5.png")
    w, h = _png(out)
    assert w > 1.5 * h


def test_percentile_scores_and_patient_choice():
    assert np.allclose(percentile_scores(np.array([5.0, 1.0, 3.0])), [1.0, 0.0, 0.5])
    ids = ["b", "a", "d", "c", "e"]
    labels = np.array([1, 0, 1, 0, 0])
    assert choose_patients(ids, labels, 4) == ["b", "d", "a", "c"]
    assert choose_patients(ids, np.zeros(5, int), 3) == ["a", "b", "c"]


def test_attention_overlay_tints_only_patches():
    thumb = np.full((100, 200, 3), 255, np.uint8)
    coords = np.array([[0, 0], [1000, 500]])
    out = attention_overlay(thumb, coords, 100.0, np.array([0.0, 1.0]), slide_size=(2000, 1000))
    assert out.shape == thumb.shape
    assert (out[0:10, 0:10] != 255).any() and (out[50:60, 100:110] != 255).any()
    assert (out[80:, :90] == 255).all()  # no patch there: untouched
    assert not np.array_equal(out[5, 5], out[55, 105])  # low vs high attention colours differ


def test_render_heatmap_on_a_real_slide(tmp_path):
    slide = DATA / "cmu-1-small-region.svs"
    coords = np.array([[x, y] for x in range(0, 2000, 256) for y in range(0, 2000, 256)])
    att = np.linspace(0, 1, len(coords))
    out = render_slide_heatmap(slide, coords, 256.0, att, "test", tmp_path / "h.png", max_thumbnail=256)
    _png(out)


def test_fig5_and_heatmaps_from_trained_runs(tmp_path):
    from synthetic_results import make_tiny_cohort, train_tiny

    cohort = make_tiny_cohort(tmp_path)
    single = train_tiny(tmp_path, cohort, "image_only")
    multi = train_tiny(tmp_path, cohort, "filling")
    wide = [train_tiny(tmp_path, cohort, "filling", experiment=f"filling-cx{n}", clinical_expansion=n)
            for n in (20, 40)]
    assert load_run(wide[0]).model.clin[-2].out_features == 20 * 3  # 3 clinical columns
    common = ["--feature-index", str(cohort["features"]), "--samples", str(cohort["samples"]),
              "--clinical", str(cohort["clinical"])]
    out = tmp_path / "fig5.png"
    assert main(["figures", "fig5", "--run", str(single), *map(str, wide), *common, "--out", str(out)]) == 0
    w, h = _png(out)
    assert w > 2.5 * h  # three panels: (a) image only, (b) 20x, (c) 40x
    assert fig5_titles([load_run(p) for p in wide])[1] == "Filling, clinical feature 40x input width"
    heat = tmp_path / "heatmaps"
    assert main(["figures", "heatmaps", "--run", str(multi), *common, "--patients", "3", "--out-dir", str(heat)]) == 0
    names = sorted(p.name for p in heat.glob("*.png"))
    # test patients: P3, P7, ..., P23 (every 4th), N+ where (i // 4) is odd: P7, P15, P23;
    # chosen by sorted id, two N+ then one N0
    assert names == ["P11_S11.png", "P15_S15.png", "P23_S23.png"]
    assert main(["figures", "fig5", "--run", str(single), *common, "--titles", "a", "b",
                 "--out", str(out)]) == 2  # titles mismatch


def test_linear_cka():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)  # rotation, scale and shift
    assert linear_cka(x, rng.normal(size=(50, 6))) < 0.4
    assert 0.2 < linear_cka(x, np.c_[x[:, :3], rng.normal(size=(50, 3))]) < 0.9


def test_s2m_figure_from_trained_runs(tmp_path):
    from synthetic_results import make_tiny_cohort, train_tiny

    cohort = make_tiny_cohort(tmp_path)
    runs = [train_tiny(tmp_path, cohort, "bd", experiment=f"bd-dir-{d}", directions=d) for d in ("none", "both")]
    common = ["--feature-index", str(cohort["features"]), "--samples", str(cohort["samples"]),
              "--clinical", str(cohort["clinical"])]
    out = tmp_path / "s2m.png"
    curves = [str(p.parent / "curve.csv") for p in runs]
    assert main(["figures", "s2m", "--run", *map(str, runs), "--curves", *curves, *common,
                 "--out", str(out)]) == 0
    _png(out)
    table = pd.read_csv(out.with_suffix(".csv"))
    assert list(table["directions"]) == ["none", "both"] and table["cka"].between(0, 1).all()
    single = train_tiny(tmp_path, cohort, "image_only")
    assert main(["figures", "s2m", "--run", str(single), "--curves", curves[0], *common,
                 "--out", str(out)]) == 2  # BD runs only
