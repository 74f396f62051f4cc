# Shared setup: config validation, the sample sheet, and helpers for the rule files.
import json

import pandas as pd
from snakemake.utils import validate

from bd.cohort import build_sample_sheet, check_config_paths
from bd.experiments import experiments, seeds_for, target_experiments


validate(config, schema="../schemas/config.schema.yaml")
check_config_paths(config)

R = config["results"]
SAMPLES = build_sample_sheet(config)
# One validator for the whole sheet (validating row by row reloads the schema each time: seconds
# at BCNB size).
validate(SAMPLES, schema="../schemas/samples.schema.yaml", set_default=False)
SLIDES = list(SAMPLES["slide_id"])
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


SLIDE_PATHS = dict(zip(SAMPLES["slide_id"], SAMPLES["path"]))


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
