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
        errors=QC_OUTPUTS[0],
        checks=QC_OUTPUTS[1],
        errors_html=report(
            f"{R}/qc/slide_errors.html",
            caption="../report/slide_errors.rst",
            category="Quality control",
            subcategory="Slides not read",
        ),
        checks_html=report(
            f"{R}/qc/cohort_checks.html",
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
        "{{ bd qc --samples {input.samples:q} --results {params.results:q} --config {params.config:q} "
        "--out {output.errors:q} --checks-out {output.checks:q} && "
        "bd report-table --table {output.errors:q} --out {output.errors_html:q} --title 'Slides not read' && "
        "bd report-table --table {output.checks:q} --out {output.checks_html:q} --title 'Cohort checks'; }} "
        "> {log:q} 2>&1"


# The report's QC images: one compact JPEG per slide and kind (segmentation, patch grid), at most
# 360 px a side (bd/paper/report_images.py), so that the demo's report stays under 15 MB; the full-size
# PNGs stay beside the masks and grids. One job for the cohort.
REPORT_QC = [f"{R}/report_qc/segment", f"{R}/report_qc/tiles"]


rule report_qc_images:
    input:
        samples=SAMPLES_TSV,
        segment=[f"{R}/segment/{s}/qc.png" for s in SLIDES],
        tiles=[f"{R}/tiles/{s}.qc.png" for s in SLIDES],
    output:
        segment=report(
            directory(REPORT_QC[0]),
            patterns=["{slide}.jpg"],
            caption="../report/segment_qc.rst",
            category="Quality control",
            subcategory="Tissue segmentation",
            labels={"slide": "{slide}"},
        ),
        tiles=report(
            directory(REPORT_QC[1]),
            patterns=["{slide}.jpg"],
            caption="../report/tile_qc.rst",
            category="Quality control",
            subcategory="Patch grid",
            labels={"slide": "{slide}"},
        ),
    params:
        results=lambda w, output: os.path.dirname(os.path.dirname(output.segment)),  # the results folder
    localrule: True  # a thumbnail per slide: seconds, on the submit host
    log:
        f"{R}/logs/report_qc_images.log",
    benchmark:
        f"{R}/benchmarks/report_qc_images.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd report-images --samples {input.samples:q} --results {params.results:q} "
        "--segment-out {output.segment:q} --tiles-out {output.tiles:q} > {log:q} 2>&1"

