"""Orbax checkpoints of the whole train state (the only module that imports orbax)."""

from __future__ import annotations

import pathlib
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings`: the restore target on this mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'opt_state.1.0.trace.f_out.bias' -> shape for each array (or array metadata) in `tree`."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


class Checkpointer:
  """Periodic async checkpoints of one pytree in `directory`, keeping the last `keep`.

  Orbax writes each step into '<step>.orbax-checkpoint-tmp-<time>' and renames it when every
  process has finished, so a save interrupted by a kill is never listed as a step; such leftover
  folders are deleted when the next run opens the directory. Every process must create the
  Checkpointer and call `save` and `restore` (they write and read their own shards).
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Every array's shape saved at `step`, by dotted path (`leaf_shapes`); reads no array."""
    return leaf_shapes(array_metadata(self.directory / str(step) / _ITEM))

  def restore(self, step: int, target, resize: Sequence[str] = ()):
    """Restores `step` into the shapes, dtypes and shardings of `target` (abstract or real).

    The checkpoint may come from another device or process count: every array is resharded to
    `target`'s sharding.

    Args:
      step: the step to restore.
      target: the pytree to restore into (its shapes, dtypes and shardings).
      resize: top-level fields (e.g. 'bank') whose leading dimension may differ from the saved
        one: the saved rows are trimmed from the end, or zero rows appended. Every other array
        must have its saved shape.

    Raises:
      CheckpointMismatchError: an array's saved shape differs from `target`'s (naming it).
    """
    if not resize:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    saved = self.saved_shapes(step)
    wanted = leaf_shapes(target)
    problems, resized = [], False
    for name in sorted(set(saved) & set(wanted)):
      have, want = saved[name], wanted[name]
      if have == want:
        continue
      if name.split(".")[0] in resize and have[1:] == want[1:]:
        resized = True
      else:
        problems.append(f"{name}: saved {have}, expected {want}")
    if problems:
      raise CheckpointMismatchError(
          f"Checkpoint step {step} in {self.directory} does not fit this run: "
          + "; ".join(problems))
    # strict=False lets orbax pad or trim; the check above confines that to the `resize` fields.
    return self._manager.restore(
        step, args=ocp.args.StandardRestore(target, strict=not resized))

  def reached_preemption(self, step: int) -> bool:
    """True at the step all processes agreed to stop at after one of them got a SIGTERM.

    Only with `jax.distributed` (JAX's preemption service catches SIGTERM); False otherwise.
    Every process must call it at every step.
    """
    if not jax.distributed.is_initialized():
      return False
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_arrays(item_dir: str | pathlib.Path) -> dict:
  """A whole checkpoint item as host NumPy arrays in nested dicts and lists (for inspection)."""
  metadata = ocp.PyTreeCheckpointer().metadata(pathlib.Path(item_dir))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(
      pathlib.Path(item_dir), args=ocp.args.PyTreeRestore(restore_args=args))


# --- Restoring parts of a checkpoint (evaluation) ------------------------------------------------

_ITEM = "default"  # the item folder CheckpointManager writes inside each step folder


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the model; the message names the parameter and shapes."""


def _is_item_dir(path: pathlib.Path) -> bool:
  return (path / "_METADATA").is_file()


def _complete_steps(directory: pathlib.Path) -> list[int]:
  # Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames on success, so only finished
  # steps have a purely numeric name.
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and _is_item_dir(p / _ITEM))


def resolve_checkpoint(path: str | pathlib.Path, step: int | None = None,
                       field: str = "init.checkpoint") -> tuple[pathlib.Path, int | None]:
  """Finds the Orbax item folder behind a user-given checkpoint path.

  Accepts a training workdir (holding `checkpoints/`), a CheckpointManager folder (numbered step
  folders), one step folder, or the item folder inside it.

  Args:
    path: the folder.
    step: the step to use; None picks the latest complete one. Ignored when `path` already names
      one step.
    field: the config field `path` came from, for error messages.

  Returns:
    (item folder, step or None when it cannot be told from the path).
  """
  root = pathlib.Path(path).expanduser().absolute()
  if not root.exists():
    raise FileNotFoundError(f"config.{field}={str(path)!r}: {root} does not exist.")
  if _is_item_dir(root):
    return root, int(root.parent.name) if root.parent.name.isdigit() else None
  if _is_item_dir(root / _ITEM):
    return root / _ITEM, int(root.name) if root.name.isdigit() else None
  manager_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
  steps = _complete_steps(manager_dir)
  if not steps:
    raise FileNotFoundError(
        f"config.{field}={str(path)!r}: no complete Orbax checkpoint in {manager_dir} (expected "
        "a workdir with checkpoints/<step>/, a checkpoints folder, or one step folder).")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"config.{field}={str(path)!r}: no step {step} in {manager_dir}; "
                            f"available steps: {', '.join(map(str, steps))}.")
  return manager_dir / str(step) / _ITEM, step


def array_metadata(item_dir: str | pathlib.Path) -> dict:
  """The checkpoint's tree with each array as a `jax.ShapeDtypeStruct`; no array is read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(pathlib.Path(item_dir))
  finally:
    handler.close()
  tree = getattr(metadata, "tree", metadata)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree)


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


def check_subtrees(item_dir: str | pathlib.Path, targets: dict[tuple[str, ...], object]) -> None:
  """Checks that the checkpoint holds every array of `targets` with the same shape; reads no array.

  Args:
    item_dir: an item folder (see `resolve_checkpoint`).
    targets: checkpoint path (e.g. ('params', 'trunk')) -> a pytree of arrays or
      ShapeDtypeStructs with the structure and shapes the model expects there.

  Raises:
    CheckpointMismatchError: a subtree is missing, or a parameter is missing, unexpected or has
      another shape; the message names the parameter path and both shapes.
  """
  item_dir = pathlib.Path(item_dir)
  available = array_metadata(item_dir)
  problems = []
  for prefix, target in targets.items():
    saved = subtree(available, prefix)
    where = "/".join(prefix)
    if saved is None:
      depth = max(i for i in range(len(prefix))
                  if isinstance(subtree(available, prefix[:i]), dict))
      parent = subtree(available, prefix[:depth])
      level = "/".join(prefix[:depth]) or "its top level"
      problems.append(f"{where}: not in the checkpoint (entries at {level}: "
                      f"{', '.join(sorted(parent))})")
      continue
    want = {k: tuple(v.shape) for k, v in _flatten(target).items()}
    have = {k: tuple(v.shape) for k, v in _flatten(saved).items()}
    for path in sorted(set(want) | set(have)):
      name = "/".join(prefix + path)
      if path not in have:
        problems.append(f"{name}: the model has shape {want[path]}, the checkpoint has no "
                        "such parameter")
      elif path not in want:
        problems.append(f"{name}: in the checkpoint with shape {have[path]}, not in the model")
      elif have[path] != want[path]:
        problems.append(f"{name}: checkpoint shape {have[path]} != model shape "
                        f"{want[path]}")
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise CheckpointMismatchError(
        f"The checkpoint {item_dir} does not match the model architecture "
        f"({len(problems)} problem(s)):\n  {shown}{more}")


def restore_subtrees(item_dir: str | pathlib.Path, targets: dict[tuple[str, ...], object],
                     sharding=None) -> dict[tuple[str, ...], object]:
  """Restores only some subtrees of a checkpoint, checking them against the model first.

  Args:
    item_dir: an item folder (see `resolve_checkpoint`).
    targets: checkpoint path (e.g. ('params', 'trunk')) -> a pytree of arrays or
      ShapeDtypeStructs with the structure, shapes and dtypes the model expects there.
    sharding: None restores host NumPy arrays; a `jax.sharding.Sharding` restores jax Arrays
      placed with it (e.g. replicated on the current mesh), whatever the device count the
      checkpoint was written on.

  Returns:
    The same keys, each mapped to the restored pytree (dtypes cast to the target's).

  Raises:
    CheckpointMismatchError: see `check_subtrees`, which runs first.
  """
  item_dir = pathlib.Path(item_dir)
  check_subtrees(item_dir, targets)
  item, restore_args = {}, {}
  for prefix, target in targets.items():
    def leaf_args(x):
      if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(x.shape), dtype=x.dtype)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    _set_path(item, prefix, abstract)
    _set_path(restore_args, prefix, jax.tree.map(leaf_args, target))
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                            partial_restore=True))
  return {prefix: subtree(restored, prefix) for prefix in targets}


def _set_path(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
