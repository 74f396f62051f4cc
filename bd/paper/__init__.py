"""Paper: the experiments, the paper's tables and figures (workflow/rules/report.smk)."""
