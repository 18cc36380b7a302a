"""Orbax checkpoints of the whole train state (the only package that imports orbax).

Every step folder holds two Orbax items, written into one temporary folder and renamed together
once every process has finished, so neither exists without the other:
  default/       the state (`StandardSave`: OCDBT/TensorStore files);
  fingerprints/  JSON: one 32-bit fingerprint per array, by dotted path (`fingerprint`);
  log_window/    JSON, only for a step saved between two logs: the loop's metric sums since the
                 last log (not training state: unverified, and a resume without it still works).
Restores recompute the fingerprints of the arrays they read and compare them with the saved ones
(`verify`: `DamagedCheckpointError` on a difference), and `Checkpointer.restore_latest`
(`manager`) falls back past damaged steps to the newest one that restores and verifies. `layout`
finds the checkpoint a user names; `partial` restores parts of one (a trunk).

The names below are the package's interface; the modules hold one concept each.
"""

from pirl_jax.checkpointing.fingerprint import fingerprints
from pirl_jax.checkpointing.fingerprint import leaf_shapes
from pirl_jax.checkpointing.layout import array_metadata
from pirl_jax.checkpointing.layout import load_arrays
from pirl_jax.checkpointing.layout import resolve_checkpoint
from pirl_jax.checkpointing.manager import abstract_like
from pirl_jax.checkpointing.manager import Checkpointer
from pirl_jax.checkpointing.manager import DamagedStep
from pirl_jax.checkpointing.partial import check_subtrees
from pirl_jax.checkpointing.partial import restore_subtrees
from pirl_jax.checkpointing.partial import subtree
from pirl_jax.checkpointing.verify import CheckpointMismatchError
from pirl_jax.checkpointing.verify import DamagedCheckpointError

__all__ = [
    "array_metadata",
    "abstract_like",
    "Checkpointer",
    "check_subtrees",
    "CheckpointMismatchError",
    "DamagedCheckpointError",
    "DamagedStep",
    "fingerprints",
    "leaf_shapes",
    "load_arrays",
    "resolve_checkpoint",
    "restore_subtrees",
    "subtree",
]
