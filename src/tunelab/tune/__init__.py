"""Hyperparameter search over config keys: an Optuna study whose trials are training runs (`search.tune`)."""
