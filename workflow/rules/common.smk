# Shared setup: config validation, the sample sheet, and helpers for the rule files.
import json
import os

import pandas as pd
from snakemake.logging import logger
from snakemake.utils import validate

from bd.check import missing_files, prerun, validate_config
from bd.cohort import build_sample_sheet, check_config_paths
from bd.experiments import experiments, seeds_for, target_experiments


validate_config(config)  # one line naming each unknown key or wrong value (bd/check.py)
validate(config, schema="../schemas/config.schema.yaml")  # Snakemake's own check; fills defaults
check_config_paths(config)

R = config["results"]
SAMPLES = build_sample_sheet(config)
# One validator for the whole sheet (validating row by row reloads the schema each time: seconds
# at BCNB size).
validate(SAMPLES, schema="../schemas/samples.schema.yaml", set_default=False)
# Pre-run cohort checks, before any job (bd/check.py): missing slide files stop the run naming them
# (on_slide_error: fail) or get no job and are recorded by rule slide_qc (skip); slides without a
# clinical row, patients without a slide or a label are counted and warned about. Only in the main
# process: cluster jobs re-parse this file and need only the list of slides.
ON_SLIDE_ERROR = config.get("on_slide_error", "fail")
if workflow.is_main_process:
    MISSING_SLIDES = set(prerun(config, SAMPLES, logger.warning).missing_slides)
elif ON_SLIDE_ERROR == "skip" and not (config.get("demo") or {}).get("enabled"):
    MISSING_SLIDES = set(missing_files(SAMPLES))
else:
    MISSING_SLIDES = set()
SLIDES = [s for s in SAMPLES["slide_id"] if s not in MISSING_SLIDES]
STORES = [f"{R}/features/{slide}.zarr" for slide in SLIDES]
# The rules that read every store (train, evaluate, figures) take this one file as input instead
# of thousands each: the DAG of a 5,000-slide cohort then builds about as fast as a bare
# Snakefile's (benchmarks/dag.py). Written by rule feature_index (features.smk).
FEATURE_INDEX = f"{R}/features/index.tsv"
EXPERIMENTS = experiments(config)


wildcard_constraints:
    slide="[A-Za-z0-9._-]+",
    experiment="[A-Za-z0-9._-]+",
    seed=r"\d+",


def section(name):
    """A config section as a JSON string: passed to `bd` as --params, and a rerun trigger."""
    return json.dumps(config.get(name) or {}, sort_keys=True)


# Between-workflow output cache: with `snakemake --cache` (and $SNAKEMAKE_OUTPUT_CACHE set), the
# rules marked `cache: CACHE_MODE` (segment, tile, extract) take their outputs from a cache shared
# by workflows on the same cohort and settings, keyed by a hash of the rule's command, params and
# inputs back to the slides. Without --cache they are ordinary rules (and Snakemake prints no
# caching notice).
CACHING = workflow.workflow_settings.cache is not None
CACHE_MODE = "omit-software" if CACHING else False


def drop_benchmarks_of_cached_rules():
    """Snakemake refuses benchmark files on cached rules (a job taken from the cache has no
    runtime): in --cache runs those rules go without. Called after every rule is defined."""
    if CACHING:
        for cached in workflow.rules:
            if cached.cache and cached.cache.output:
                cached._benchmark = None


def stage_version(stage):
    """The stage's version (config `versions`, default 1): a params entry of the stage's rules, so
    raising it reruns them (and whatever uses their outputs) deliberately."""
    return int((config.get("versions") or {}).get(stage, 1))


SLIDE_PATHS = dict(zip(SAMPLES["slide_id"], SAMPLES["path"]))


def write_feature_index(stores, out, log):
    """Rule feature_index: the table (slide_id, store) of every slide's feature store."""
    from bd.io import write_text

    write_text(out, "slide_id\tstore\n" + "".join(f"{s}\t{p}\n" for s, p in zip(SLIDES, stores)))
    write_text(log, f"{len(stores)} feature stores listed in {out}\n")


def slide_path(wildcards):
    return SLIDE_PATHS[wildcards.slide]


def runs(names):
    """(experiment, seed) pairs for the given experiment names."""
    return [(e, s) for e in names for s in seeds_for(config, e)]


def experiment_params(wildcards):
    return json.dumps({**config["training"], **EXPERIMENTS[wildcards.experiment]}, sort_keys=True)


def target_files(target):
    """Final outputs of a workflow target (see the Snakefile header)."""
    from bd.experiments import target_experiments

    return TARGET_OUTPUTS[target]()


# Inputs and params of the evaluation and report rules.


def evaluation_params():
    """The evaluation section without its figure settings (those do not change any metric)."""
    return json.dumps({k: v for k, v in (config.get("evaluation") or {}).items() if k != "figures"}, sort_keys=True)


def run_files(names, name="metrics.csv"):
    return [f"{R}/evaluate/{e}/seed{s}/{name}" for e, s in runs(names)]


def run_files_of(names, name):
    """Files of the training runs (checkpoint.pt, curve.csv) of the given experiments."""
    return [f"{R}/train/{e}/seed{s}/{name}" for e, s in runs(names)]


def metrics_files(names):
    return run_files(names, "metrics.csv")


def prediction_files(names):
    return run_files(names, "predictions.csv")


def ablation(prefix):
    """Ablation experiments of one kind (bd-dir-, bd-prompt-, bd-lm-), in config order."""
    return [e for e in target_experiments(config, "ablations") if e.startswith(prefix)]


def present(names):
    """The experiments of ``names`` that the config defines."""
    return [n for n in names if n in EXPERIMENTS and (n in config["training"]["methods"] or n == "bd_wsi")]


def checkpoint_of(name):
    return f"{R}/train/{name}/seed{seeds_for(config, name)[0]}/checkpoint.pt"
