"""Cohort: the sample sheet, patient splits and the clinical table (workflow/rules/clinical.smk)."""
