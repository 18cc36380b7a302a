"""The training machinery both tasks share: the train state (`state`), PIRL's step (`step`) and
the one training loop (`loop`)."""
