"""The checkpoint manager of a run: save, restore verified, fall back past damaged steps."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import sys

from absl import logging
import jax
import orbax.checkpoint as ocp

from pirl_jax import storage
from pirl_jax.checkpointing import fingerprint
from pirl_jax.checkpointing import layout
from pirl_jax.checkpointing import verify


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings`: the restore target on this mesh."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


def _is_closed_event_loop_error(exc_type, exc) -> bool:
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _quiet_callbacks_into_a_closed_event_loop() -> None:
  """When a damaged checkpoint's read fails, TensorStore's other pending reads still complete and
  call back into Orbax's asyncio loop, which has closed by then; each callback's RuntimeError is
  printed through sys.excepthook or sys.unraisablehook (hundreds of tracebacks, nothing lost: the
  read has already failed and is reported in one line). Those, and only those, are dropped."""
  previous, previous_unraisable = sys.excepthook, sys.unraisablehook
  if getattr(previous, "_drops_closed_event_loop_errors", False):
    return

  def hook(exc_type, exc, tb):
    if not _is_closed_event_loop_error(exc_type, exc):
      previous(exc_type, exc, tb)

  def unraisable_hook(unraisable):
    if not _is_closed_event_loop_error(unraisable.exc_type, unraisable.exc_value):
      previous_unraisable(unraisable)

  hook._drops_closed_event_loop_errors = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = hook, unraisable_hook


class DamagedStep(NamedTuple):
  """A step `Checkpointer.restore_latest` skipped: why, and where it is kept now."""

  step: int
  reason: str
  kept_as: storage.Path | None


def _free_name(path: storage.Path) -> storage.Path:
  candidate, n = path, 1
  while candidate.exists():
    candidate = path.with_name(f"{path.name}.{n}")
    n += 1
  return candidate


# --- Checkpointer ---------------------------------------------------------------------------------


class Checkpointer:
  """Periodic async checkpoints of one pytree in `directory`, keeping the last `keep`.

  Orbax writes each step into '<step>.orbax-checkpoint-tmp-<time>' and renames it when every
  process has finished, so a save interrupted by a kill is never listed as a step; such leftover
  folders are deleted when the next run opens the directory. Every step holds the state and its
  fingerprints (module docstring); restores verify them. Every process must create the
  Checkpointer and call `save` and `restore` (they write and read their own shards).
  """

  def __init__(self, directory: str | storage.Path, keep: int = 3, async_save: bool = True):
    self.directory = storage.path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    # Items named up front: left to guess, Orbax takes a step folder holding 'default' for a
    # single-item checkpoint and then refuses two-item saves.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_names=(layout.ITEM, layout.FINGERPRINTS, layout.LOG_WINDOW),
        item_handlers={
            layout.ITEM: ocp.StandardCheckpointHandler(),
            layout.FINGERPRINTS: ocp.JsonCheckpointHandler(),
            layout.LOG_WINDOW: ocp.JsonCheckpointHandler(),
        },
    )
    self._damaged: list[DamagedStep] = []

  def latest_step(self) -> int | None:
    """The latest complete step (not necessarily intact: see `restore_latest`)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  @property
  def damaged_steps(self) -> list[DamagedStep]:
    """The steps the last `restore_latest` found damaged and skipped, newest first."""
    return list(self._damaged)

  def save(self, step: int, state, force: bool = False, log_window: dict | None = None) -> bool:
    """Saves `state` and its fingerprints as `step` (in the background with async_save).

    `log_window` (JSON) is saved next to them when given: what the loop had summed since its last
    log, so that a resumed run logs the same means as an uninterrupted one.
    """
    record = {"algorithm": fingerprint.ALGORITHM, "arrays": fingerprint.fingerprints(state)}
    items = {
        layout.ITEM: ocp.args.StandardSave(state, custom_metadata=layout.ITEM_MARK),
        layout.FINGERPRINTS: ocp.args.JsonSave(record),
    }
    if log_window is not None:
      items[layout.LOG_WINDOW] = ocp.args.JsonSave(log_window)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def log_window(self, step: int) -> dict | None:
    """The `log_window` saved with `step`, or None (none saved, or unreadable: a warning)."""
    folder = self.directory / str(step) / layout.LOG_WINDOW
    if not folder.is_dir():
      return None
    try:
      record = ocp.JsonCheckpointHandler().restore(folder)
      if not isinstance(record, dict):
        raise ValueError("not a JSON object")
      return record
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.warning(
          "The metric sums saved with checkpoint step %d cannot be read (%s): the "
          "first log after resuming averages only the steps after it.",
          step,
          verify.describe_error(e),
      )
      return None

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Every array's shape saved at `step`, by dotted path (`leaf_shapes`); reads no array."""
    return fingerprint.leaf_shapes(layout.array_metadata(self.directory / str(step) / layout.ITEM))

  def restore(
      self,
      step: int,
      target,
      resize: Sequence[str] = (),
      derive: Mapping[str, Callable[[dict], Any]] | None = None,
  ):
    """Restores `step` into the shapes, dtypes and shardings of `target` (abstract or real).

    The checkpoint may come from another device or process count: every array is resharded to
    `target`'s sharding. The restored arrays are verified against the fingerprints saved with
    them (a checkpoint saved without them restores with a warning).

    Args:
      step: the step to restore.
      target: the pytree to restore into (its shapes, dtypes and shardings).
      resize: top-level fields (e.g. 'bank') whose leading dimension may differ from the saved
        one: the saved rows are trimmed from the end, or zero rows appended. Every other array
        must have its saved shape.
      derive: top-level fields of a dataclass `target` that a checkpoint written by an earlier
        version may lack, each with a function computing it from the restored fields (a dict
        by field name); the result takes `target`'s sharding as the other fields' do.

    Raises:
      CheckpointMismatchError: an array's saved shape differs from `target`'s, or `target` has
        arrays the checkpoint lacks or the reverse (naming them).
      DamagedCheckpointError: the checkpoint cannot be read or fails verification (naming the
        step folder and the first arrays that differ).
      FileNotFoundError: there is no step folder `step`.
    """
    return self._restore(step, target, resize, derive=derive)

  def _restore(
      self,
      step: int,
      target,
      resize: Sequence[str],
      check: Callable[[int, dict[str, tuple[int, ...]]], None] | None = None,
      derive: Mapping[str, Callable[[dict], Any]] | None = None,
  ):
    step_dir = self.directory / str(step)
    error, restored, expected, trimmed, missing = None, None, None, None, ()
    try:
      restored, expected, trimmed, missing = self._read(step, target, resize, check, derive)
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
    verify.agree(step_dir, error)
    verify.verify(step_dir, restored, expected, trimmed)
    if missing:
      fields = dict(restored)
      for name in missing:
        logging.info(
            "Checkpoint %s was written before the state had %s: derived from the " "other fields.",
            step_dir,
            name,
        )
        fields[name] = derive[name](fields)
      restored = type(target)(**fields)
    return jax.tree.map(
        lambda r, t: r if r.dtype == t.dtype else r.astype(t.dtype), restored, target
    )

  def _read(self, step: int, target, resize: Sequence[str], check, derive=None):
    """Restores `step` unverified, in the saved dtypes.

    Returns:
      (arrays, fingerprints, trimmed, missing): with `missing` fields (of `derive`) absent from
      the checkpoint, `arrays` is a dict of the other fields.
    """
    step_dir = self.directory / str(step)
    if not step_dir.is_dir():
      raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}.")
    try:
      saved = dict(fingerprint.named_leaves(layout.array_metadata(step_dir / layout.ITEM)))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise verify.DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: it cannot be read " f"({verify.describe_error(e)})."
      ) from e
    wanted = dict(fingerprint.named_leaves(target))
    saved_fields = {name.split(".")[0] for name in saved}
    missing = tuple(field for field in (derive or {}) if field not in saved_fields)
    problems, trimmed, resized = [], {}, False
    for name in sorted(set(saved) | set(wanted)):
      if name not in saved:
        if name.split(".")[0] not in missing:
          problems.append(f"{name}: not in the checkpoint")
        continue
      if name not in wanted:
        problems.append(f"{name}: in the checkpoint, not in this run's state")
        continue
      have, want = tuple(saved[name].shape), tuple(wanted[name].shape)
      if have == want:
        continue
      if name.split(".")[0] in resize and have[1:] == want[1:]:
        resized = True
        if have[0] > want[0]:
          trimmed[name] = (have[0], want[0])
      else:
        problems.append(f"{name}: saved {have}, expected {want}")
    if problems:
      raise verify.CheckpointMismatchError(
          f"Checkpoint step {step} in {self.directory} does not fit this run: "
          + "; ".join(problems)
      )
    if check is not None:
      check(step, {name: tuple(m.shape) for name, m in saved.items()})
    expected = verify.read_fingerprints(step_dir)

    def as_saved(path, x):
      # Restored in the saved dtype, verified, then cast: a fingerprint is of the saved bits.
      if fingerprint.path_name(path) not in saved:  # a field to derive: dropped below
        return x
      dtype = saved[fingerprint.path_name(path)].dtype
      if x.dtype == dtype:
        return x
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))

    item = jax.tree_util.tree_map_with_path(as_saved, target)
    if missing:
      item = {
          f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name not in missing
      }
    try:
      # strict=False lets orbax pad or trim; the check above confines that to the `resize` fields.
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              **{layout.ITEM: ocp.args.StandardRestore(item, strict=not resized)}
          ),
      )[layout.ITEM]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise verify.DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: it cannot be read " f"({verify.describe_error(e)})."
      ) from e
    return restored, expected, trimmed, missing

  def restore_latest(
      self,
      target,
      resize: Sequence[str] = (),
      check: Callable[[int, dict[str, tuple[int, ...]]], None] | None = None,
      derive: Mapping[str, Callable[[dict], Any]] | None = None,
  ):
    """Restores the newest step that reads and verifies, falling back past damaged ones.

    A damaged step (unreadable metadata or array files, or arrays that differ from their saved
    fingerprints) is logged as a warning naming its folder and what is wrong, and the step
    before it is tried. Once one restores, the damaged newer steps are renamed to
    '<step>.damaged' (kept for inspection, no longer steps): saves of the steps after the
    restored one then proceed, and `keep` counts intact checkpoints only. Nothing is renamed
    when no step restores (that may come from this run, not the checkpoints).

    Args:
      target: as for `restore`.
      resize, derive: as for `restore`.
      check: called with (step, saved shape of every array by dotted path) before a step is
        restored; an error it raises is not damage: it propagates (e.g. a
        CheckpointMismatchError for a checkpoint of another dataset).

    Returns:
      (state, step), or (None, None) when the directory holds no checkpoint. `damaged_steps`
      lists the steps skipped.

    Raises:
      DamagedCheckpointError: every checkpoint in the directory is damaged (listing them).
      CheckpointMismatchError: see `restore`.
    """
    _quiet_callbacks_into_a_closed_event_loop()
    self._damaged = []
    failures: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self._restore(step, target, resize, check, derive)
      except verify.DamagedCheckpointError as e:
        logging.warning("%s Trying the step before it.", e)
        failures.append((step, str(e)))
        continue
      self._move_aside(failures)
      return state, step
    if failures:
      listed = "\n  ".join(f"step {step}: {reason}" for step, reason in failures)
      raise verify.DamagedCheckpointError(
          f"No checkpoint in {self.directory} can be restored:\n  {listed}\nThey are left as "
          "they are. Restore them from a copy, or move them out of the directory to start over."
      )
    return None, None

  def _move_aside(self, failures: list[tuple[int, str]]) -> None:
    """Renames the damaged `failures` to '<step>.damaged' (process 0) and rereads the steps."""
    if not failures:
      return
    self._manager.wait_until_finished()
    moves = [
        (
            step,
            reason,
            self.directory / str(step),
            _free_name(self.directory / f"{step}{layout.DAMAGED_SUFFIX}"),
        )
        for step, reason in failures
    ]
    if jax.process_count() > 1:  # every process has its names before any folder moves
      ocp.multihost.sync_global_processes("pirl_jax_checkpointing_move_aside_names")
    for step, reason, source, kept in moves:
      if jax.process_index() == 0:
        source.rename(kept)
        logging.warning("Kept damaged checkpoint step %d as %s.", step, kept)
      self._damaged.append(DamagedStep(step, reason, kept))
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("pirl_jax_checkpointing_move_aside")
    self._manager.reload()

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
