# Evaluation of each trained run at clinical-data (and slide) missing rates: the same seeded masks
# for every method and seed (see bd/evaluation/missing.py), test split; and its clinical report (calibration,
# decision curve, operating point chosen on the validation split, subgroup AUCs; bd/evaluation/clinical_report.py).


rule evaluate:
    input:
        checkpoint=CHECKPOINT,
        stores=EVAL_STORES,  # the test and validation splits' (common.smk)
        samples=SAMPLES_TSV,
        clinical=CLINICAL_TSV,
        scaler=SCALER_JSON,
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
        features_dir=lambda w, input: stores_dir(input.stores),
    log:
        f"{R}/logs/evaluate/{{experiment}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{experiment}}/seed{{seed}}.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd evaluate --checkpoint {input.checkpoint:q} --features-dir {params.features_dir:q} "
        "--samples {input.samples:q} --clinical {input.clinical:q} --scaler {input.scaler:q} --params {params.evaluation:q} "
        "--experiment {wildcards.experiment} --seed {wildcards.seed} "
        "--out-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"
