"""Checks made before anything is compiled, so that a run fails in seconds, not hours in.

Each check raises `PreflightError` with a message naming the file, field or number at fault:
  * the workdir cannot be created or written (on object storage, `gs://`: a marker object cannot
    be written and deleted);
  * the disk holding the checkpoints has less free space than the checkpoints of this state
    will take (estimated from the state's shapes, `jax.eval_shape`, before it exists); skipped,
    and logged as skipped, on object storage;
  * the workdir holds checkpoints of another experiment: its `config.json` differs from the new
    config in a field that changes the result (`check_resume`). Fields that may legitimately
    change between a run and its resumption are listed in `RESUMABLE_FIELDS`.

Dataset size and device-count checks live in `pirl_jax.configuration` (they are config errors).

On many processes, host-local checks run everywhere and `agree` makes every process fail when one
does: a process that stopped alone would leave the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
from typing import Callable, Sequence

from absl import logging
import jax
import numpy as np

from pirl_jax import storage
from pirl_jax import user_errors

# Fields that may differ between a run and its resumption without making it another experiment:
# where and how often things are written, how many devices and input threads are used, and the
# recovery knobs themselves. `num_devices` may change because checkpoints restore on any device
# count; `skip_nonfinite_steps` is what one turns on to get past a step that diverged.
RESUMABLE_FIELDS = frozenset(
    {
        "resume",
        "num_devices",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "skip_nonfinite_steps",
        "data.cache_dir",
        "data.num_parallel_calls",
        "data.prefetch_batches",
        "memory_bank.score_chunk_size",
    }
)
# Pretraining only: the probes watch training, they do not change it.
RESUMABLE_IN_PRETRAINING = frozenset({"eval_every_steps", "probe"})

# Fields added to the configs after workdirs were written, with the value the code had before
# them: a saved config without the field ran with that value, so it is no difference.
ADDED_FIELDS = {"method": "pirl", "jigsaw_permutations": 1000, "uda.enabled": False}
# Blocks whose other fields change nothing while the block's `enabled` is False.
SWITCHED_BLOCKS = ("uda",)

_MIB = 1 << 20


class PreflightError(user_errors.UserError, RuntimeError):
  """The run cannot start; the message says what to change."""


def check_workdir_writable(workdir: str | os.PathLike) -> None:
  """Creates `workdir` if needed and checks that a file can be written and removed in it.

  On object storage (`gs://`) the file is a marker object, written and deleted.
  """
  url = storage.is_url(workdir)
  workdir = storage.path(workdir) if url else pathlib.Path(workdir)
  probe = workdir / f".preflight-{jax.process_index()}-{os.getpid()}"
  # Object-storage clients raise their own errors (HTTP, credentials), not only OSError.
  errors = Exception if url else OSError
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"ok")
    probe.unlink()
  except errors as e:  # pylint: disable=broad-exception-caught
    if url:  # the client's exception type says more than its text (often just the request)
      what, reason = "not a writable location", f"{type(e).__name__}: {e}"
    else:
      what, reason = "not a writable directory", e.strerror or e
    raise PreflightError(
        f"The workdir {workdir} is {what} ({reason}); checkpoints, logs and config.json go "
        "there. Pass another --workdir."
    ) from e


def free_disk_bytes(path: str | os.PathLike) -> int:
  """Free bytes on the file system holding `path` (or its nearest existing parent)."""
  path = pathlib.Path(path).absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free


def state_bytes(abstract_state) -> int:
  """Bytes of all arrays in a pytree of arrays or `jax.ShapeDtypeStruct`s (global shapes)."""
  return sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state)
  )


_KEEP_ADVICE = (
    "config.keep_checkpoints + 1 at most). Free some space, lower "
    "config.keep_checkpoints or pass another --workdir."
)


def check_free_disk(
    checkpoint_dir: str | os.PathLike,
    bytes_per_checkpoint: int,
    num_checkpoints: int,
    advice: str = _KEEP_ADVICE,
) -> None:
  """Checks there is room for `num_checkpoints` more checkpoints of `bytes_per_checkpoint`.

  Orbax deletes the oldest checkpoint only after the newest is complete, so a run keeping k needs
  room for k + 1; the caller subtracts those already on disk. 5% and 16 MiB are added for
  metadata. The free-space query is `free_disk_bytes` (replaced in tests). `advice` ends the
  message: what bounds the count, and what the user can change.
  """
  needed = int(num_checkpoints * bytes_per_checkpoint * 1.05) + 16 * _MIB
  if storage.is_url(checkpoint_dir):
    logging.info(
        "Preflight: skipped the free-disk check for %s (object storage has no free-"
        "space figure; about %.1f MiB will be written there).",
        checkpoint_dir,
        needed / _MIB,
    )
    return
  free = free_disk_bytes(checkpoint_dir)
  if free < needed:
    raise PreflightError(
        f"Not enough free disk for checkpoints in {checkpoint_dir}: {free / _MIB:.1f} MiB free, "
        f"about {needed / _MIB:.1f} MiB needed ({num_checkpoints} checkpoint(s) of "
        f"{bytes_per_checkpoint / _MIB:.1f} MiB each, {advice}"
    )


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: dict, new: dict) -> list[str]:
  """'field: <saved> in the workdir, <new> now' per differing field, resumable fields apart.

  Resumable: `RESUMABLE_FIELDS`, and for pretraining `RESUMABLE_IN_PRETRAINING` (a name there
  covers the fields below it, e.g. 'probe' covers 'probe.knn_k').
  """
  resumable = RESUMABLE_FIELDS
  if new.get("mode") == "pretrain":
    resumable = resumable | RESUMABLE_IN_PRETRAINING
  saved, new = _flatten(saved), _flatten(new)
  missing = object()

  def value(config, field):
    found = config.get(field, missing)
    return ADDED_FIELDS[field] if found is missing and field in ADDED_FIELDS else found

  # A block switched off on both sides, or absent from the saved config (which then ran with it
  # off): only its switch can differ.
  off = {
      block
      for block in SWITCHED_BLOCKS
      if value(saved, f"{block}.enabled") is False
      and (value(new, f"{block}.enabled") is False or f"{block}.enabled" not in saved)
  }
  lines = []
  for field in sorted(set(saved) | set(new)):
    top = field.split(".")[0]
    if field in resumable or top in resumable or (top in off and field != f"{top}.enabled"):
      continue
    before, after = value(saved, field), new.get(field, missing)
    if before != after:
      show = lambda v: "(absent)" if v is missing else json.dumps(v)
      lines.append(f"{field}: {show(before)} in the workdir, {show(after)} now")
  return lines


def config_as_dict(config) -> dict:
  """The config as saved in config.json (tuples become lists), for comparison."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_resume(config, workdir: str | os.PathLike, latest_step: int | None) -> None:
  """Refuses to resume into a workdir whose checkpoints belong to another experiment.

  Args:
    config: the new config; `config.resume` is 'auto' (check), 'force' (only warn) or 'never'.
    workdir: the run's workdir, holding config.json from the run that wrote the checkpoints.
    latest_step: the latest complete checkpoint there, or None (nothing to resume: no check).
  """
  if latest_step is None:
    return
  workdir = storage.path(workdir) if storage.is_url(workdir) else pathlib.Path(workdir)
  if config.resume == "never":
    raise PreflightError(
        f"config.resume='never' but {workdir / 'checkpoints'} holds checkpoints (latest step "
        f"{latest_step}); starting over there would mix two runs. Pass a new --workdir, delete "
        "the checkpoints, or resume with config.resume='auto'."
    )
  saved_path = workdir / "config.json"
  if not saved_path.is_file():
    logging.warning(
        "%s has checkpoints but no config.json; cannot check that they come from "
        "the same experiment.",
        workdir,
    )
    return
  try:
    saved = json.loads(saved_path.read_text())
  except (OSError, ValueError) as e:
    raise PreflightError(
        f"Cannot read {saved_path} ({e}); fix or delete it, or pass " "--config.resume=force."
    ) from e
  differences = config_differences(saved, config_as_dict(config))
  if not differences:
    return
  listing = "\n  ".join(differences)
  if config.resume == "force":
    logging.warning(
        "config.resume='force': resuming from step %d in %s although the config "
        "differs from %s:\n  %s",
        latest_step,
        workdir,
        saved_path,
        listing,
    )
    return
  raise PreflightError(
      f"{workdir} holds checkpoints (latest step {latest_step}) of a run whose config "
      f"({saved_path}) differs from this one in {len(differences)} field(s):\n  {listing}\n"
      "Resuming would continue another experiment. Pass a new --workdir, or "
      "--config.resume=force to resume anyway."
  )


def dataset_fingerprint(
    num_examples: int, names: Sequence[str], contents: Sequence[bytes] | None = None
) -> dict:
  """What a run's checkpoints refer to: the image at each dataset index and a digest of it.

  Names are kept relative to their common folder, so that moving the data (or the cache the
  embedded set lives in) is not a change.

  Args:
    num_examples: N, the memory bank's real rows.
    names: the name (path) of the image at each dataset index; empty when not known (a streamed
      dataset, compared by size only).
    contents: the bytes the run reads for each index, or None.
  """
  names = [str(n) for n in names]
  if len(names) > 1:
    # URLs (gs://bucket/...) as '/bucket/...', so that their common folder is found the same way.
    urls = all(storage.is_url(n) for n in names)
    if urls:
      names = ["/" + n.split("://", 1)[1] for n in names]
    root = os.path.commonpath(names) if all(n.startswith("/") for n in names) else ""
    names = [os.path.relpath(n, root) if root else n for n in names]
  digests = [hashlib.sha1(c).hexdigest()[:12] for c in contents] if contents is not None else []
  return {"num_examples": int(num_examples), "names": names, "digests": digests}


def dataset_differences(saved: dict, new: dict) -> list[str]:
  """Readable differences between two `dataset_fingerprint`s (empty when they agree)."""
  lines = []
  if saved.get("num_examples") != new.get("num_examples"):
    lines.append(
        f"{new.get('num_examples')} images now, {saved.get('num_examples')} when the " "run started"
    )
  old_names, new_names = saved.get("names", []), new.get("names", [])
  if old_names and new_names and set(old_names) != set(new_names):
    removed = sorted(set(old_names) - set(new_names))
    added = sorted(set(new_names) - set(old_names))
    lines += [f"removed: {name}" for name in removed[:5]]
    lines += [f"added: {name}" for name in added[:5]]
  elif old_names and new_names:  # the same images in another order
    lines += [
        f"index {i}: {after} now, {before} before"
        for i, (before, after) in enumerate(zip(old_names, new_names))
        if before != after
    ]
  old_digests, new_digests = saved.get("digests", []), new.get("digests", [])
  if not lines and old_digests and new_digests:
    lines += [
        f"index {i}: {name} has other content"
        for i, (name, before, after) in enumerate(zip(new_names, old_digests, new_digests))
        if before != after
    ]
  return lines


def agree(*checks: Callable[[], None]) -> None:
  """Runs `checks` on this process; raises on every process if any check failed on any of them."""
  error = None
  for check in checks:
    try:
      check()
    except PreflightError as e:
      error = e
      break
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    failed = np.asarray(
        multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
    ).reshape(-1)
    others = [i for i in np.flatnonzero(failed) if i != jax.process_index()]
    if error is None and others:
      raise PreflightError(
          f"Preflight checks failed on process(es) "
          f"{', '.join(map(str, others))}; see their logs."
      )
  if error is not None:
    raise error
