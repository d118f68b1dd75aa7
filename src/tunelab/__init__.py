"""tunelab: prepare data, fine-tune, evaluate against baselines, predict."""

__version__ = "0.1.0"
