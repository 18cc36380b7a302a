"""Orbax checkpoints of the whole train state (the only module that imports orbax).

Every step folder holds two Orbax items, written into one temporary folder and renamed together
once every process has finished, so neither exists without the other:
  default/       the state (`StandardSave`: OCDBT/TensorStore files);
  fingerprints/  JSON: one 32-bit fingerprint per array, by dotted path (`fingerprints`).
Restores recompute the fingerprints of the arrays they read and compare them with the saved ones
(`DamagedCheckpointError` on a difference), and `Checkpointer.restore_latest` falls back past
damaged steps to the newest one that restores and verifies.

The fingerprint of an array is the sum over its elements, in wrapping uint32 arithmetic, of
M(b_i ^ k_i) - M(k_i): b_i is element i's bit pattern as uint32 (8- and 16-bit types widened,
64-bit ones split into two words), i its row-major flat index, k_i = M(i + 0x9E3779B9) and M the
32-bit finaliser of MurmurHash3 (a bijection). Why this one:
  * It is a sharded reduction computed where the array lives: only one uint32 per array reaches
    the host, so nothing is gathered, on one host or many.
  * Integer addition is exact and order-free, so the value does not depend on the sharding, the
    device or process count, or the order XLA reduces in.
  * M is a bijection, so changing any one element (a single flipped bit included) changes its
    term and the sum. Mixing in the index keeps changes spread over many elements from cancelling
    systematically, as they do in a plain weighted sum of b_i (64 aligned elements of 1.0 add 0
    to sum b_i * (2i + 1) * c mod 2**32): other damage goes unseen with probability about 2**-32.
  * A zero element adds nothing and a term depends only on the flat index, so an array with zero
    rows appended (the memory bank padded for another device count) has the fingerprint of its
    real rows, and a checkpoint verifies on any device count.
It complements the CRC32C that OCDBT keeps per file: that one catches damage on disk; the
fingerprint, taken on the devices before the save, also catches damage on the way there (host
memory, a faulty copy) and files of another checkpoint swapped in. It is not cryptographic.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pirl_jax import storage
from pirl_jax import user_errors

_ITEM = "default"  # the state's item folder inside each step folder
_FINGERPRINTS = "fingerprints"  # the fingerprints' item folder next to it
_DAMAGED_SUFFIX = ".damaged"  # '<step>.damaged': a damaged step moved aside (not a step name)
_COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a finished step folder on object storage
_KEY_OFFSET = 0x9E3779B9  # so that index 0 has a key other than 0
_ALGORITHM = "sum M(b_i ^ k_i) - M(k_i) mod 2**32, M = murmur3 fmix32, k_i = M(i + 0x9E3779B9)"
_SHOWN = 5  # differing arrays named in an error message


class CheckpointMismatchError(user_errors.UserError, ValueError):
  """A checkpoint's arrays do not fit the model; the message names the parameter and shapes."""


class DamagedCheckpointError(user_errors.UserError):
  """A checkpoint cannot be read, or what it holds differs from the fingerprints saved with it.

  The message names the step folder and what is wrong (the first arrays that differ, or the
  error reading it).
  """


class DamagedStep(NamedTuple):
  """A step `Checkpointer.restore_latest` skipped: why, and where it is kept now."""
  step: int
  reason: str
  kept_as: storage.Path | None


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings`: the restore target on this mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path) -> str:
  return ".".join(_key_name(k) for k in path)


def _named_leaves(tree) -> list[tuple[str, object]]:
  return [(_path_name(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'opt_state.1.0.trace.f_out.bias' -> shape for each array (or array metadata) in `tree`."""
  return {name: tuple(leaf.shape) for name, leaf in _named_leaves(tree)}


# --- Fingerprints ---------------------------------------------------------------------------------

def _words(x: jax.Array) -> jax.Array:
  """The bit patterns of `x` as uint32 (64-bit elements as two words along a new last axis)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2):
    return lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"No fingerprint for dtype {x.dtype}.")


def _host_words(x: np.ndarray) -> np.ndarray:
  """`_words` of a host array, on the host (jax would narrow 64-bit types without x64)."""
  x = np.ascontiguousarray(x)
  flat = x.reshape(-1)
  if x.dtype == np.bool_:
    flat = flat.view(np.uint8)
  size = flat.dtype.itemsize
  if size == 8:
    return flat.view(np.uint32).reshape(x.shape + (2,))
  if size in (1, 2, 4):
    return flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size]).astype(
        np.uint32).reshape(x.shape)
  raise TypeError(f"No fingerprint for dtype {x.dtype}.")


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  keys = _mix(index + np.uint32(_KEY_OFFSET))
  return jnp.sum(_mix(words ^ keys) - _mix(keys), dtype=jnp.uint32)


@jax.jit
def _fingerprint_all(arrays: list) -> jax.Array:
  return jnp.stack([_fingerprint(x) for x in arrays])


def fingerprints(tree) -> dict[str, int]:
  """The 32-bit fingerprint of every array in `tree`, by dotted path (see the module docstring).

  jax Arrays are reduced on their own devices (for arrays spanning processes, every process must
  call this); NumPy arrays on the default device. Leaves that are not arrays are skipped.
  """
  named = [(name, leaf) for name, leaf in _named_leaves(tree)
           if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]
  groups: dict[object, list[int]] = {}  # one jit per device set: jit needs its inputs on one
  inputs = []
  for i, (_, leaf) in enumerate(named):
    if isinstance(leaf, jax.Array):
      groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
      inputs.append(leaf)
    else:
      groups.setdefault(None, []).append(i)
      inputs.append(_host_words(np.asarray(leaf)))
  values = {}
  for indices in groups.values():
    sums = _fingerprint_all([inputs[i] for i in indices])
    # The result is replicated: every process reads its own copy.
    for i, value in zip(indices, np.asarray(sums.addressable_data(0))):
      values[named[i][0]] = int(value)
  return {name: values[name] for name, _ in named}


def _describe(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec=")[0]  # the spec that follows is long and says little
  text = text if len(text) <= 600 else text[:600] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _saved_item_names(step_dir: storage.Path) -> set[str]:
  """The items a step's Orbax metadata says were saved; empty when that cannot be read."""
  try:
    handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    return set(handlers) if isinstance(handlers, dict) else set()
  except (OSError, ValueError, KeyError, TypeError):
    return set()


def _read_fingerprints(step_dir: storage.Path) -> dict[str, int] | None:
  """The fingerprints saved in `step_dir`, or None for a checkpoint saved without them.

  Raises:
    DamagedCheckpointError: they were saved but are missing or cannot be read.
  """
  folder = step_dir / _FINGERPRINTS
  if not folder.is_dir():
    if _FINGERPRINTS in _saved_item_names(step_dir):
      raise DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: its checksums ({_FINGERPRINTS}/) are missing.")
    return None
  try:
    arrays = ocp.JsonCheckpointHandler().restore(folder)["arrays"]
    if not (isinstance(arrays, dict) and
            all(isinstance(v, int) and not isinstance(v, bool) for v in arrays.values())):
      raise ValueError("'arrays' is not a mapping of array names to integers")
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DamagedCheckpointError(f"Checkpoint {step_dir} is damaged: its checksums "
                                 f"({_FINGERPRINTS}/) cannot be read ({_describe(e)}).") from e
  return arrays


def _verify(step_dir: storage.Path, restored, expected: dict[str, int] | None,
            trimmed: dict[str, tuple[int, int]] | None = None) -> None:
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
    logging.warning("Checkpoint %s has no checksums (it was saved before checkpoints had them): "
                    "restored without verification.", step_dir)
    return
  trimmed = trimmed or {}
  problems = []
  for name, value in fingerprints(restored).items():
    if name not in expected:
      problems.append(f"{name} (no checksum saved for it)")
    elif expected[name] != value:
      note = ""
      if name in trimmed:
        note = (f"; restored with {trimmed[name][1]} of its {trimmed[name][0]} rows, so non-zero "
                "trimmed rows would also cause this")
      problems.append(f"{name} (checksum {value:#010x}, saved {expected[name]:#010x}{note})")
  if problems:
    more = f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise DamagedCheckpointError(
        f"Checkpoint {step_dir} is damaged: {len(problems)} array(s) differ from the checksums "
        f"saved with it: {', '.join(problems[:_SHOWN])}{more}.")


def _agree(step_dir: storage.Path, error: Exception | None) -> None:
  """Raises on every process if reading `step_dir` failed on any of them.

  Each process reads its own shards, so one may fail where the others did not; they must agree
  before the (collective) verification, and on whether to fall back.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    status = 0 if error is None else 1 if isinstance(error, DamagedCheckpointError) else 2
    statuses = np.asarray(multihost_utils.process_allgather(
        np.asarray(status, np.int32))).reshape(-1)
    failed = ", ".join(map(str, np.flatnonzero(statuses)))
    if error is None and statuses.max() == 2:
      raise RuntimeError(f"Restoring {step_dir} failed on process(es) {failed}; see their logs.")
    if error is None and statuses.max() == 1:
      raise DamagedCheckpointError(f"Checkpoint {step_dir} is damaged: process(es) {failed} "
                                   "could not read it; see their logs.")
  if error is not None:
    raise error


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
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    # Items named up front: left to guess, Orbax takes a step folder holding 'default' for a
    # single-item checkpoint and then refuses two-item saves.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_ITEM, _FINGERPRINTS),
        item_handlers={_ITEM: ocp.StandardCheckpointHandler(),
                       _FINGERPRINTS: ocp.JsonCheckpointHandler()})
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

  def save(self, step: int, state, force: bool = False) -> bool:
    """Saves `state` and its fingerprints as `step` (in the background with async_save)."""
    record = {"algorithm": _ALGORITHM, "arrays": fingerprints(state)}
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(state),
                                 _FINGERPRINTS: ocp.args.JsonSave(record)})
    return self._manager.save(step, args=args, force=force)

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Every array's shape saved at `step`, by dotted path (`leaf_shapes`); reads no array."""
    return leaf_shapes(array_metadata(self.directory / str(step) / _ITEM))

  def restore(self, step: int, target, resize: Sequence[str] = (),
              derive: Mapping[str, Callable[[dict], Any]] | None = None):
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

  def _restore(self, step: int, target, resize: Sequence[str],
               check: Callable[[int, dict[str, tuple[int, ...]]], None] | None = None,
               derive: Mapping[str, Callable[[dict], Any]] | None = None):
    step_dir = self.directory / str(step)
    error, restored, expected, trimmed, missing = None, None, None, None, ()
    try:
      restored, expected, trimmed, missing = self._read(step, target, resize, check, derive)
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
    _agree(step_dir, error)
    _verify(step_dir, restored, expected, trimmed)
    if missing:
      fields = dict(restored)
      for name in missing:
        logging.info("Checkpoint %s was written before the state had %s: derived from the "
                     "other fields.", step_dir, name)
        fields[name] = derive[name](fields)
      restored = type(target)(**fields)
    return jax.tree.map(lambda r, t: r if r.dtype == t.dtype else r.astype(t.dtype),
                        restored, target)

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
      saved = dict(_named_leaves(array_metadata(step_dir / _ITEM)))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: it cannot be read ({_describe(e)}).") from e
    wanted = dict(_named_leaves(target))
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
      raise CheckpointMismatchError(
          f"Checkpoint step {step} in {self.directory} does not fit this run: "
          + "; ".join(problems))
    if check is not None:
      check(step, {name: tuple(m.shape) for name, m in saved.items()})
    expected = _read_fingerprints(step_dir)

    def as_saved(path, x):
      # Restored in the saved dtype, verified, then cast: a fingerprint is of the saved bits.
      if _path_name(path) not in saved:  # a field to derive: dropped below
        return x
      dtype = saved[_path_name(path)].dtype
      if x.dtype == dtype:
        return x
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))
    item = jax.tree_util.tree_map_with_path(as_saved, target)
    if missing:
      item = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)
              if f.name not in missing}
    try:
      # strict=False lets orbax pad or trim; the check above confines that to the `resize` fields.
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _ITEM: ocp.args.StandardRestore(item, strict=not resized)}))[_ITEM]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DamagedCheckpointError(
          f"Checkpoint {step_dir} is damaged: it cannot be read ({_describe(e)}).") from e
    return restored, expected, trimmed, missing

  def restore_latest(self, target, resize: Sequence[str] = (),
                     check: Callable[[int, dict[str, tuple[int, ...]]], None] | None = None,
                     derive: Mapping[str, Callable[[dict], Any]] | None = None):
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
    self._damaged = []
    failures: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self._restore(step, target, resize, check, derive)
      except DamagedCheckpointError as e:
        logging.warning("%s Trying the step before it.", e)
        failures.append((step, str(e)))
        continue
      self._move_aside(failures)
      return state, step
    if failures:
      listed = "\n  ".join(f"step {step}: {reason}" for step, reason in failures)
      raise DamagedCheckpointError(
          f"No checkpoint in {self.directory} can be restored:\n  {listed}\nThey are left as "
          "they are. Restore them from a copy, or move them out of the directory to start over.")
    return None, None

  def _move_aside(self, failures: list[tuple[int, str]]) -> None:
    """Renames the damaged `failures` to '<step>.damaged' (process 0) and rereads the steps."""
    if not failures:
      return
    self._manager.wait_until_finished()
    moves = [(step, reason, self.directory / str(step),
              _free_name(self.directory / f"{step}{_DAMAGED_SUFFIX}")) for step, reason in failures]
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


def load_arrays(item_dir: str | storage.Path) -> dict:
  """A whole checkpoint item as host NumPy arrays in nested dicts and lists (for inspection).

  Not verified against the saved fingerprints: it shows what is on disk.
  """
  metadata = ocp.PyTreeCheckpointer().metadata(storage.path(item_dir))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(
      storage.path(item_dir), args=ocp.args.PyTreeRestore(restore_args=args))


# --- Restoring parts of a checkpoint (evaluation) ------------------------------------------------

def _is_item_dir(path: storage.Path) -> bool:
  return (path / "_METADATA").is_file()


def _is_finished(step_dir: storage.Path) -> bool:
  # Locally Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames on success, so only
  # finished steps have a purely numeric name. Object storage has no rename: Orbax writes the
  # step folder in place and marks it finished with a commit file last.
  return step_dir.name.isdigit() and (
      not storage.is_url(step_dir) or (step_dir / _COMMIT_FILE).is_file())


def _complete_steps(directory: storage.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if _is_finished(p) and _is_item_dir(p / _ITEM))


def _unreadable_steps(directory: storage.Path) -> list[int]:
  """Finished step folders without a readable item (see `_complete_steps`)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if _is_finished(p) and p.is_dir() and not _is_item_dir(p / _ITEM))


def resolve_checkpoint(path: str | storage.Path, step: int | None = None,
                       field: str = "init.checkpoint") -> tuple[storage.Path, int | None]:
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
    raise FileNotFoundError(f"config.{field}={str(path)!r}: {root} does not exist.")
  if _is_item_dir(root):
    return root, int(root.parent.name) if root.parent.name.isdigit() else None
  if _is_item_dir(root / _ITEM):
    return root / _ITEM, int(root.name) if root.name.isdigit() else None
  manager_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
  steps = _complete_steps(manager_dir)
  unreadable = _unreadable_steps(manager_dir)
  if not steps:
    damaged = (f" (step folder(s) {', '.join(map(str, unreadable))} have no readable "
               f"{_ITEM}/_METADATA: damaged)") if unreadable else ""
    raise FileNotFoundError(
        f"config.{field}={str(path)!r}: no complete Orbax checkpoint in {manager_dir}{damaged} "
        "(expected a workdir with checkpoints/<step>/, a checkpoints folder, or one step folder).")
  if step is None:
    step = steps[-1]
    newer = [s for s in unreadable if s > step]
    if newer:
      logging.warning("Using checkpoint step %d in %s: the newer step folder(s) %s have no "
                      "readable %s/_METADATA (damaged).", step, manager_dir,
                      ", ".join(map(str, newer)), _ITEM)
  elif step not in steps:
    raise FileNotFoundError(f"config.{field}={str(path)!r}: no step {step} in {manager_dir}; "
                            f"available steps: {', '.join(map(str, steps))}.")
  return manager_dir / str(step) / _ITEM, step


def array_metadata(item_dir: str | storage.Path) -> dict:
  """The checkpoint's tree with each array as a `jax.ShapeDtypeStruct`; no array is read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(storage.path(item_dir))
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


def check_subtrees(item_dir: str | storage.Path, targets: dict[tuple[str, ...], object]) -> None:
  """Checks that the checkpoint holds every array of `targets` with the same shape; reads no array.

  Args:
    item_dir: an item folder (see `resolve_checkpoint`).
    targets: checkpoint path (e.g. ('params', 'trunk')) -> a pytree of arrays or
      ShapeDtypeStructs with the structure and shapes the model expects there.

  Raises:
    CheckpointMismatchError: a subtree is missing, or a parameter is missing, unexpected or has
      another shape; the message names the parameter path and both shapes.
  """
  _check_subtrees(storage.path(item_dir), targets)


def _check_subtrees(item_dir: storage.Path, targets: dict[tuple[str, ...], object]) -> dict:
  """`check_subtrees`; returns the checkpoint's `array_metadata`."""
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
    raise CheckpointMismatchError(
        f"The checkpoint {item_dir} does not match the model architecture "
        f"({len(problems)} problem(s)):{user_errors.listing(problems)}")
  return available


def restore_subtrees(item_dir: str | storage.Path, targets: dict[tuple[str, ...], object],
                     sharding=None) -> dict[tuple[str, ...], object]:
  """Restores only some subtrees of a checkpoint, checking them against the model first.

  The restored arrays are verified against the fingerprints saved next to `item_dir` (an item
  folder without them restores with a warning).

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
    DamagedCheckpointError: the arrays cannot be read or differ from their saved fingerprints.
  """
  item_dir = storage.path(item_dir)
  available = _check_subtrees(item_dir, targets)
  expected = _read_fingerprints(item_dir.parent)
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
        item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                              partial_restore=True))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DamagedCheckpointError(f"Checkpoint {item_dir} is damaged: it cannot be read "
                                 f"({_describe(e)}).") from e
  parts = {prefix: subtree(restored, prefix) for prefix in targets}
  _verify(item_dir.parent, {".".join(prefix): part for prefix, part in parts.items()}, expected)
  return {prefix: _cast_like(parts[prefix], target) for prefix, target in targets.items()}


def _cast_like(restored, target):
  """`restored` (nested dicts) with each array cast to the dtype of its match in `target`."""
  dtypes = {path: leaf.dtype for path, leaf in _flatten(target).items()}
  def cast(path, x):
    dtype = dtypes[tuple(_key_name(k) for k in path)]
    return x if x.dtype == dtype else x.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, restored)


def _set_path(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
