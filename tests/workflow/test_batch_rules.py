"""Batched jobs (the demo's segment_slides_per_job, extract_slides_per_job and train_runs_per_job):
the same outputs from fewer, larger jobs, each run's command exactly the per-run rule's."""

from __future__ import annotations

import json
import os
import shlex

import numpy as np

from workflow_runs import check, scheduled, snakemake, tiny_config, write_config

TARGETS = ["all", "ablations", "wsi_missing", "analysis"]


def small_ablations(config):
    config["ablations"] = {"directions": ["none", "both"], "prompt_lengths": [10], "lambda_grid": [[0.6, 0.5]],
                           "clinical_expansions": [20], "seeds": [0]}
    config["training"]["methods"] = ["image_only", "clinical_only", "filling", "bd"]
    return config


def test_batched_workflow_has_batch_jobs_instead_of_per_run_jobs(tmp_path):
    per_run = small_ablations(tiny_config())
    batched = {**per_run, "extract_slides_per_job": 3, "train_runs_per_job": 3}
    write_config(tmp_path, per_run)
    singles = scheduled(check(snakemake(tmp_path, "-n", *TARGETS)))
    path = write_config(tmp_path, batched, "batched.yaml")
    proc = check(snakemake(tmp_path, *TARGETS, "-n", "--configfile", str(path)))
    batches = scheduled(proc)
    slides, runs, evaluations = singles["extract"], singles["train"], singles["evaluate"]
    assert not {"extract", "train", "evaluate"} & set(batches)
    assert sum(n for r, n in batches.items() if r.startswith("extract_batch_")) == -(-slides // 3)
    train_batches = sum(n for r, n in batches.items() if r.startswith("train_batch_"))
    assert runs / 3 <= train_batches < runs  # fewer jobs; batches never mix targets, so a few more than runs / 3
    assert sum(n for r, n in batches.items() if r.startswith("evaluate_batch_")) < evaluations
    assert {r: n for r, n in batches.items() if "_batch_" not in r} == {
        r: n for r, n in singles.items() if r not in ("extract", "train", "evaluate")}


def test_a_batch_runs_the_per_run_rule_commands(tmp_path):
    """The jobs file a train batch writes holds, per run, the arguments rule train passes."""
    config = {**small_ablations(tiny_config()), "train_runs_per_job": 2}
    write_config(tmp_path, config)
    proc = check(snakemake(tmp_path, "-n", "-p", "--forceall", *TARGETS))
    text = proc.stdout + proc.stderr
    commands = [c.split("\n\n")[0] for c in text.split("Shell command: ")[1:]]  # a command spans lines
    command = next(c for c in commands if c.startswith("printf '%s' ") and "/train/batches/" in c)
    jobs = [json.loads(j) for j in shlex.split(command)[2].splitlines()]
    assert len(jobs) <= 2 and all(j["argv"][0] == "train" for j in jobs)
    for job in jobs:
        argv = job["argv"]
        out_dir = argv[argv.index("--out-dir") + 1]
        experiment, seed = out_dir.split("/")[-2], out_dir.split("/")[-1].removeprefix("seed")
        assert argv[argv.index("--seed") + 1] == seed
        params = json.loads(argv[argv.index("--params") + 1])
        # a method's own experiment (those of training.methods and those a figure target needs,
        # e.g. bd_wsi for wsi_missing), or a BD / Filling variant of the ablations
        assert params["method"] == experiment or experiment.startswith(("bd-", "filling-cx"))
        assert job["log"].endswith(f"logs/train/{experiment}/seed{seed}.log")


def shell_commands(proc):
    """The shell commands a dry run with -p prints (a command may span lines)."""
    text = proc.stdout + proc.stderr
    return [c.split("\n\n")[0].split("\nSelect jobs")[0].strip() for c in text.split("Shell command: ")[1:]]


def one_slide_argv(command):
    """A one-slide rule's `bd ...` command as arguments: the log redirection dropped, the output
    folder that rule segment passes as `$(dirname mask.png)` resolved."""
    argv = shlex.split(command)[1:]  # without the leading `bd`
    argv = argv[:argv.index(">")]
    return [os.path.dirname(a[len("$(dirname "):-1]) if a.startswith("$(dirname ") else a for a in argv]


def test_a_slide_batch_runs_the_one_slide_rule_commands(tmp_path):
    """segment_slides_per_job: 2 segment_tile_batch jobs instead of 8 segment and 8 tile jobs, whose
    jobs files hold, per slide, exactly the arguments rules segment and tile pass, with their logs."""
    config = tiny_config()
    write_config(tmp_path, config)
    singles = check(snakemake(tmp_path, "-n", "-p", "--forceall", "all"))
    commands = shell_commands(singles)
    expected = {}
    for command in commands:
        if command.startswith(("bd segment ", "bd tile ")):
            argv = one_slide_argv(command)
            expected[argv[0], argv[argv.index("--slide") + 1]] = (argv, shlex.split(command)[-2])
    counts = scheduled(singles)
    assert counts["segment"] == counts["tile"] == len(expected) / 2 == 8
    path = write_config(tmp_path, {**config, "segment_slides_per_job": 5}, "batched.yaml")
    batched = check(snakemake(tmp_path, "-n", "-p", "--forceall", "all", "--configfile", str(path)))
    counts = scheduled(batched)
    assert "segment" not in counts and "tile" not in counts
    assert counts["segment_tile_batch_0"] == counts["segment_tile_batch_1"] == 1 and "segment_tile_batch_2" not in counts
    jobs = []
    for command in shell_commands(batched):
        if command.startswith("printf '%s' ") and "/segment/batches/" in command:
            jobs += [json.loads(j) for j in shlex.split(command)[2].splitlines()]
    assert len(jobs) == len(expected)
    for job in jobs:
        argv = job["argv"]
        want, log = expected[argv[0], argv[argv.index("--slide") + 1]]
        assert argv == want
        assert job["log"] == log


def content(path):
    """A file's bytes; a .npz grid's arrays (the archive's members carry their write time)."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    return path.read_bytes()


def equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return a == b


def test_slide_batches_write_the_same_files_as_one_slide_jobs(tmp_path):
    """Every segment and tile output of the batched form is byte for byte the one-slide form's."""
    config = tiny_config()
    config["demo"]["patients"] = 4
    config["demo"]["flat_jpeg_fraction"] = 0.25  # a flat JPEG among them
    outputs = {}
    for form, per_job in (("single", 1), ("batched", 3)):
        work = tmp_path / form
        write_config(work, {**config, "segment_slides_per_job": per_job})
        check(snakemake(work, "--cores", "2", *[f"results/tiles/{i}.npz" for i in range(1, 5)]))
        files = sorted(p for d in ("segment", "tiles") for p in (work / "results" / d).rglob("*")
                       if p.is_file() and "batches" not in p.parts)
        outputs[form] = {p.relative_to(work).as_posix(): content(p) for p in files}
        assert (work / "results" / "segment" / "batches" / "1.jsonl").is_file() == (per_job > 1)
        logs = work / "results" / "logs"
        assert all((logs / stage / f"{p.parent.name}.log").is_file() for p in files
                   for stage in ("segment", "tile") if p.name == "mask.png")
    assert len(outputs["single"]) >= 4 * 6 and outputs["single"].keys() == outputs["batched"].keys()
    differing = [name for name, data in outputs["single"].items() if not equal(outputs["batched"][name], data)]
    assert not differing, differing
