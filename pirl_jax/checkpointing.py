"""Orbax checkpoints of the whole train state (the only module that imports orbax)."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings`: the restore target on this mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class Checkpointer:
  """Periodic async checkpoints of one pytree in `directory`, keeping the last `keep`.

  Orbax writes each step into a temporary folder and renames it when complete, so a save
  interrupted by a kill is never listed as a step.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, step: int, target):
    """Restores `step` into the shapes, dtypes and shardings of `target` (abstract or real)."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
