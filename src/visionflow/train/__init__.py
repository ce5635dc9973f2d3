"""Training: the one loop (engine), checkpoints, budgets, and the classification recipe."""
