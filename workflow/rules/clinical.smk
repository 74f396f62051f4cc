# Sample sheet, patient split and clinical table normalisation (once per cohort).


# The job rebuilds the sheet from the cohort (and demo) section, reading the sample sheet TSV as
# its input when there is one: nothing of the size of the cohort goes on the command line (Linux
# caps one argument at 128 KiB: about 1,000 slides with long paths). The parse-time sheet's SHA-256
# is a parameter: a changed sheet reruns the rule, whatever its file's timestamp.
rule samples:
    input:
        sheet=[] if DEMO.get("enabled") or not config["cohort"].get("sample_sheet") else config["cohort"]["sample_sheet"],
    output:
        SAMPLES_TSV,
    params:
        cohort=lambda w: section("cohort"),  # a function: {slide} in slide_pattern is not a wildcard
        demo=section("demo"),
        sha256=SAMPLES_SHA256,
    log:
        f"{R}/logs/samples.log",
    benchmark:
        f"{R}/benchmarks/samples.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd samples --cohort {params.cohort:q} --demo {params.demo:q} --sha256 {params.sha256} "
        "--out {output:q} > {log:q} 2>&1"


from bd.cohort.split import SplitParams

# Official mode reads the split files: they are inputs, so editing one reruns the split.
SPLIT_FILES = (
    [f"{config['cohort']['split_dir']}/{name}_id.txt" for name in ("train", "val", "test")]
    if with_defaults(SplitParams, config["split"])["mode"] == "official" and COHORT["split_dir"]
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
        table=CLINICAL_TSV,
        scaler=SCALER_JSON,
        summary=f"{R}/clinical/summary.csv",
        summary_html=report(f"{R}/clinical/summary.html", caption="../report/clinical.rst", category="Cohort"),
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
        "{{ bd clinical --table {input.table:q} --split {input.split:q} --out-dir {params.out_dir:q} "
        "--params {params.clinical:q} && "
        "bd report-table --table {output.summary:q} --out {output.summary_html:q} --title 'Clinical summary'; }} "
        "> {log:q} 2>&1"
