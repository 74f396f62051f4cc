# bd: bidirectional distillation for lymph-node metastasis prediction from WSIs + clinical data.
# Usage: snakemake --profile profiles/default            (demo cohort, local)
#        snakemake --profile slurm --configfile config/bcnb.yaml   (cluster, real cohort)
# Targets: all (default: Table I, Fig. 1), ablations, wsi_missing, analysis; external (a trained run
# on another cohort, config section external).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/slides.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/clinical.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/clinical_report.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/external.smk"


# Targets take their files from a function: only the targets asked for are expanded (each lists
# every lost per-slide output, see target_files in common.smk).


rule all:
    input:
        lambda w: target_files("all"),
    default_target: True


rule ablations:
    input:
        lambda w: target_files("ablations"),


rule wsi_missing:
    input:
        lambda w: target_files("wsi_missing"),


rule analysis:
    input:
        lambda w: target_files("analysis"),


drop_benchmarks_of_cached_rules()  # only in --cache runs (see common.smk)
