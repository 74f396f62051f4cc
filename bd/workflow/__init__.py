"""Workflow support: pre-run checks and QC tables (workflow/rules/common.smk, qc.smk)."""
