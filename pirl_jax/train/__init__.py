"""Pretraining: train state, step, loop."""
