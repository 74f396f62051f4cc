"""Batched jobs (the demo's extract_slides_per_job and train_runs_per_job): the same outputs from
fewer, larger jobs, each run's command exactly the per-run rule's."""

from __future__ import annotations

import json
import shlex

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
        assert params["method"] in config["training"]["methods"] or experiment.startswith(("bd-", "filling-cx"))
        assert job["log"].endswith(f"logs/train/{experiment}/seed{seed}.log")
