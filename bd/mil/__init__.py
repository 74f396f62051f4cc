"""Multiple-instance learning: patient bags, BD and the baselines, losses, training (workflow/rules/train.smk)."""
