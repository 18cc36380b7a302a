"""What a user runs: `cli` (main.py), `probe`, `compare`, `compare_methods`, `curves`, `export`
and `invariance`, each `python -m pirl_jax.commands.<name>`; `program` is how each one runs
(flags, logging, one-line errors)."""
