"""Slides: reading any slide format, tissue segmentation, patch grids (rules in workflow/rules/slides.smk)."""
