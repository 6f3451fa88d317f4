"""Training a tuned lens: config, loop, objective, closed-form start, optimisers, checkpoints."""
