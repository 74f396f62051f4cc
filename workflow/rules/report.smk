# The paper's tables and figures from all evaluations, and the report's runtime summary.


def metrics_files(names):
    return [f"{R}/evaluate/{e}/seed{s}/metrics.csv" for e, s in runs(names)]


rule table1:
    input:
        metrics_files(target_experiments(config, "all")),
    output:
        csv=report(f"{R}/tables/table1.csv", caption="../report/table1.rst", category="Tables"),
        md=f"{R}/tables/table1.md",
    params:
        rates=json.dumps(config["evaluation"]["missing_rates"]),
    log:
        f"{R}/logs/table1.log",
    benchmark:
        f"{R}/benchmarks/table1.tsv"
    shell:
        "bd aggregate table1 --metrics {input:q} --rates {params.rates:q} "
        "--out $(dirname {output.csv:q}) > {log:q} 2>&1"


rule fig1:
    input:
        metrics_files(["image_only", "filling", "bd"]),
    output:
        report(f"{R}/figures/fig1.png", caption="../report/fig1.rst", category="Figures"),
    log:
        f"{R}/logs/fig1.log",
    benchmark:
        f"{R}/benchmarks/fig1.tsv"
    shell:
        "bd figures fig1 --metrics {input:q} --out {output:q} > {log:q} 2>&1"


TARGET_OUTPUTS = {
    "all": lambda: [f"{R}/tables/table1.csv", f"{R}/figures/fig1.png"],
}
