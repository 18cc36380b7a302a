"""Analyses of trained representations (python -m pirl_jax.analysis.<name>)."""
