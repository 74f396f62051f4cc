"""Evaluation: missing-modality masks, metrics, evaluation of trained runs (workflow/rules/evaluate.smk)."""
