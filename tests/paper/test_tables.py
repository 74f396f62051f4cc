"""Tables I-III and the runtime summary from synthetic `bd evaluate` outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bd.paper.tables import read_metrics, read_summaries, table1, table2, table3
from bd.workflow.runtime import read_benchmarks, runtime_summary
from bd.cli import main
from bd.errors import TableError

from synthetic_results import DIRECTIONS, LAMBDAS, MAIN, write_run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    files = {name: [write_run(root, name, s) for s in (0, 1)] for name in MAIN}
    files.update({name: [write_run(root, name, 0)] for name in DIRECTIONS + LAMBDAS})
    return root, files


def test_table1_values_are_means_over_masks_and_seeds(results):
    _, files = results
    paths = [p for m in MAIN for p in files[m]]
    metrics = read_metrics(paths)
    t = table1(metrics, [0, 50, 80, 100], read_summaries(paths))
    # references only at 0 %; the five missing-data methods at each rate
    assert list(t[t.rate == 0].method) == MAIN
    assert list(t[t.rate == 50].method) == ["filling", "ae", "ensemble", "smil", "bd", "modality_dropout"]
    row = t[(t.rate == 80) & (t.method == "bd")].iloc[0]
    raw = metrics[(metrics.method == "bd") & (metrics.rate == 80) & (metrics.kind == "clinical")]
    assert len(raw) == 2 * 3 and row.masks == 6 and row.seeds == 2
    assert row.auc_pct == pytest.approx(raw.auc.mean() * 100)
    assert row.f1_pct_sd == pytest.approx(raw.f1.std(ddof=0) * 100)
    fill = t[(t.rate == 80) & (t.method == "filling")].iloc[0]
    assert row.delta_auc_pct == pytest.approx(row.auc_pct - fill.auc_pct)
    assert np.isnan(fill.delta_auc_pct)
    assert row.paper_auc_pct == 84.2 and row.paper_f1_pct == 74.9
    assert row.auc_pct_ci_low <= row.auc_pct_ci_high


def test_table_commands_write_csv_and_markdown(results, capsys):
    root, files = results
    out = root / "tables"
    paths = [str(p) for m in MAIN for p in files[m]]
    assert main(["aggregate", "table1", "--metrics", *paths, "--rates", "[0, 50, 80, 100]", "--out-dir", str(out)]) == 0
    md = (out / "table1.md").read_text()
    assert "| Missing rate (%) | Method | AUC |" in md and "**" in md and "84.2 / 74.9" in md
    csv = pd.read_csv(out / "table1.csv")
    assert {"auc_pct", "delta_auc_pct", "f1_pct", "paper_auc_pct"} <= set(csv.columns)
    assert main(["aggregate", "table2", "--metrics", *[str(p) for d in DIRECTIONS for p in files[d]],
                 "--out-dir", str(out)]) == 0
    t2 = pd.read_csv(out / "table2.csv")
    assert list(t2.rate) == [0, 0, 0, 0, 80, 80, 80, 80]
    assert list(t2.directions[:4]) == ["none", "s2m", "m2s", "both"]
    assert list(t2.s_to_m[:4]) == [False, True, False, True] and list(t2.m_to_s[:4]) == [False, False, True, True]
    assert "✓" in (out / "table2.md").read_text()
    assert main(["aggregate", "table3", "--metrics", *[str(p) for d in LAMBDAS for p in files[d]],
                 "--out-dir", str(out)]) == 0
    t3 = pd.read_csv(out / "table3.csv")
    assert list(zip(t3.lambda_m, t3.lambda_s)) == [(0.2, 0.5), (0.6, 0.5), (0.6, 0.8)]
    assert list(t3.epoch) == [10 + len(n) for n in LAMBDAS] and list(t3.paper_epoch) == [30, 31, 17]


def test_tables_name_what_is_missing(results, tmp_path):
    _, files = results
    with pytest.raises(TableError, match="bd-dir"):
        table2(read_metrics(files["filling"]), [0, 80])
    with pytest.raises(TableError, match="bd-lm"):
        table3(read_metrics(files["image_only"]), [100])
    bad = tmp_path / "metrics.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(TableError, match="missing column"):
        read_metrics([bad])
    assert main(["aggregate", "table1", "--metrics", str(tmp_path / "nope.csv"), "--out-dir", str(tmp_path)]) == 2


def test_runtime_summary(tmp_path):
    bench = tmp_path / "benchmarks"
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, s, rss in [("segment/1.tsv", 2.0, 100.0), ("segment/2.tsv", 4.0, 150.0),
                        ("train/bd/seed0.tsv", 30.0, 900.0), ("samples.tsv", 0.5, "NA")]:
        path = bench / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{s}\t0:00:0{int(s) % 10}\t{rss}\t1\t1\t1\t0\t0\t0\t{s / 2}\n")
    (bench / "junk.tsv").write_text("")
    jobs = read_benchmarks(bench)
    summary = runtime_summary(jobs).set_index("rule")
    assert summary.loc["segment", "jobs"] == 2 and summary.loc["segment", "total_s"] == 6.0
    assert summary.loc["segment", "max_rss_mb"] == 150.0 and summary.loc["train", "mean_s"] == 30.0
    assert np.isnan(summary.loc["samples", "max_rss_mb"])
    assert list(summary.index)[0] == "train"  # slowest first
    out_csv, out_png = tmp_path / "runtime.csv", tmp_path / "runtime.png"
    assert main(["runtime-summary", "--benchmarks", str(bench), "--out-csv", str(out_csv),
                 "--out-png", str(out_png)]) == 0
    assert out_png.read_bytes()[:4] == b"\x89PNG" and len(pd.read_csv(out_csv)) == 3
