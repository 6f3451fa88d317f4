"""Analyses over readouts: trajectories, evaluation, comparisons."""
