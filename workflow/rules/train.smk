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
