# Shared setup: config validation, the sample sheet, and helpers for the rule files.
import json
import os
import shlex
import sys

import pandas as pd
from snakemake.logging import logger
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from bd.workflow.check import SAMPLES_SCHEMA, SCHEMA, check_config, missing_files, prerun
from bd.features.params import FeatureParams
from bd.cohort.samples import CohortParams, build_sample_sheet, mpp_option, sheet_sha256
from bd.methods import list_methods
from bd.params import with_defaults
from bd.paper.experiments import experiments, seeds_for, target_experiments
from bd.workflow.layout import FEATURE_INDEX as FEATURE_INDEX_FILE, FEATURES, QC_TABLES, slide_output, slide_pattern
from bd.workflow.versions import VersionParams


# Numbers written as text by YAML 1.1 (`lr: 1e-4`) become numbers, then every unknown key, wrong
# value, empty or repeated list and missing input file is named in one error (bd/workflow/check.py).
check_config(config)
validate(config, schema=str(SCHEMA))  # Snakemake's own check (the schema in bd/schemas); fills defaults
# Defaults are read from where they are declared, never written again here: the top-level settings'
# (on_slide_error, *_per_job) from the schema, which validate() just filled in; a section's from its
# params dataclass (with_defaults: the keys the config gives, as written, over the dataclass's).
# `section()` still passes each section to its command as the config writes it.
COHORT = with_defaults(CohortParams, config["cohort"])
VERSIONS = with_defaults(VersionParams, config.get("versions"))

# Rules run `bd` from the Python environment Snakemake itself runs in, so `.venv/bin/snakemake`
# works without activating the venv and no other `bd` on PATH is picked up: every shell command
# starts by defining `bd` as this Python's `-m bd`. With --sdm conda the rule's conda environment
# (envs/bd.yaml) provides `bd`.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    # (braces doubled: Snakemake formats the prefix with the command)
    shell.prefix(f'set -euo pipefail; bd() {{{{ {shlex.quote(sys.executable)} -m bd "$@"; }}}}; ')

R = config["results"]
SAMPLES = build_sample_sheet(config)
# One validator for the whole sheet (validating row by row reloads the schema each time: seconds
# at BCNB size).
validate(SAMPLES, schema=str(SAMPLES_SCHEMA), set_default=False)
# Pre-run cohort checks, before any job (bd/workflow/check.py): missing slide files stop the run naming them
# (on_slide_error: fail) or get no job and are recorded by rule slide_qc (skip); slides without a
# clinical row, patients without a slide or a label are counted and warned about. Only in the main
# process: cluster jobs re-parse this file and need only the list of slides.
ON_SLIDE_ERROR = config["on_slide_error"]
COHORT_CHECK = None
if workflow.is_main_process:
    COHORT_CHECK = prerun(config, SAMPLES, logger.warning)
    MISSING_SLIDES = set(COHORT_CHECK.missing_slides)
elif ON_SLIDE_ERROR == "skip" and not (config.get("demo") or {}).get("enabled"):
    MISSING_SLIDES = set(missing_files(SAMPLES))
else:
    MISSING_SLIDES = set()
SLIDES = [s for s in SAMPLES["slide_id"] if s not in MISSING_SLIDES]
# The sheet's content hash: a parameter of rule samples (a changed sheet reruns it, whatever the
# timestamps) and the check that its job builds the sheet the workflow was parsed with.
SAMPLES_SHA256 = sheet_sha256(SAMPLES)
# Cohort tables, named by path (not rules.X.output) in the rules that also take every store: with
# a rule reference there, Snakemake hashes the whole store list once per store, per job (quadratic).
FEATURES_DIR = f"{R}/{FEATURES}"
SAMPLES_TSV = f"{R}/samples.tsv"
CLINICAL_TSV = f"{R}/clinical/clinical.tsv"
SCALER_JSON = f"{R}/clinical/scaler.json"
CHECKPOINT = f"{R}/train/{{experiment}}/seed{{seed}}/checkpoint.pt"
# The rules that read feature stores declare them: evaluation its test split's, slide_qc, fig5 and
# heatmaps every store. Training (21 jobs in the demo) takes them through FEATURE_INDEX, whose rule
# declares every store: with every store on every training job the DAG of a 5,000-slide cohort
# builds in 3.3x a bare Snakefile's time, through the index in 1.8x (benchmarks/dag.py). A lost
# store is rebuilt either way (targets list lost per-slide outputs, lost_slide_outputs).
# With h5_features.dir, each store is a link to a CLAM/TRIDENT .h5 file (rule h5_link), read with
# the identity file rule h5_identity writes beside it (bd/features/h5store.py); otherwise bd extract's Zarr.
H5_FEATURES = config.get("h5_features") or {}
STORE_SUFFIX = ".h5" if H5_FEATURES.get("dir") else ".zarr"
STORES = [f"{FEATURES_DIR}/{slide}{STORE_SUFFIX}" for slide in SLIDES]
# Evaluation reads the test and validation splits' stores only (validation: the clinical report's
# operating point): when the split is known at parse time (the checks compute it as `bd split`
# will), those are its inputs; otherwise (the demo, whose table a job writes; cluster jobs) every store.
_SPLIT = COHORT_CHECK.split if COHORT_CHECK is not None else None
EVAL_STORES = STORES if _SPLIT is None else [
    f"{FEATURES_DIR}/{s}{STORE_SUFFIX}" for s, p in zip(SAMPLES["slide_id"], SAMPLES["patient_id"])
    if s not in MISSING_SLIDES and _SPLIT.get(p) in ("test", "val")
]
# A table (slide_id, store) of every store, written by rule feature_index (features.smk), is the
# input through which training depends on every store.
FEATURE_INDEX = f"{R}/{FEATURE_INDEX_FILE}"
# The QC tables that rule slide_qc (qc.smk) writes, part of every target.
QC_OUTPUTS = [f"{R}/{table}" for table in QC_TABLES]
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
    runtime): in --cache runs those rules go without. Called after every rule is defined.
    Snakemake (9.x) has no public way to unset a benchmark: its setter rejects an empty path on a
    rule with wildcards and crashes on []; so this clears the attribute that setter fills, and
    tests/workflow/test_cache.py fails if a Snakemake release changes it."""
    if CACHING:
        for cached in workflow.rules:
            if cached.cache and cached.cache.output:
                cached._benchmark = None


def stage_version(stage):
    """The stage's version (config `versions`, default 1): a params entry of the stage's rules, so
    raising it reruns them (and whatever uses their outputs) deliberately."""
    return int(VERSIONS[stage])


SLIDE_PATHS = dict(zip(SAMPLES["slide_id"], SAMPLES["path"]))


def write_feature_index(stores, out, log):
    """Rule feature_index: the table (slide_id, store) of every slide's feature store."""
    from bd.features.store import write_feature_index as write_index
    from bd.io import write_text

    write_index(dict(zip(SLIDES, stores)), out)
    write_text(log, f"{len(stores)} feature stores listed in {out}\n")


def stores_dir(stores):
    """The folder of the feature stores (a rule's input.stores)."""
    return os.path.dirname(stores[0]) if stores else FEATURES_DIR


# Extraction in batches (features.smk): extract_slides_per_job slides per `bd extract` job.
EXTRACT_PER_JOB = int(config["extract_slides_per_job"])
FEATURES_SETTINGS = with_defaults(FeatureParams, config.get("features"), prefix="features.")
EXTRACT_COMMON = dict(
    params=dict(on_error=ON_SLIDE_ERROR, features=section("features"), version=stage_version("extract")),
    # a thread per DataLoader worker (features.num_workers, FeatureParams' default when unset)
    threads=max(1, FEATURES_SETTINGS["num_workers"]),
    weights=FEATURES_SETTINGS["weights"] or [],
)


def slide_batches(per_job):
    """The slides in consecutive batches of ``per_job`` (sheet order)."""
    return [SLIDES[i:i + per_job] for i in range(0, len(SLIDES), per_job)]


def extract_batches():
    """The slides in consecutive batches of EXTRACT_PER_JOB."""
    return slide_batches(EXTRACT_PER_JOB)


# Segmentation and tiling in batches (slides.smk): segment_slides_per_job slides per `bd batch` job.
SEGMENT_PER_JOB = int(config["segment_slides_per_job"])


# Every slide's `bd segment` and `bd tile` settings: rules segment and tile take them as params
# (slides.smk), the batch rules as the slide's values (slide_values).
SLIDE_SETTINGS = dict(on_error=ON_SLIDE_ERROR, seg=section("segmentation"), tiling=section("tiling"),
                      fallback_mpp=COHORT["fallback_mpp"], annotations=COHORT["annotations_dir"] or "")


def segment_argv(arg):
    """The arguments of one slide's `bd segment`, written once: ``arg(name)`` gives each file and
    setting (rule segment's shell placeholders, SLIDE_SHELL; a batch's slide, slide_values)."""
    return ["segment", "--slide", arg("slide"), "--out-dir", arg("out_dir"), "--params", arg("seg"),
            "--fallback-mpp", arg("fallback_mpp"), arg("mpp"), "--on-error", arg("on_error")]


def tile_argv(arg):
    """The arguments of one slide's `bd tile` (as segment_argv)."""
    return ["tile", "--slide", arg("slide"), "--mask", arg("mask"), "--out", arg("grid"),
            "--artefacts", arg("artefacts"), "--qc", arg("grid_qc"), "--params", arg("tiling"),
            "--fallback-mpp", arg("fallback_mpp"), arg("mpp"), f"--annotations-dir={arg('annotations')}",
            "--on-error", arg("on_error")]


# What the arguments are in the one-slide rules' shell commands: their inputs, outputs and params.
SLIDE_SHELL = {"slide": "{input.slide:q}", "out_dir": '"$(dirname {output.mask:q})"', "mask": "{input.mask:q}",
               "artefacts": "{input.artefacts:q}", "grid": "{output.grid:q}", "grid_qc": "{output.qc:q}",
               "seg": "{params.seg:q}", "tiling": "{params.tiling:q}", "fallback_mpp": "{params.fallback_mpp}",
               "mpp": "{params.mpp}", "annotations": "{params.annotations:q}", "on_error": "{params.on_error}"}


def slide_shell(argv):
    """Rule segment's or tile's shell command: ``argv`` with the rule's placeholders (no file name
    in it, so --cache's hash of the command is the same for every workflow)."""
    return " ".join(["bd", *argv(SLIDE_SHELL.__getitem__), "> {log:q} 2>&1"])


def slide_values(slide):
    """One slide's files and settings, as rules segment and tile get them."""
    out = lambda kind: slide_output(R, kind, slide)
    files = {"slide": SLIDE_PATHS[slide], "out_dir": os.path.dirname(out("mask")), "mask": out("mask"),
             "artefacts": out("artefacts"), "grid": out("grid"), "grid_qc": out("grid_qc")}
    return {**files, **{k: str(v) for k, v in SLIDE_SETTINGS.items()}, "mpp": shlex.split(mpp_option(SAMPLES, slide))}


def slide_batch_jobs(slides):
    """`bd batch --jobs` text: per slide, its segment and its tile command, each with the one-slide rule's log."""
    jobs = []
    for slide in slides:
        values = slide_values(slide)
        for argv in (segment_argv, tile_argv):
            args = [a for v in argv(values.__getitem__) for a in (v if isinstance(v, list) else [v])]  # --mpp: 0 or 2
            jobs.append({"argv": args, "log": f"{R}/logs/{args[0]}/{slide}.log"})
    return "".join(json.dumps(job) + "\n" for job in jobs)


def extract_jobs_tsv(slides):
    """`bd extract --jobs` table text (slide, grid, out) for a batch."""
    rows = [f"{SLIDE_PATHS[s]}\t{R}/tiles/{s}.npz\t{FEATURES_DIR}/{s}.zarr\n" for s in slides]
    return "slide\tgrid\tout\n" + "".join(rows)


# Training and evaluation in batches (train.smk, evaluate.smk): train_runs_per_job runs per
# `bd batch` job (bd/workflow/batch.py), the imports and start-up paid once a job. 1: one job per run.
RUNS_PER_JOB = int(config["train_runs_per_job"])
BATCHED = RUNS_PER_JOB > 1
# Rules train and evaluate take no run when the runs are batched (the batch rules make them).
RUN_RULE_EXPERIMENTS = "(?!)" if BATCHED else "[A-Za-z0-9._-]+"


def run_batches(targets, per_job):
    """(experiment, seed) runs of the targets in batches of at most ``per_job``: each target's
    runs not in an earlier target, in order, so a target never waits for another's runs."""
    seen, batches = set(), []
    for target in targets:
        todo = [r for r in runs(target_experiments(config, target)) if r not in seen]
        seen.update(todo)
        n = -(-len(todo) // per_job) if todo else 0  # as many batches as needed, of near-equal size
        batches += [todo[i::n] for i in range(n)]
    return batches


def training_argv(experiment, seed, threads):
    """The `bd train` command of one run, as rule train runs it (a list of arguments)."""
    params = json.dumps({**config["training"], **EXPERIMENTS[experiment]}, sort_keys=True)
    return ["train", "--feature-index", FEATURE_INDEX, "--samples", SAMPLES_TSV, "--clinical", CLINICAL_TSV,
            "--scaler", SCALER_JSON, "--seed", str(seed), "--params", params, "--threads", str(threads),
            "--no-progress", "--out-dir", f"{R}/train/{experiment}/seed{seed}"]


def evaluation_argv(experiment, seed):
    """The `bd evaluate` command of one run, as rule evaluate runs it."""
    return ["evaluate", "--run", f"{R}/train/{experiment}/seed{seed}/checkpoint.pt",
            "--feature-index", FEATURE_INDEX, "--samples", SAMPLES_TSV, "--clinical", CLINICAL_TSV,
            "--scaler", SCALER_JSON, "--params", evaluation_params(), "--experiment", experiment, "--seed", str(seed),
            "--out-dir", f"{R}/evaluate/{experiment}/seed{seed}"]


def batch_jobs(stage, batch, argv):
    """`bd batch --jobs` text: one JSON line per run (its command and its own log)."""
    return "".join(json.dumps({"argv": argv(e, s), "log": f"{R}/logs/{stage}/{e}/seed{s}.log"}) + "\n"
                   for e, s in batch)


def slide_path(wildcards):
    return SLIDE_PATHS[wildcards.slide]


def runs(names):
    """(experiment, seed) pairs for the given experiment names."""
    return [(e, s) for e in names for s in seeds_for(config, e)]


def experiment_params(wildcards):
    return json.dumps({**config["training"], **EXPERIMENTS[wildcards.experiment]}, sort_keys=True)


def lost_slide_outputs():
    """The slides' masks, patch grids and feature stores lost after they were used: missing
    while a later output exists (the slide's grid or store, or any trained run or the QC table
    for a store). Every target rule lists them, so that one lost after a finished run (moved
    away, a purged scratch folder) is rebuilt, with everything that depends on it: by itself
    Snakemake rebuilds a missing intermediate file only when a job that reads it has to run
    anyway. Missing files of a run not yet made are left to the jobs that make them. A few
    os.path.exists per slide, in the main process only."""
    import glob

    if not workflow.is_main_process:
        return []
    used = os.path.exists(QC_OUTPUTS[0]) or bool(glob.glob(os.path.join(glob.escape(R), "train", "*", "seed*", "checkpoint.pt")))
    lost = []
    for slide in SLIDES:
        chain = [f"{R}/segment/{slide}/mask.png", f"{R}/segment/{slide}/mask.json", f"{R}/tiles/{slide}.npz",
                 f"{FEATURES_DIR}/{slide}.zarr"] if STORE_SUFFIX == ".zarr" else [f"{FEATURES_DIR}/{slide}.h5"]
        exists = [os.path.exists(p) for p in chain]
        later = used
        for path, there in zip(reversed(chain), reversed(exists)):
            if not there and later:
                lost.append(path)
            later = later or there
    return lost


# The workflow's targets (rules in the Snakefile) and the paper's files each one makes.
TARGETS = ("all", "ablations", "wsi_missing", "analysis")


def final_outputs(target):
    """The tables and figures of a target (rule runtime_summary waits for them)."""
    tables = lambda *names: [f"{R}/tables/{n}.{ext}" for n in names for ext in ("csv", "md")]
    figures = lambda *names: [f"{R}/figures/{n}" for n in names]
    return {
        "all": lambda: [*tables("table1"), *figures("fig1.png", "roc.png"), *CLINICAL_REPORT_OUTPUTS],  # clinical_report.smk
        "ablations": lambda: [*tables("table2", "table3"), *figures("fig4c.png", "s2m.png")],
        "wsi_missing": lambda: figures("fig4ab.png"),
        "analysis": lambda: figures("fig5.png", "heatmaps"),
    }[target]()


def target_files(target):
    """Everything a workflow target (see the Snakefile header) builds: its tables and figures, its
    runtime summary, the QC tables, and the lost per-slide outputs (the one target function)."""
    runtime = [f"{R}/runtime/{target}.csv", f"{R}/runtime/{target}.png"]
    return [*final_outputs(target), *runtime, *QC_OUTPUTS, *REPORT_QC, *lost_slide_outputs()]  # REPORT_QC: qc.smk


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
    """The experiments of ``names`` that the config defines (bd_wsi, not a default method, always)."""
    always = list_methods(default=False)
    return [n for n in names if n in EXPERIMENTS and (n in config["training"]["methods"] or n in always)]


def checkpoint_of(name):
    return f"{R}/train/{name}/seed{seeds_for(config, name)[0]}/checkpoint.pt"


# The external cohort (workflow/rules/external.smk; config section external).

from snakemake.exceptions import WorkflowError

EXTERNAL = config.get("external") or {}
EXT = f"{R}/external"
# Runtime settings of the run's stages that do not change the features (the run's own encoder,
# patch size and MPP come from its checkpoint; bd predict refuses any other).
EXT_FEATURE_RUNTIME = ("batch_size", "num_workers", "device", "reader", "decode", "precision", "compile",
                       "on_decode_error")


def external_setting(key):
    """A required key of the external section; a clear error when the target is asked for without it."""
    value = EXTERNAL.get(key)
    if not value:
        raise WorkflowError(f"target external: set external.{key} in the config (see config/README.md)")
    return value


def external_checkpoint():
    from bd.external import ExternalParams

    external_setting("run")
    return ExternalParams(**EXTERNAL).checkpoint(R)


def external_slides():
    """The external sheet's slide files (inputs of the prediction job unless stores are given)."""
    from bd.external import read_sheet

    if EXTERNAL.get("features_dir"):
        return []
    return list(read_sheet(external_setting("sample_sheet"))["path"])


def external_overrides():
    feats = config.get("features") or {}
    return json.dumps({"segmentation": config.get("segmentation") or {},
                       "features": {k: feats[k] for k in EXT_FEATURE_RUNTIME if k in feats}}, sort_keys=True)


def external_seed(checkpoint):
    """The training seed of the run (its seedN folder), else 0."""
    import re

    match = re.fullmatch(r"seed(\d+)", os.path.basename(os.path.dirname(checkpoint)))
    return int(match.group(1)) if match else 0


def external_evaluated():
    from bd.external import ExternalParams

    return bool(with_defaults(ExternalParams, EXTERNAL)["evaluate"] and EXTERNAL.get("clinical_table"))


# A run of this workflow (experiment/seedN) uses this workflow's scaler; a checkpoint file from
# elsewhere, the scaler path it records.
EXT_SCALER = [] if str(EXTERNAL.get("run") or "").endswith(".pt") else [SCALER_JSON]


def write_h5_identity(identity, out, log):
    """Rule h5_identity: the user's identity of the .h5 feature files, beside their links."""
    from bd.features.h5store import H5FeatureParams, write_identity
    from bd.io import write_text
    from bd.params import build

    write_identity(build(H5FeatureParams, identity), out)
    write_text(log, f"identity of the .h5 feature files in {H5_FEATURES.get('dir')}: {identity}\n")
