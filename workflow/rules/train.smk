# Training: one job per experiment (method + overrides) and seed.


rule train:
    input:
        features=expand(f"{R}/features/{{slide}}.zarr", slide=SLIDES),
        samples=rules.samples.output[0],
        clinical=rules.clinical.output.table,
        scaler=rules.clinical.output.scaler,
    output:
        checkpoint=f"{R}/train/{{experiment}}/seed{{seed}}/checkpoint.pt",
        curve=f"{R}/train/{{experiment}}/seed{{seed}}/curve.csv",
        curve_png=report(
            f"{R}/train/{{experiment}}/seed{{seed}}/curve.png",
            caption="../report/curve.rst",
            category="Training",
            labels={"experiment": "{experiment}", "seed": "{seed}"},
        ),
    params:
        training=experiment_params,
        features_dir=f"{R}/features",
    log:
        f"{R}/logs/train/{{experiment}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{experiment}}/seed{{seed}}.tsv"
    threads: 2
    shell:
        "bd train --features-dir {params.features_dir:q} --samples {input.samples:q} "
        "--clinical {input.clinical:q} --seed {wildcards.seed} --params {params.training:q} "
        "--out-dir $(dirname {output.checkpoint:q}) > {log:q} 2>&1"
