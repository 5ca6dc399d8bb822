"""Engine: models, log-probs, optimisation, distribution, checkpoints, metrics."""
