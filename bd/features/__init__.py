"""Features: patch encoders and their per-slide Zarr feature stores (workflow/rules/features.smk)."""
