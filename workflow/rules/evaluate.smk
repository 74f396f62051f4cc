# Evaluation of each trained run at clinical-data (and slide) missing rates: the same seeded masks
# for every method and seed (see bd/evaluation/missing.py), test split only.


rule evaluate:
    input:
        checkpoint=CHECKPOINT,
        index=FEATURE_INDEX,  # where each store is; the command reads the test split's only
        stores=TEST_STORES,  # the test split's (common.smk)
        samples=SAMPLES_TSV,
        clinical=CLINICAL_TSV,
    output:
        metrics=f"{R}/evaluate/{{experiment}}/seed{{seed}}/metrics.csv",
        predictions=f"{R}/evaluate/{{experiment}}/seed{{seed}}/predictions.csv",
        summary=f"{R}/evaluate/{{experiment}}/seed{{seed}}/summary.csv",
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
        "--samples {input.samples:q} --clinical {input.clinical:q} --params {params.evaluation:q} "
        "--experiment {wildcards.experiment} --seed {wildcards.seed} "
        "--out-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"
