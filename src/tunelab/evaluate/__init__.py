"""Evaluation: metrics, baselines and the before/after report."""
