"""Training: one readable loop and its parts (batching, optimiser, checkpoints, tracking)."""
