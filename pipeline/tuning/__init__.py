"""Hyperparameter tuning: an Optuna study whose trials are DVC experiments of the train stage (torch-free)."""
