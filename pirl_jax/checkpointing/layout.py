"""Checkpoints on disk: the step and item folders, and finding the one a user names."""

from __future__ import annotations

import json

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from pirl_jax import storage
from pirl_jax import user_errors

ITEM = "default"  # the state's item folder inside each step folder
FINGERPRINTS = "fingerprints"  # the fingerprints' item folder next to it
LOG_WINDOW = (
    "log_window"  # the loop's metric sums since its last log, when a step saves between logs
)
DAMAGED_SUFFIX = ".damaged"  # '<step>.damaged': a damaged step moved aside (not a step name)
COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a finished step folder on object storage
# Written into the state item's own metadata, so that a step whose checksums and step metadata
# are both gone is still known to have had checksums (and is refused, not restored unverified).
ITEM_MARK = {"pirl_jax": {"fingerprints": FINGERPRINTS}}


def item_is_marked(step_dir: storage.Path) -> bool:
  """Whether the state item of `step_dir` says it was saved with fingerprints."""
  try:
    custom = json.loads((step_dir / ITEM / "_METADATA").read_text()).get("custom_metadata")
  except (OSError, ValueError, AttributeError):
    return False
  return isinstance(custom, dict) and custom.get("pirl_jax") == ITEM_MARK["pirl_jax"]


def load_arrays(item_dir: str | storage.Path) -> dict:
  """A whole checkpoint item as host NumPy arrays in nested dicts and lists (for inspection).

  Not verified against the saved fingerprints: it shows what is on disk.
  """
  metadata = ocp.PyTreeCheckpointer().metadata(storage.path(item_dir))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(
      storage.path(item_dir), args=ocp.args.PyTreeRestore(restore_args=args)
  )


def is_item_dir(path: storage.Path) -> bool:
  return (path / "_METADATA").is_file()


def is_finished(step_dir: storage.Path) -> bool:
  # Locally Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames on success, so only
  # finished steps have a purely numeric name. Object storage has no rename: Orbax writes the
  # step folder in place and marks it finished with a commit file last.
  return step_dir.name.isdigit() and (
      not storage.is_url(step_dir) or (step_dir / COMMIT_FILE).is_file()
  )


def complete_steps(directory: storage.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(
      int(p.name) for p in directory.iterdir() if is_finished(p) and is_item_dir(p / ITEM)
  )


def unreadable_steps(directory: storage.Path) -> list[int]:
  """Finished step folders without a readable item (see `complete_steps`)."""
  if not directory.is_dir():
    return []
  return sorted(
      int(p.name)
      for p in directory.iterdir()
      if is_finished(p) and p.is_dir() and not is_item_dir(p / ITEM)
  )


class CheckpointNotFoundError(user_errors.UserError, FileNotFoundError):
  """A user-given checkpoint path that holds no (such) checkpoint; the message names the field."""


def _given(field: str, path) -> str:
  """How the user wrote it: `config.init.checkpoint='x'` for a config field (dotted), else as
  named (`--checkpoint='x'` for a command's flag, `checkpoint='x'` for a function's argument)."""
  return f"{'config.' + field if '.' in field else field}={str(path)!r}"


def resolve_checkpoint(
    path: str | storage.Path, step: int | None = None, field: str = "init.checkpoint"
) -> tuple[storage.Path, int | None]:
  """Finds the Orbax item folder behind a user-given checkpoint path.

  Accepts a training workdir (holding `checkpoints/`), a CheckpointManager folder (numbered step
  folders), one step folder, or the item folder inside it.

  Args:
    path: the folder.
    step: the step to use; None picks the latest complete one (with a warning when newer step
      folders have no readable item). Ignored when `path` already names one step.
    field: the config field `path` came from, for error messages.

  Returns:
    (item folder, step or None when it cannot be told from the path).
  """
  root = storage.path(path)
  if not root.exists():
    raise CheckpointNotFoundError(f"{_given(field, path)}: {root} does not exist.")
  if is_item_dir(root):
    return root, int(root.parent.name) if root.parent.name.isdigit() else None
  if is_item_dir(root / ITEM):
    return root / ITEM, int(root.name) if root.name.isdigit() else None
  manager_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
  steps = complete_steps(manager_dir)
  unreadable = unreadable_steps(manager_dir)
  if not steps:
    damaged = (
        (
            f" (step folder(s) {', '.join(map(str, unreadable))} have no readable "
            f"{ITEM}/_METADATA: damaged)"
        )
        if unreadable
        else ""
    )
    raise CheckpointNotFoundError(
        f"{_given(field, path)}: no complete Orbax checkpoint in {manager_dir}{damaged} "
        "(expected a workdir with checkpoints/<step>/, a checkpoints folder, or one step folder)."
    )
  if step is None:
    step = steps[-1]
    newer = [s for s in unreadable if s > step]
    if newer:
      logging.warning(
          "Using checkpoint step %d in %s: the newer step folder(s) %s have no "
          "readable %s/_METADATA (damaged).",
          step,
          manager_dir,
          ", ".join(map(str, newer)),
          ITEM,
      )
  elif step not in steps:
    raise CheckpointNotFoundError(
        f"{_given(field, path)}: no step {step} in {manager_dir}; "
        f"available steps: {', '.join(map(str, steps))}."
    )
  return manager_dir / str(step) / ITEM, step


def array_metadata(item_dir: str | storage.Path) -> dict:
  """The checkpoint's tree with each array as a `jax.ShapeDtypeStruct`; no array is read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(storage.path(item_dir))
  finally:
    handler.close()
  tree = getattr(metadata, "tree", metadata)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree)
