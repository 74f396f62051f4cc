# Quality control of the cohort, as report tables: the slides that could not be read
# (on_slide_error: skip; recorded by segment, tile and extract in their outputs, and slide files
# missing on disk) and the pre-run cohort checks with their counts (bd/workflow/check.py). Every workflow
# target builds them (QC_OUTPUTS, target_files in common.smk).


rule slide_qc:
    input:
        samples=SAMPLES_TSV,
        stores=STORES,  # every store exists: each slide's outcome is known
        table=config["cohort"]["clinical_table"],
    output:
        errors=report(
            QC_OUTPUTS[0],
            caption="../report/slide_errors.rst",
            category="Quality control",
            subcategory="Slides not read",
        ),
        checks=report(
            QC_OUTPUTS[1],
            caption="../report/cohort_checks.rst",
            category="Quality control",
            subcategory="Cohort checks",
        ),
    params:
        results=lambda w, output: os.path.dirname(os.path.dirname(output.errors)),  # the results folder
        config=json.dumps(
            {"on_slide_error": ON_SLIDE_ERROR, "cohort": {"clinical_table": config["cohort"]["clinical_table"]},
             "clinical": config.get("clinical") or {}},
            sort_keys=True,
        ),
    localrule: True  # reads one record per slide: seconds, on the submit host
    log:
        f"{R}/logs/slide_qc.log",
    benchmark:
        f"{R}/benchmarks/slide_qc.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd qc --samples {input.samples:q} --results {params.results:q} --config {params.config:q} "
        "--out {output.errors:q} --checks-out {output.checks:q} > {log:q} 2>&1"

