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
for _row in SAMPLES.to_dict("records"):
    validate(_row, schema="../schemas/samples.schema.yaml")
SLIDES = list(SAMPLES["slide_id"])
EXPERIMENTS = experiments(config)


wildcard_constraints:
    slide="[A-Za-z0-9._-]+",
    experiment="[A-Za-z0-9._-]+",
    seed=r"\d+",


def section(name):
    """A config section as a JSON string: passed to `bd` as --params, and a rerun trigger."""
    return json.dumps(config.get(name) or {}, sort_keys=True)


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.slide, "path"]


def runs(names):
    """(experiment, seed) pairs for the given experiment names."""
    return [(e, s) for e in names for s in seeds_for(config, e)]


def experiment_params(wildcards):
    return json.dumps({**config["training"], **EXPERIMENTS[wildcards.experiment]}, sort_keys=True)


def target_files(target):
    """Final outputs of a workflow target (see the Snakefile header)."""
    from bd.experiments import target_experiments

    return TARGET_OUTPUTS[target]()
