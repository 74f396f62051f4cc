"""DAG scale: `snakemake -n` time of the project's workflow on 1,058 and 5,000 slides vs a bare Snakefile.

For each cohort size, in a temporary folder: a TSV sample sheet of that many (empty) slide files,
an (empty) clinical table and split folder, and the project's config with the demo off and that
sheet. Timed, one after the other on the same machine:

1. ``snakemake -n`` of the project's workflow (default target: every method and seed, Table I,
   figures), output discarded;
2. the reference: ``snakemake -n`` of a bare Snakefile with three trivial rules per slide (a chain
   slide -> a -> b -> c) and one aggregate rule over all slides;
3. the number of cluster jobs after grouping: a dry run with profiles/slurm, counting group jobs
   and the jobs outside any group (target rules excluded: they run on the submit host).

Every rule that reads feature stores (train, evaluate, slide_qc, fig5, heatmaps) lists all of them
as inputs, so these DAGs have tens of thousands of edges more than the bare Snakefile's.

Then a real run (not a dry run) of rule ``samples`` on a 10,000-slide cohort whose slide paths are
120 characters long: the sheet reaches the job through the sample sheet file, not the command line
(Linux caps one argument at 128 KiB, which such a sheet passes from about 1,000 slides); timed from
the start of ``snakemake`` to the written ``samples.tsv``, parse time included.

Prints one JSON object per line: {"metric", "value", "unit", "target", "better"}; the target of
the project is at most twice the reference (the ratio metric). Run: python benchmarks/dag.py
[--sizes 1058 5000] [--repeats 1] [--sheet-slides 10000].
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

BARE_SNAKEFILE = """\
import csv
with open(config["sheet"]) as fh:
    SLIDES = {r["slide_id"]: r["path"] for r in csv.DictReader(fh, delimiter="\\t")}

rule aggregate:
    input: expand("c/{slide}.txt", slide=SLIDES)
    output: "aggregate.txt"
    shell: "cat {input} > {output}"

rule a:
    input: lambda wc: SLIDES[wc.slide]
    output: "a/{slide}.txt"
    shell: "touch {output}"

rule b:
    input: "a/{slide}.txt"
    output: "b/{slide}.txt"
    shell: "touch {output}"

rule c:
    input: "b/{slide}.txt"
    output: "c/{slide}.txt"
    shell: "touch {output}"
"""


def emit(metric: str, value: float, unit: str, target: object = None, better: str | None = None) -> None:
    print(json.dumps({"metric": metric, "value": round(float(value), 4), "unit": unit,
                      "target": target, "better": better}), flush=True)


def write_cohort_files(folder: Path, paths: list[str]) -> dict:
    """A sample sheet of ``paths`` (patient i = slide i), a clinical table with the paper's columns,
    official split files (70/10/20 %) and the project's config for them (demo off)."""
    import pandas as pd

    n = len(paths)
    sheet = folder / "samples.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\n" + "".join(f"{i}\t{i}\t{p}\n" for i, p in enumerate(paths, 1)))
    # a real clinical table: the workflow reads and checks it once at parse time (bd/workflow/check.py)
    ids = range(1, n + 1)
    pd.DataFrame({"Patient ID": ids, "Age(years)": [30 + i % 50 for i in ids], "Tumour Size(cm)": 2.5,
                  "ER": "Positive", "PR": "Negative", "HER2": "Negative",
                  "ALN status": ["N0" if i % 3 else "N+(>2)" for i in ids]}).to_excel(folder / "clinical.xlsx", index=False)
    split_dir = folder / "split"
    split_dir.mkdir()
    for name, (lo, hi) in {"train": (0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}.items():
        (split_dir / f"{name}_id.txt").write_text("".join(f"{i}\n" for i in ids if lo <= (i - 1) / n < hi))
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["results"] = str(folder / "results")
    config["demo"]["enabled"] = False
    config["cohort"].update(sample_sheet=str(sheet), clinical_table=str(folder / "clinical.xlsx"),
                            split_dir=str(split_dir), slide_pattern=str(folder / "slides" / "{slide}"))
    (folder / "config").mkdir()
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def make_cohort(folder: Path, n_slides: int) -> dict:
    """Empty slide files and the cohort files for them (see write_cohort_files)."""
    slides = folder / "slides"
    slides.mkdir(parents=True)
    paths = []
    for i in range(1, n_slides + 1):
        path = slides / f"{i}.jpg"
        path.touch()
        paths.append(str(path))
    return write_cohort_files(folder, paths)


def long_path_cohort(folder: Path, n_slides: int, length: int = 120) -> list[str]:
    """``n_slides`` empty slide files whose absolute paths are ``length`` characters long."""
    slides = folder / "slides"
    slides.mkdir(parents=True)
    paths = []
    for i in range(1, n_slides + 1):
        stem = f"slide-{i:06d}-"
        pad = length - len(str(slides)) - 1 - len(stem) - len(".svs")
        if pad < 1:
            raise SystemExit(f"{slides}: too long for {length}-character slide paths")
        path = slides / (stem + "x" * pad + ".svs")
        path.touch()
        paths.append(str(path))
    assert all(len(p) == length for p in paths)
    write_cohort_files(folder, paths)
    return paths


def samples_rule_run(folder: Path, n_slides: int, length: int = 120) -> tuple[float, Path]:
    """A real run of rule samples on a ``n_slides`` cohort with ``length``-character paths:
    (seconds, the samples.tsv written)."""
    paths = long_path_cohort(folder, n_slides, length)
    out = folder / "results" / "samples.tsv"
    seconds, _ = snakemake(["--snakefile", str(ROOT / "Snakefile"), "--cores", "1", str(out)], folder)
    written = out.read_text().splitlines()
    if len(written) != n_slides + 1 or written[1].split("\t")[2] != paths[0]:
        raise SystemExit(f"{out}: not the {n_slides}-slide sheet")
    return seconds, out


def snakemake(args: list[str], cwd: Path, capture: bool = False) -> tuple[float, str]:
    """Run ``python -m snakemake`` in ``cwd``; wall seconds and (when captured) its output."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.STDOUT if capture else subprocess.PIPE)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed in {cwd}:\n"
                         f"{(proc.stdout if capture else proc.stderr)[-3000:]}")
    return seconds, proc.stdout or ""


def project_dry_run(folder: Path) -> float:
    seconds, _ = snakemake(["-n", "--snakefile", str(ROOT / "Snakefile"), "--cores", "2"], folder)
    return seconds


def bare_dry_run(folder: Path) -> float:
    bare = folder / "bare"
    bare.mkdir(exist_ok=True)
    (bare / "Snakefile").write_text(BARE_SNAKEFILE)
    seconds, _ = snakemake(["-n", "--cores", "2", "--config", f"sheet={folder / 'samples.tsv'}"], bare)
    return seconds


_TIMESTAMP = re.compile(r"^\[[^\]]*\] ")


def count_cluster_jobs(dry_run_output: str, local_rules: set[str]) -> tuple[int, int]:
    """(cluster jobs, jobs before grouping) from a dry run's output. A group job is a line
    "Group job NAME" followed by its member jobs, indented; a job outside any group is a
    non-indented "rule NAME:" line and is a cluster job unless it is a target rule (no command,
    run on the submit host)."""
    groups = members = plain = local = 0
    for line in dry_run_output.splitlines():
        indented = line.startswith("    ")
        text = _TIMESTAMP.sub("", line.strip())
        if text.startswith("Group job "):
            groups += 1
        elif text.startswith(("rule ", "localrule ")) and text.endswith(":"):
            if indented:
                members += 1
            else:
                plain += 1
                local += text.startswith("localrule ") or text.split()[1].rstrip(":") in local_rules
    return groups + plain - local, members + plain


def grouped_jobs(folder: Path) -> tuple[int, int]:
    """Cluster jobs and plain jobs of a dry run with the SLURM profile."""
    _, out = snakemake(["-n", "--snakefile", str(ROOT / "Snakefile"), "--profile", str(ROOT / "profiles" / "slurm")],
                       folder, capture=True)
    return count_cluster_jobs(out, local_rules={"all", "ablations", "wsi_missing", "analysis"})


def bench(n_slides: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bd-dag-{n_slides}-") as tmp:
        folder = Path(tmp)
        make_cohort(folder, n_slides)
        project, bare = [], []
        for _ in range(repeats):  # interleaved, so machine load hits both alike
            project.append(project_dry_run(folder))
            bare.append(bare_dry_run(folder))
        p, b = min(project), min(bare)
        emit(f"dry_run_project_{n_slides}", p, "s", target=round(2 * b, 2), better="lower")
        emit(f"dry_run_bare_snakefile_{n_slides}", b, "s")
        emit(f"dry_run_ratio_{n_slides}", p / b, "x", target=2.0, better="lower")
        cluster, jobs = grouped_jobs(folder)
        emit(f"jobs_{n_slides}", jobs, "jobs")
        emit(f"cluster_jobs_after_grouping_{n_slides}", cluster, "jobs", target=jobs, better="lower")


def bench_samples(n_slides: int, length: int = 120) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bd-sheet-{n_slides}-") as tmp:
        import pandas as pd

        seconds, out = samples_rule_run(Path(tmp), n_slides, length)
        emit(f"samples_rule_run_{n_slides}_slides_{length}_char_paths", seconds, "s")
        # what the sheet would have needed as one command-line argument (the old rule's way):
        # more than Linux's 128 KiB cap on one argument
        as_json = pd.read_csv(out, sep="\t", dtype=str).to_json(orient="records")
        emit(f"samples_sheet_as_one_argument_{n_slides}", len(as_json.encode()) / 1024, "KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1058, 5000], help="slides per cohort")
    parser.add_argument("--repeats", type=int, default=1, help="timed dry runs of each workflow (min is kept)")
    parser.add_argument("--sheet-slides", type=int, default=10_000,
                        help="slides of the real samples-rule run (0: skip it)")
    args = parser.parse_args()
    for n in args.sizes:
        bench(n, args.repeats)
    if args.sheet_slides:
        bench_samples(args.sheet_slides)


if __name__ == "__main__":
    main()
