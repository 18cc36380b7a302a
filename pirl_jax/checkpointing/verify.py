"""What a restore checks: the errors it raises, the saved fingerprints read back and compared,
and every process agreeing on the outcome."""

from __future__ import annotations

import json

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.checkpointing import fingerprint
from pirl_jax.checkpointing import layout

_SHOWN = 5  # differing arrays named in an error message


class CheckpointMismatchError(user_errors.UserError, ValueError):
  """A checkpoint's arrays do not fit the model; the message names the parameter and shapes."""


class DamagedCheckpointError(user_errors.UserError):
  """A checkpoint cannot be read, or what it holds differs from the fingerprints saved with it.

  The message names the step folder and what is wrong (the first arrays that differ, or the
  error reading it).
  """


def describe_error(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec=")[0]  # the spec that follows is long and says little
  text = text if len(text) <= 600 else text[:600] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def saved_item_names(step_dir: storage.Path) -> set[str]:
  """The items a step's Orbax metadata says were saved; empty when that cannot be read."""
  try:
    handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    return set(handlers) if isinstance(handlers, dict) else set()
  except (OSError, ValueError, KeyError, TypeError):
    return set()


def read_fingerprints(step_dir: storage.Path) -> dict[str, int] | None:
  """The fingerprints saved in `step_dir`, or None for a checkpoint saved without them.

  Raises:
    DamagedCheckpointError: they were saved but are missing or cannot be read.
  """
  folder = step_dir / layout.FINGERPRINTS
  if not folder.is_dir():
    if layout.FINGERPRINTS in saved_item_names(step_dir) or layout.item_is_marked(step_dir):
      raise DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: its checksums ({layout.FINGERPRINTS}/) are missing."
      )
    return None
  try:
    arrays = ocp.JsonCheckpointHandler().restore(folder)["arrays"]
    if not (
        isinstance(arrays, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in arrays.values())
    ):
      raise ValueError("'arrays' is not a mapping of array names to integers")
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DamagedCheckpointError(
        f"Checkpoint {step_dir} is damaged: its checksums "
        f"({layout.FINGERPRINTS}/) cannot be read "
        f"({describe_error(e)})."
    ) from e
  return arrays


def verify(
    step_dir: storage.Path,
    restored,
    expected: dict[str, int] | None,
    trimmed: dict[str, tuple[int, int]] | None = None,
) -> None:
  """Compares the fingerprints of `restored` (named as saved) with `expected`.

  Args:
    step_dir: the step folder, for messages.
    restored: the restored arrays.
    expected: the saved fingerprints; None for a checkpoint saved without them (a warning).
    trimmed: name -> (saved, restored) leading dimension of arrays restored with rows trimmed.

  Raises:
    DamagedCheckpointError: naming the first arrays that differ.
  """
  if expected is None:
    logging.warning(
        "Checkpoint %s has no checksums (it was saved before checkpoints had them): "
        "restored without verification.",
        step_dir,
    )
    return
  trimmed = trimmed or {}
  problems = []
  for name, value in fingerprint.fingerprints(restored).items():
    if name not in expected:
      problems.append(f"{name} (no checksum saved for it)")
    elif expected[name] != value:
      note = ""
      if name in trimmed:
        note = (
            f"; restored with {trimmed[name][1]} of its {trimmed[name][0]} rows, so non-zero "
            "trimmed rows would also cause this"
        )
      problems.append(f"{name} (checksum {value:#010x}, saved {expected[name]:#010x}{note})")
  if problems:
    more = f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise DamagedCheckpointError(
        f"Checkpoint {step_dir} is damaged: {len(problems)} array(s) differ from the checksums "
        f"saved with it: {', '.join(problems[:_SHOWN])}{more}."
    )


def agree(step_dir: storage.Path, error: Exception | None) -> None:
  """Raises on every process if reading `step_dir` failed on any of them.

  Each process reads its own shards, so one may fail where the others did not; they must agree
  before the (collective) verification, and on whether to fall back.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    status = 0 if error is None else 1 if isinstance(error, DamagedCheckpointError) else 2
    statuses = np.asarray(multihost_utils.process_allgather(np.asarray(status, np.int32))).reshape(
        -1
    )
    failed = ", ".join(map(str, np.flatnonzero(statuses)))
    if error is None and statuses.max() == 2:
      raise RuntimeError(f"Restoring {step_dir} failed on process(es) {failed}; see their logs.")
    if error is None and statuses.max() == 1:
      raise DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: process(es) {failed} "
          "could not read it; see their logs."
      )
  if error is not None:
    raise error
