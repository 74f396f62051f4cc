# Target `external`: a trained run applied to another cohort (config section `external`). One job
# predicts every slide of the external sample sheet with the model and the encoder loaded once
# (`bd predict --samples`: segment, tile and extract with the run's own feature settings, into
# results/external/features/, unless external.features_dir holds the stores; either way its
# feature index results/external/features/index.tsv lists them); where the external
# clinical table has labels, a second job evaluates the run on them exactly as on the test split
# (`bd evaluate`: AUC and F1 at the clinical missing rates, the same metrics files).


rule external_predict:
    input:
        checkpoint=lambda w: external_checkpoint(),
        samples=lambda w: external_setting("sample_sheet"),
        clinical=lambda w: [EXTERNAL["clinical_table"]] if EXTERNAL.get("clinical_table") else [],
        scaler=EXT_SCALER,
        slides=lambda w: external_slides(),
        features=lambda w: [EXTERNAL["features_dir"]] if EXTERNAL.get("features_dir") else [],
    output:
        predictions=f"{EXT}/predictions.tsv",
        index=f"{EXT}/features/index.tsv",
        tables=[f"{EXT}/samples.tsv", f"{EXT}/clinical.tsv"] if external_evaluated() else [],
    params:
        overrides=external_overrides(),
        clinical=section("clinical"),
        on_error=ON_SLIDE_ERROR,
        table=lambda w, input: f"--clinical-table {shlex.quote(input.clinical[0])}" if input.clinical else "",
        scaler=lambda w, input: f"--scaler {shlex.quote(input.scaler[0])}" if input.scaler else "",
        features=lambda w, input: f"--feature-index {shlex.quote(input.features[0])}" if input.features else "",
        fallback=f"--fallback-mpp {EXTERNAL['fallback_mpp']}" if EXTERNAL.get("fallback_mpp") else "",
        labels="--require-labels" if external_evaluated() else "",
        version=stage_version("extract"),
    log:
        f"{R}/logs/external/predict.log",
    benchmark:
        f"{R}/benchmarks/external/predict.tsv"
    resources:
        gpu=1,
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd predict --run {input.checkpoint:q} --samples {input.samples:q} {params.table} {params.scaler} "
        "{params.features} {params.fallback} {params.labels} --params {params.overrides:q} "
        "--clinical-params {params.clinical:q} --on-slide-error {params.on_error} "
        "--out-dir \"$(dirname {output.predictions:q})\" > {log:q} 2>&1"


rule external_evaluate:
    input:
        checkpoint=lambda w: external_checkpoint(),
        predictions=f"{EXT}/predictions.tsv",
        index=f"{EXT}/features/index.tsv",
        samples=f"{EXT}/samples.tsv",
        clinical=f"{EXT}/clinical.tsv",
    output:
        metrics=f"{EXT}/evaluate/metrics.csv",
        predictions=f"{EXT}/evaluate/predictions.csv",
        summary=f"{EXT}/evaluate/summary.csv",
    params:
        evaluation=evaluation_params(),
        experiment="external",
        seed=lambda w, input: external_seed(input.checkpoint),
        version=stage_version("evaluate"),
    log:
        f"{R}/logs/external/evaluate.log",
    benchmark:
        f"{R}/benchmarks/external/evaluate.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd evaluate --run {input.checkpoint:q} --feature-index {input.index:q} "
        "--samples {input.samples:q} --clinical {input.clinical:q} --params {params.evaluation:q} "
        "--experiment {params.experiment} --seed {params.seed} "
        "--out-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"


rule external:
    input:
        lambda w: [f"{EXT}/predictions.tsv", *([f"{EXT}/evaluate/metrics.csv"] if external_evaluated() else [])],
