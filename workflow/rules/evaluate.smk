# Evaluation of each trained run at clinical-data (and slide) missing rates: the same seeded masks
# for every method and seed (see bd/evaluation/missing.py), test split; and its clinical report (calibration,
# decision curve, operating point chosen on the validation split, subgroup AUCs; bd/evaluation/clinical_report.py).


rule evaluate:
    input:
        checkpoint=CHECKPOINT,
        index=FEATURE_INDEX,  # where each store is; the command reads the test and validation splits' only
        stores=EVAL_STORES,  # the test and validation splits' (common.smk)
        samples=SAMPLES_TSV,
        clinical=CLINICAL_TSV,
        scaler=SCALER_JSON,
    wildcard_constraints:
        experiment=RUN_RULE_EXPERIMENTS,  # no run when batched (train_runs_per_job > 1): rules evaluate_batch_*
    output:
        metrics=f"{R}/evaluate/{{experiment}}/seed{{seed}}/metrics.csv",
        predictions=f"{R}/evaluate/{{experiment}}/seed{{seed}}/predictions.csv",
        summary=f"{R}/evaluate/{{experiment}}/seed{{seed}}/summary.csv",
        calibration=f"{R}/evaluate/{{experiment}}/seed{{seed}}/calibration.csv",
        decision_curve=f"{R}/evaluate/{{experiment}}/seed{{seed}}/decision_curve.csv",
        operating_point=f"{R}/evaluate/{{experiment}}/seed{{seed}}/operating_point.csv",
        subgroups=f"{R}/evaluate/{{experiment}}/seed{{seed}}/subgroups.csv",
    params:
        evaluation=evaluation_params(),
        version=stage_version("evaluate"),
    log:
        f"{R}/logs/evaluate/{{experiment}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{experiment}}/seed{{seed}}.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd evaluate --run {input.checkpoint:q} --feature-index {input.index:q} "
        "--samples {input.samples:q} --clinical {input.clinical:q} --scaler {input.scaler:q} --params {params.evaluation:q} "
        "--experiment {wildcards.experiment} --seed {wildcards.seed} "
        "--out-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"


# train_runs_per_job > 1 (the demo): rules evaluate_batch_0, ...: that many evaluations per
# `bd batch` job, each exactly rule evaluate's command with its own log (bd/workflow/batch.py).
if BATCHED:
    for _k, _batch in enumerate(run_batches(["all", "ablations", "wsi_missing"], RUNS_PER_JOB)):

        rule:
            name:
                f"evaluate_batch_{_k}"
            input:
                checkpoints=[f"{R}/train/{e}/seed{s}/checkpoint.pt" for e, s in _batch],
                index=FEATURE_INDEX,
                stores=EVAL_STORES,
                samples=SAMPLES_TSV,
                clinical=CLINICAL_TSV,
                scaler=SCALER_JSON,
            output:
                metrics=[f"{R}/evaluate/{e}/seed{s}/metrics.csv" for e, s in _batch],
                predictions=[f"{R}/evaluate/{e}/seed{s}/predictions.csv" for e, s in _batch],
                summary=[f"{R}/evaluate/{e}/seed{s}/summary.csv" for e, s in _batch],
                calibration=[f"{R}/evaluate/{e}/seed{s}/calibration.csv" for e, s in _batch],
                decision_curve=[f"{R}/evaluate/{e}/seed{s}/decision_curve.csv" for e, s in _batch],
                operating_point=[f"{R}/evaluate/{e}/seed{s}/operating_point.csv" for e, s in _batch],
                subgroups=[f"{R}/evaluate/{e}/seed{s}/subgroups.csv" for e, s in _batch],
                jobs=f"{R}/evaluate/batches/{_k}.jsonl",
            params:
                jobs=batch_jobs("evaluate", _batch, evaluation_argv),
                version=stage_version("evaluate"),
            log:
                f"{R}/logs/evaluate/batch-{_k}.log",
            benchmark:
                f"{R}/benchmarks/evaluate/batch-{_k}.tsv"
            conda:
                "../../envs/bd.yaml"
            shell:
                "printf '%s' {params.jobs:q} > {output.jobs:q} && bd batch --jobs {output.jobs:q} > {log:q} 2>&1"
