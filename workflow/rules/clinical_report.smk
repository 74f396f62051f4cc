# The clinical report over the main runs (target `all`): operating-point and subgroup-AUC tables,
# reliability diagrams and decision curves, from each run's evaluation (bd/evaluation/clinical_report.py).


MAIN_RUNS = target_experiments(config, "all")
CLINICAL_REPORT_OUTPUTS = [
    f"{R}/tables/operating_point.csv", f"{R}/tables/operating_point.md", f"{R}/tables/operating_point.html",
    f"{R}/tables/subgroup_auc.csv", f"{R}/tables/subgroup_auc.md", f"{R}/tables/subgroup_auc.html",
    f"{R}/figures/calibration.png", f"{R}/figures/decision_curve.png",
]


rule clinical_tables:
    input:
        operating_points=run_files(MAIN_RUNS, "operating_point.csv"),
        subgroups=run_files(MAIN_RUNS, "subgroups.csv"),
    output:
        operating=f"{R}/tables/operating_point.csv",
        operating_md=f"{R}/tables/operating_point.md",
        operating_html=report(f"{R}/tables/operating_point.html", caption="../report/operating_point.rst", category="Clinical report"),
        subgroups=f"{R}/tables/subgroup_auc.csv",
        subgroups_md=f"{R}/tables/subgroup_auc.md",
        subgroups_html=report(f"{R}/tables/subgroup_auc.html", caption="../report/subgroup_auc.rst", category="Clinical report"),
    log:
        f"{R}/logs/clinical_tables.log",
    benchmark:
        f"{R}/benchmarks/clinical_tables.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "{{ bd clinical-report tables --operating-points {input.operating_points:q} --subgroups {input.subgroups:q} "
        "--out-dir \"$(dirname {output.operating:q})\" && "
        "bd report-table --table {output.operating_md:q} --out {output.operating_html:q} --title 'Operating point' && "
        "bd report-table --table {output.subgroups_md:q} --out {output.subgroups_html:q} --title 'AUC by subgroup'; }} "
        "> {log:q} 2>&1"


rule clinical_figures:
    input:
        calibration=run_files(MAIN_RUNS, "calibration.csv"),
        decision_curves=run_files(MAIN_RUNS, "decision_curve.csv"),
    output:
        calibration=report(f"{R}/figures/calibration.png", caption="../report/calibration.rst", category="Clinical report"),
        decision=report(f"{R}/figures/decision_curve.png", caption="../report/decision_curve.rst", category="Clinical report"),
    params:
        methods=MAIN_RUNS,
    log:
        f"{R}/logs/clinical_figures.log",
    benchmark:
        f"{R}/benchmarks/clinical_figures.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd clinical-report figures --calibration {input.calibration:q} --decision-curves {input.decision_curves:q} "
        "--methods {params.methods} --calibration-out {output.calibration:q} --decision-out {output.decision:q} "
        "> {log:q} 2>&1"
