# Sample sheet, patient split and clinical table normalisation (once per cohort).


rule samples:
    output:
        f"{R}/samples.tsv",
    params:
        sheet=SAMPLES.to_json(orient="records"),
    log:
        f"{R}/logs/samples.log",
    benchmark:
        f"{R}/benchmarks/samples.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd samples --sheet {params.sheet:q} --out {output:q} > {log:q} 2>&1"


# Official mode reads the split files: they are inputs, so editing one reruns the split.
SPLIT_FILES = (
    [f"{config['cohort']['split_dir']}/{name}_id.txt" for name in ("train", "val", "test")]
    if config["split"].get("mode", "official") == "official" and config["cohort"].get("split_dir")
    else []
)


rule split:
    input:
        table=config["cohort"]["clinical_table"],
        split_files=SPLIT_FILES,
    output:
        split=f"{R}/split/split.tsv",
    params:
        split=section("split"),
        version=stage_version("split"),
        clinical=section("clinical"),
        split_dir=lambda w, input: os.path.dirname(input.split_files[0]) if input.split_files else "",
    log:
        f"{R}/logs/split.log",
    benchmark:
        f"{R}/benchmarks/split.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd split --table {input.table:q} --split-dir={params.split_dir:q} --out {output.split:q} "
        "--params {params.split:q} --clinical {params.clinical:q} > {log:q} 2>&1"


rule clinical:
    input:
        table=config["cohort"]["clinical_table"],
        split=rules.split.output.split,
    output:
        table=f"{R}/clinical/clinical.tsv",
        scaler=f"{R}/clinical/scaler.json",
        summary=report(
            f"{R}/clinical/summary.csv",
            caption="../report/clinical.rst",
            category="Cohort",
        ),
    params:
        clinical=section("clinical"),
        version=stage_version("clinical"),
        out_dir=lambda w, output: os.path.dirname(output.table),
    log:
        f"{R}/logs/clinical.log",
    benchmark:
        f"{R}/benchmarks/clinical.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd clinical --table {input.table:q} --split {input.split:q} --out-dir {params.out_dir:q} "
        "--params {params.clinical:q} > {log:q} 2>&1"
