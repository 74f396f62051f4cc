# Training: one job per experiment (method + overrides, see bd/paper/experiments.py) and seed. The job
# gets the training section merged with the experiment's overrides as --params; every patient's
# features are loaded into memory once (the BCNB cohort: about 4.3 GB as bf16), so an epoch does
# no file I/O. Outputs: checkpoint.pt (model + everything evaluation checks its inputs against),
# curve.csv and curve.png (a report item).


rule train:
    input:
        index=FEATURE_INDEX,
        samples=SAMPLES_TSV,
        clinical=CLINICAL_TSV,
        scaler=SCALER_JSON,
    wildcard_constraints:
        experiment=RUN_RULE_EXPERIMENTS,  # no run when batched (train_runs_per_job > 1): rules train_batch_*
    output:
        checkpoint=CHECKPOINT,
        curve=f"{R}/train/{{experiment}}/seed{{seed}}/curve.csv",
        curve_png=report(
            f"{R}/train/{{experiment}}/seed{{seed}}/curve.png",
            caption="../report/curve.rst",
            category="Training",
            labels={"experiment": "{experiment}", "seed": "{seed}"},
        ),
    params:
        training=experiment_params,
        version=stage_version("train"),
    log:
        f"{R}/logs/train/{{experiment}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{experiment}}/seed{{seed}}.tsv"
    # One thread for small cohorts (the demo: two jobs side by side beat one job with two threads).
    # BCNB-sized cohorts pack ~16 k patches a step (training.batch_size: auto), which keeps several
    # cores busy (benchmarks/train.py); Snakemake lowers it to --cores where there are fewer.
    threads: 1 if len(SLIDES) < 256 else 4
    resources:
        # all features in memory: ~4 MB a slide at 2,000 patches x 1,024-d bf16, twice for headroom
        mem_mb=2048 + 8 * len(SLIDES),
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd train --feature-index {input.index:q} --samples {input.samples:q} "
        "--clinical {input.clinical:q} --scaler {input.scaler:q} --seed {wildcards.seed} "
        "--params {params.training:q} --threads {threads} --no-progress "
        "--out-dir \"$(dirname {output.checkpoint:q})\" > {log:q} 2>&1"


# train_runs_per_job > 1 (the demo): rules train_batch_0, ...: that many runs per `bd batch` job,
# each run exactly rule train's command with its own log (bd/workflow/batch.py); the same outputs.
TRAIN_THREADS = 1 if len(SLIDES) < 256 else 4
if BATCHED:
    for _k, _batch in enumerate(run_batches(["all", "ablations", "wsi_missing", "analysis"], RUNS_PER_JOB)):

        rule:
            name:
                f"train_batch_{_k}"
            input:
                index=FEATURE_INDEX,
                samples=SAMPLES_TSV,
                clinical=CLINICAL_TSV,
                scaler=SCALER_JSON,
            output:
                checkpoints=[f"{R}/train/{e}/seed{s}/checkpoint.pt" for e, s in _batch],
                curves=[f"{R}/train/{e}/seed{s}/curve.csv" for e, s in _batch],
                pngs=[report(f"{R}/train/{e}/seed{s}/curve.png", caption="../report/curve.rst", category="Training",
                             labels={"experiment": e, "seed": str(s)}) for e, s in _batch],
                jobs=f"{R}/train/batches/{_k}.jsonl",
            params:
                jobs=batch_jobs("train", _batch, lambda e, s: training_argv(e, s, TRAIN_THREADS)),
                version=stage_version("train"),
            log:
                f"{R}/logs/train/batch-{_k}.log",
            benchmark:
                f"{R}/benchmarks/train/batch-{_k}.tsv"
            threads: TRAIN_THREADS
            resources:
                mem_mb=2048 + 8 * len(SLIDES),
            conda:
                "../../envs/bd.yaml"
            shell:
                "printf '%s' {params.jobs:q} > {output.jobs:q} && bd batch --jobs {output.jobs:q} > {log:q} 2>&1"
