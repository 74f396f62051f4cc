# The paper's tables and figures from all evaluations, and the report's runtime summary.
# Targets (rule all in the Snakefile, and rules ablations, wsi_missing, analysis) take their files
# from target_files (common.smk); each target also gets a runtime summary of every job run before it.

from bd.evaluation.evaluate import FigureParams

EVAL = config.get("evaluation") or {}
# The figure settings, FigureParams' defaults for those the config leaves out (no default is written here).
FIGS = with_defaults(FigureParams, EVAL.get("figures"), prefix="evaluation.figures.")


# Attention heatmaps come from BD, or from the first slide-based method the config trains (the
# registry's order for "heatmaps").
HEATMAP_METHOD = next((m for m in list_methods(figure="heatmaps") if m in config["training"]["methods"]), "bd")


COHORT_INPUTS = dict(
    index=FEATURE_INDEX,
    stores=STORES,
    samples=SAMPLES_TSV,
    clinical=CLINICAL_TSV,
)


rule table1:
    input:
        metrics=metrics_files(target_experiments(config, "all")),
        summaries=run_files(target_experiments(config, "all"), "summary.csv"),
    output:
        csv=f"{R}/tables/table1.csv",
        md=f"{R}/tables/table1.md",
        html=report(f"{R}/tables/table1.html", caption="../report/table1.rst", category="Tables"),
    params:
        rates=json.dumps(EVAL["missing_rates"]),
    log:
        f"{R}/logs/table1.log",
    benchmark:
        f"{R}/benchmarks/table1.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "{{ bd aggregate table1 --metrics {input.metrics:q} --summaries {input.summaries:q} --rates {params.rates:q} --out-dir \"$(dirname {output.csv:q})\" && "
        "bd report-table --table {output.md:q} --out {output.html:q} --title 'Table I'; }} > {log:q} 2>&1"


rule fig1:
    input:
        metrics_files(present(list_methods(figure="fig1"))),
    output:
        report(f"{R}/figures/fig1.png", caption="../report/fig1.rst", category="Figures"),
    params:
        methods=present(list_methods(figure="fig1")),
    log:
        f"{R}/logs/fig1.log",
    benchmark:
        f"{R}/benchmarks/fig1.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures fig1 --metrics {input:q} --methods {params.methods} --out {output:q} > {log:q} 2>&1"


rule roc:
    input:
        prediction_files(target_experiments(config, "all")),
    output:
        report(f"{R}/figures/roc.png", caption="../report/roc.rst", category="Figures"),
    params:
        rates=json.dumps(FIGS["roc_rates"]),
    log:
        f"{R}/logs/roc.log",
    benchmark:
        f"{R}/benchmarks/roc.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures roc --predictions {input:q} --rates {params.rates:q} --out {output:q} > {log:q} 2>&1"


rule table2:
    input:
        metrics=metrics_files(ablation("bd-dir-")),
        summaries=run_files(ablation("bd-dir-"), "summary.csv"),
    output:
        csv=f"{R}/tables/table2.csv",
        md=f"{R}/tables/table2.md",
        html=report(f"{R}/tables/table2.html", caption="../report/table2.rst", category="Tables"),
    log:
        f"{R}/logs/table2.log",
    benchmark:
        f"{R}/benchmarks/table2.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "{{ bd aggregate table2 --metrics {input.metrics:q} --summaries {input.summaries:q} --out-dir \"$(dirname {output.csv:q})\" && "
        "bd report-table --table {output.md:q} --out {output.html:q} --title 'Table II'; }} > {log:q} 2>&1"


rule table3:
    input:
        metrics=metrics_files(ablation("bd-lm-")),
        summaries=run_files(ablation("bd-lm-"), "summary.csv"),
    output:
        csv=f"{R}/tables/table3.csv",
        md=f"{R}/tables/table3.md",
        html=report(f"{R}/tables/table3.html", caption="../report/table3.rst", category="Tables"),
    log:
        f"{R}/logs/table3.log",
    benchmark:
        f"{R}/benchmarks/table3.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "{{ bd aggregate table3 --metrics {input.metrics:q} --summaries {input.summaries:q} --out-dir \"$(dirname {output.csv:q})\" && "
        "bd report-table --table {output.md:q} --out {output.html:q} --title 'Table III'; }} > {log:q} 2>&1"


rule fig4c:
    input:
        predictions=prediction_files(ablation("bd-prompt-")),
        summaries=run_files(ablation("bd-prompt-"), "summary.csv"),
    output:
        report(f"{R}/figures/fig4c.png", caption="../report/fig4c.rst", category="Figures"),
    log:
        f"{R}/logs/fig4c.log",
    benchmark:
        f"{R}/benchmarks/fig4c.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures fig4c --predictions {input.predictions:q} --summaries {input.summaries:q} --rate 100 --out {output:q} > {log:q} 2>&1"


rule fig4ab:
    input:
        metrics_files(target_experiments(config, "wsi_missing")),
    output:
        report(f"{R}/figures/fig4ab.png", caption="../report/fig4ab.rst", category="Figures"),
    params:
        methods=target_experiments(config, "wsi_missing"),
    log:
        f"{R}/logs/fig4ab.log",
    benchmark:
        f"{R}/benchmarks/fig4ab.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures fig4ab --metrics {input:q} --methods {params.methods} --out {output:q} > {log:q} 2>&1"


FIG5_RUNS = target_experiments(config, "analysis")  # image_only, then filling-cx{N} (Fig. 5 a, b, c)


rule fig5:
    input:
        runs=[checkpoint_of(e) for e in FIG5_RUNS],
        **COHORT_INPUTS,
    output:
        report(f"{R}/figures/fig5.png", caption="../report/fig5.rst", category="Figures"),
    params:
        perplexity=FIGS["tsne_perplexity"],
    log:
        f"{R}/logs/fig5.log",
    benchmark:
        f"{R}/benchmarks/fig5.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures fig5 --run {input.runs:q} --feature-index {input.index:q} "
        "--samples {input.samples:q} --clinical {input.clinical:q} --perplexity {params.perplexity} "
        "--out {output:q} > {log:q} 2>&1"


rule s2m:
    input:
        runs=run_files_of(ablation("bd-dir-"), "checkpoint.pt"),
        curves=run_files_of(ablation("bd-dir-"), "curve.csv"),
        **COHORT_INPUTS,
    output:
        png=report(f"{R}/figures/s2m.png", caption="../report/s2m.rst", category="Figures"),
        csv=f"{R}/figures/s2m.csv",
    params:
    log:
        f"{R}/logs/s2m.log",
    benchmark:
        f"{R}/benchmarks/s2m.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures s2m --run {input.runs:q} --curves {input.curves:q} --feature-index {input.index:q} "
        "--samples {input.samples:q} --clinical {input.clinical:q} --out {output.png:q} > {log:q} 2>&1"


rule heatmaps:
    input:
        checkpoint=checkpoint_of(HEATMAP_METHOD),
        **COHORT_INPUTS,
    output:
        report(
            directory(f"{R}/figures/heatmaps"),
            patterns=["{name}.png"],
            caption="../report/heatmaps.rst",
            category="Attention heatmaps",
        ),
    params:
        patients=FIGS["heatmap_patients"],
        fallback_mpp=COHORT["fallback_mpp"],
    log:
        f"{R}/logs/heatmaps.log",
    benchmark:
        f"{R}/benchmarks/heatmaps.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd figures heatmaps --run {input.checkpoint:q} --feature-index {input.index:q} "
        "--samples {input.samples:q} --clinical {input.clinical:q} --patients {params.patients} "
        "--fallback-mpp {params.fallback_mpp} --out-dir {output:q} > {log:q} 2>&1"


rule runtime_summary:
    """Per-rule runtime and memory of every job finished before this target's last outputs."""
    input:
        lambda wc: final_outputs(wc.target),
    output:
        csv=f"{R}/runtime/{{target}}.csv",
        html=report(f"{R}/runtime/{{target}}.html", caption="../report/runtime.rst", category="Runtime",
                    labels={"target": "{target}", "what": "table"}),
        png=report(f"{R}/runtime/{{target}}.png", caption="../report/runtime.rst", category="Runtime",
                   labels={"target": "{target}", "what": "figure"}),
        jobs=f"{R}/runtime/{{target}}.jobs.csv",
    params:
        benchmarks=f"{R}/benchmarks",
    wildcard_constraints:
        target="|".join(TARGETS),
    log:
        f"{R}/logs/runtime_summary/{{target}}.log",
    benchmark:
        f"{R}/benchmarks/runtime_summary/{{target}}.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "{{ bd runtime-summary --benchmarks {params.benchmarks:q} --out-csv {output.csv:q} "
        "--out-png {output.png:q} --jobs-csv {output.jobs:q} && "
        "bd report-table --table {output.csv:q} --out {output.html:q} --title 'Runtime per rule ({wildcards.target})'; }} "
        "> {log:q} 2>&1"

