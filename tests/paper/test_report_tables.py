"""Report items: tables as HTML pages, compact QC images, a legible training-curve figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bd import cli
from bd.mil.curve_plot import curve_panels, plot_curve
from bd.paper.report_images import compact

BD_CURVE = ["train_loss", "train_mul", "train_mul_ce", "train_mul_distill", "train_sgl", "train_sgl_ce",
            "train_sgl_mse", "train_sgl_kl", "share_mul_ce", "share_mul_distill", "share_sgl_ce", "share_sgl_mse",
            "share_sgl_kl", "val_auc", "val_f1", "val_loss", "val_prob_sd"]


def test_markdown_table_becomes_an_html_table(tmp_path):
    md = tmp_path / "table1.md"
    md.write_text("| Missing rate (%) | Method | AUC |\n|---|---|---|\n| 0 | BD | **86.1 ± 2.8** |\n"
                  "| 100 | image only | 85.0 ± 0.2 |\n\nPercent; mean ± sd over `masks`.\n")
    out = tmp_path / "table1.html"
    assert cli.main(["report-table", "--table", str(md), "--out", str(out), "--title", "Table I"]) == 0
    page = out.read_text()
    assert page.count("<tr>") == 3 and "<th>Missing rate (%)</th>" in page
    assert '<td class="num"><b>86.1 ± 2.8</b></td>' in page  # bold kept, numbers right-aligned
    assert '<p class="note">Percent; mean ± sd over <code>masks</code>.</p>' in page
    assert "|" not in page.split("<body>")[1]  # nothing left as Markdown


def test_tsv_and_csv_tables_and_bad_rows(tmp_path, capsys):
    tsv = tmp_path / "errors.tsv"
    tsv.write_text("slide_id\tstage\treason\n")  # a header only: an empty table, said so
    out = tmp_path / "e.html"
    assert cli.main(["report-table", "--table", str(tsv), "--out", str(out)]) == 0
    assert "<th>reason</th>" in out.read_text() and "(no rows)" in out.read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3\n")
    assert cli.main(["report-table", "--table", str(bad), "--out", str(out)]) == 2
    assert "bad.csv: row 3 has 1 fields, the header 2" in capsys.readouterr().err


def test_report_qc_image_is_a_small_jpeg(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    image = (rng.random((1024, 700, 3)) * 255).astype(np.uint8)  # noise: the worst case for size
    src = tmp_path / "qc.png"
    cv2.imwrite(str(src), image)
    size = compact(src, tmp_path / "qc.jpg", max_side=640, quality=80)
    small = cv2.imread(str(tmp_path / "qc.jpg"))
    assert max(small.shape[:2]) == 640 and size == (tmp_path / "qc.jpg").stat().st_size
    assert size < src.stat().st_size / 3


def test_bd_curve_is_split_into_panels_with_one_legend_each_outside_the_axes(tmp_path):
    rng = np.random.default_rng(0)
    curve = pd.DataFrame({c: rng.random(12) for c in BD_CURVE})
    curve["epoch"], curve["stage"] = np.arange(1, 13), "joint"
    panels = curve_panels(curve)
    assert [len(keys) for _, keys in panels] == [1, 3, 4, 5, 3, 1]
    assert sorted(k for _, keys in panels for k in keys) == sorted(BD_CURVE)  # every series, once
    assert max(len(keys) for _, keys in panels) <= 5

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    real_close = plt.close
    plt.close = lambda fig=None: drawn.setdefault("fig", fig)  # keep the figure to inspect it
    try:
        plot_curve(curve, {"joint": 5}, tmp_path / "curve.png", "bd, seed 0")
    finally:
        plt.close = real_close
    fig = drawn["fig"]
    fig.canvas.draw()
    axes = fig.axes
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    assert len(legends) == len(panels)  # one legend a row
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        if ax.get_legend() is not None:  # the legend lies right of its panel, over no curve
            assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    real_close(fig)
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("stages", [["ae", "fusion"]])
def test_two_stage_curve_has_a_column_per_stage(tmp_path, stages):
    rows = [{"stage": s, "epoch": e, "train_loss": 1 / e, "val_auc": 0.5 + e / 40, "val_loss": 0.7}
            for s in stages for e in range(1, 6)]
    plot_curve(pd.DataFrame(rows), {s: 3 for s in stages}, tmp_path / "c.png", "ae, seed 0")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_batch_runs_commands_in_turn_each_with_its_log_and_stops_at_a_failure(tmp_path, capsys):
    import json

    good = tmp_path / "t.csv"
    good.write_text("a,b\n1,2\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1\n")
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"argv": ["report-table", "--table", str(good), "--out", str(tmp_path / f"{i}.html")],
              "log": str(tmp_path / "logs" / f"{i}.log")} for i in range(2)]
    lines.append({"argv": ["report-table", "--table", str(bad), "--out", str(tmp_path / "x.html")],
                  "log": str(tmp_path / "logs" / "bad.log")})
    lines.append({"argv": ["report-table", "--table", str(good), "--out", str(tmp_path / "never.html")],
                  "log": str(tmp_path / "logs" / "never.log")})
    jobs.write_text("".join(json.dumps(j) + "\n" for j in lines))
    assert cli.main(["batch", "--jobs", str(jobs)]) == 2
    assert (tmp_path / "0.html").exists() and (tmp_path / "1.html").exists()
    assert not (tmp_path / "never.html").exists()  # the batch stopped at the failure
    assert "row 2 has 1 fields" in (tmp_path / "logs" / "bad.log").read_text()  # the job's error, in its log
    assert "job 3 of 4" in capsys.readouterr().err
    jobs.write_text('{"argv": "train"}\n')
    assert cli.main(["batch", "--jobs", str(jobs)]) == 2
    assert "line 1: needs 'argv'" in capsys.readouterr().err
