"""Experiment trackers (tensorboard, wandb); being written."""
