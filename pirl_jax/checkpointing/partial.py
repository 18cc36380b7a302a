"""Restoring parts of a checkpoint (a trunk for evaluation or fine-tuning), checked and verified."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.checkpointing import fingerprint
from pirl_jax.checkpointing import layout
from pirl_jax.checkpointing import verify


def _flatten(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def subtree(tree: dict, path: Sequence[str]):
  """`tree[path[0]][path[1]]...`, or None where a key is missing."""
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def check_subtrees(item_dir: str | storage.Path, targets: dict[tuple[str, ...], object]) -> None:
  """Checks that the checkpoint holds every array of `targets` with the same shape; reads no array.

  Args:
    item_dir: an item folder (see `layout.resolve_checkpoint`).
    targets: checkpoint path (e.g. ('params', 'trunk')) -> a pytree of arrays or
      ShapeDtypeStructs with the structure and shapes the model expects there.

  Raises:
    CheckpointMismatchError: a subtree is missing, or a parameter is missing, unexpected or has
      another shape; the message names the parameter path and both shapes.
  """
  _check_subtrees(storage.path(item_dir), targets)


def _check_subtrees(item_dir: storage.Path, targets: dict[tuple[str, ...], object]) -> dict:
  """`check_subtrees`; returns the checkpoint's `layout.array_metadata`."""
  available = layout.array_metadata(item_dir)
  problems = []
  for prefix, target in targets.items():
    saved = subtree(available, prefix)
    where = "/".join(prefix)
    if saved is None:
      depth = max(i for i in range(len(prefix)) if isinstance(subtree(available, prefix[:i]), dict))
      parent = subtree(available, prefix[:depth])
      level = "/".join(prefix[:depth]) or "its top level"
      problems.append(
          f"{where}: not in the checkpoint (entries at {level}: " f"{', '.join(sorted(parent))})"
      )
      continue
    want = {k: tuple(v.shape) for k, v in _flatten(target).items()}
    have = {k: tuple(v.shape) for k, v in _flatten(saved).items()}
    for path in sorted(set(want) | set(have)):
      name = "/".join(prefix + path)
      if path not in have:
        problems.append(
            f"{name}: the model has shape {want[path]}, the checkpoint has no " "such parameter"
        )
      elif path not in want:
        problems.append(f"{name}: in the checkpoint with shape {have[path]}, not in the model")
      elif have[path] != want[path]:
        problems.append(f"{name}: checkpoint shape {have[path]} != model shape " f"{want[path]}")
  if problems:
    raise verify.CheckpointMismatchError(
        f"The checkpoint {item_dir} does not match the model architecture "
        f"({len(problems)} problem(s)):{user_errors.listing(problems)}"
    )
  return available


def restore_subtrees(
    item_dir: str | storage.Path, targets: dict[tuple[str, ...], object], sharding=None
) -> dict[tuple[str, ...], object]:
  """Restores only some subtrees of a checkpoint, checking them against the model first.

  The restored arrays are verified against the fingerprints saved next to `item_dir` (an item
  folder without them restores with a warning).

  Args:
    item_dir: an item folder (see `layout.resolve_checkpoint`).
    targets: checkpoint path (e.g. ('params', 'trunk')) -> a pytree of arrays or
      ShapeDtypeStructs with the structure, shapes and dtypes the model expects there.
    sharding: None restores host NumPy arrays; a `jax.sharding.Sharding` restores jax Arrays
      placed with it (e.g. replicated on the current mesh), whatever the device count the
      checkpoint was written on.

  Returns:
    The same keys, each mapped to the restored pytree (dtypes cast to the target's).

  Raises:
    CheckpointMismatchError: see `check_subtrees`, which runs first.
    DamagedCheckpointError: the arrays cannot be read or differ from their saved fingerprints.
  """
  item_dir = storage.path(item_dir)
  available = _check_subtrees(item_dir, targets)
  expected = verify.read_fingerprints(item_dir.parent)
  item, restore_args = {}, {}
  for prefix, target in targets.items():
    # Restored in the saved dtypes (what the fingerprints are of), cast below.
    saved = subtree(available, prefix)

    def leaf_args(x):
      if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(x.shape), dtype=x.dtype)

    _set_path(item, prefix, saved)
    _set_path(restore_args, prefix, jax.tree.map(leaf_args, saved))
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        item_dir,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise verify.DamagedCheckpointError(
        f"Checkpoint {item_dir} is damaged: it cannot be read " f"({verify.describe_error(e)})."
    ) from e
  parts = {prefix: subtree(restored, prefix) for prefix in targets}
  verify.verify(
      item_dir.parent, {".".join(prefix): part for prefix, part in parts.items()}, expected
  )
  return {prefix: _cast_like(parts[prefix], target) for prefix, target in targets.items()}


def _cast_like(restored, target):
  """`restored` (nested dicts) with each array cast to the dtype of its match in `target`."""
  dtypes = {path: leaf.dtype for path, leaf in _flatten(target).items()}

  def cast(path, x):
    dtype = dtypes[tuple(fingerprint.key_name(k) for k in path)]
    return x if x.dtype == dtype else x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, restored)


def _set_path(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
