"""Training: recipes, data, the DP x CP trainer, checkpoints, telemetry and evaluation."""
