"""The PIRL pretraining loop: config -> data -> sharded state -> jitted steps -> checkpoints.

Built to survive the way long runs die (README.md, "Preemption and resume"):
  * Preflight (`pirl_jax.preflight`, before anything is compiled): a writable workdir, free disk
    for the checkpoints, no resuming into another experiment's workdir.
  * Resume: the latest complete Orbax checkpoint in <workdir>/checkpoints, on any device or
    process count (the memory bank's padding rows are trimmed or added). Data order and
    augmentation are a pure function of (seed, step), so a resumed run is bitwise identical to
    an uninterrupted one on the same devices.
  * SIGTERM (preemption): the current step finishes, a checkpoint is written, and the function
    returns with `preempted=True`. Under `jax.distributed`, JAX's preemption service catches the
    signal and all processes stop at the same step.
  * A non-finite loss or gradient norm raises `FloatingPointError` naming the first such step,
    before any checkpoint of the poisoned state is written; or, with
    `config.skip_nonfinite_steps`, the step leaves the state unchanged and is counted.
"""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import numpy as np

from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import pipeline
from pirl_jax.data import sources
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib

_NEVER = np.iinfo(np.int32).max
_WATCHED = ("loss", "grad_norm")  # a step with either non-finite is an error (or skipped)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def save_config(config, workdir: pathlib.Path) -> None:
  """Writes config.json (process 0); a differing one (forced resume) is kept as config.<n>.json."""
  if jax.process_index() != 0:
    return
  path = workdir / "config.json"
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.is_file() and path.read_text() != text:
    n = 1
    while (workdir / f"config.{n}.json").exists():
      n += 1
    path.rename(workdir / f"config.{n}.json")
  path.write_text(text)


@jax.jit
def _empty_window(metrics):
  return {"sums": jax.tree.map(jnp.zeros_like, metrics), "count": jnp.zeros((), jnp.int32),
          "first_bad": {k: jnp.full((), _NEVER, jnp.int32) for k in _WATCHED}}


@jax.jit
def _accumulate(window, metrics, step):
  """Adds one step's metrics to the log window, on device.

  Sums only finite steps (so means stay meaningful when steps are skipped) and records, per
  watched quantity, the first step at which it was not finite. Keeping this on device means no
  host sync per step: the host reads the window only at log and checkpoint steps, and since a
  checkpoint is written only after that read, a poisoned state is never saved.
  """
  ok = step_lib.is_finite_step(metrics)
  sums = jax.tree.map(lambda a, m: a + jnp.where(ok, m, jnp.zeros_like(m)), window["sums"],
                      metrics)
  first_bad = {k: jnp.where(jnp.isfinite(metrics[k]), v, jnp.minimum(v, step))
               for k, v in window["first_bad"].items()}
  return {"sums": sums, "count": window["count"] + ok.astype(jnp.int32), "first_bad": first_bad}


class _TermSignal:
  """Notes a SIGTERM so that the loop can finish its step, checkpoint and return.

  Under `jax.distributed` JAX's preemption service owns SIGTERM (and makes all processes agree on
  the step to stop at, see `Checkpointer.reached_preemption`), so no handler is installed then.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if (not jax.distributed.is_initialized() and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _raise_if_nonfinite(first_bad: dict, checkpointer: checkpointing.Checkpointer) -> None:
  bad = {k: int(first_bad[k]) for k in _WATCHED if int(first_bad[k]) != _NEVER}
  if not bad:
    return
  checkpointer.wait_until_finished()  # so that "latest" below is the last complete checkpoint
  first = min(bad.values())
  names = " and ".join(k for k, v in bad.items() if v == first)
  later = "".join(f"; {k} first at step {v}" for k, v in bad.items() if v != first)
  raise FloatingPointError(
      f"Non-finite {names} at step {first}{later}. Stopped without checkpointing this state; "
      f"the latest good checkpoint is step {checkpointer.latest_step()} in "
      f"{checkpointer.directory}. Lower the learning rate, or set "
      "config.skip_nonfinite_steps=True to skip such steps.")


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains PIRL as configured, resuming from `workdir` if it holds a checkpoint.

  Returns:
    A summary: final step, last logged metrics, checkpoint directory, wall time, whether it
    stopped early on SIGTERM (`preempted`) and how many steps were skipped as non-finite.

  Raises:
    preflight.PreflightError, configuration.ConfigError: before anything is compiled.
    FloatingPointError: a non-finite loss or gradient norm (unless config.skip_nonfinite_steps).
  """
  start_time = time.time()
  workdir_path = pathlib.Path(workdir).absolute()
  preflight.agree(lambda: preflight.check_workdir_writable(workdir_path))
  devices = configuration.select_devices(config, jax.devices(), jax.process_count())
  mesh = sharding_lib.create_mesh(devices)
  configuration.validate_pretrain_config(config, mesh.size)
  checkpointer = checkpointing.Checkpointer(workdir_path / "checkpoints",
                                            keep=config.keep_checkpoints)
  try:
    return _train(config, workdir_path, mesh, checkpointer, start_time)
  finally:
    # Waits for in-flight saves: they are of states that passed the finiteness check.
    checkpointer.close()


def _train(config, workdir_path: pathlib.Path, mesh, checkpointer, start_time: float) -> dict:
  latest = checkpointer.latest_step()
  preflight.agree(lambda: preflight.check_resume(config, workdir_path, latest))

  source = sources.create_source(config.data)
  num_examples = source.num_examples
  configuration.validate_dataset_size(config, num_examples)
  schedule = configuration.resolve_schedule(config, num_examples)
  logging.info("Data: %s, %d images, %d steps/epoch, %d steps in all.",
               source.name, num_examples, schedule.steps_per_epoch, schedule.total_steps)
  if getattr(source, "skipped", None):
    logging.warning("%d bad images were skipped (data.on_bad_image='skip').", len(source.skipped))

  data = pipeline.PretrainInput(
      source, pipeline.view_config(config.data.views), seed=config.seed,
      global_batch_size=config.global_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_parallel_calls=config.data.num_parallel_calls,
      prefetch_batches=config.data.prefetch_batches)

  model = state_lib.create_model(config.model)
  tx, lr_schedule = state_lib.create_optimizer(
      config.optim, schedule.learning_rate, schedule.warmup_steps, schedule.total_steps)
  abstract_state, _ = state_lib.abstract_train_state(config, model, tx, num_examples, mesh)
  checkpoint_bytes = preflight.state_bytes(abstract_state)
  existing = len(checkpointer.all_steps())
  preflight.agree(lambda: preflight.check_free_disk(
      checkpointer.directory, checkpoint_bytes,
      max(1, config.keep_checkpoints + 1 - existing)))

  state, shardings = state_lib.create_train_state(config, model, tx, num_examples, mesh,
                                                  config.seed)
  if latest is not None:
    saved_rows = checkpointer.saved_shapes(latest)["bank"][0]
    if saved_rows < num_examples:
      raise checkpointing.CheckpointMismatchError(
          f"Checkpoint step {latest} in {checkpointer.directory} has a memory bank of "
          f"{saved_rows} rows but the dataset has {num_examples} images: it belongs to another "
          "dataset.")
    state = checkpointer.restore(latest, checkpointing.abstract_like(state, shardings),
                                 resize=("bank",))
    logging.info("Resumed from %s at step %d (memory bank: %d saved rows, %d on %d device(s)).",
                 checkpointer.directory, latest, saved_rows, state.bank.shape[0], mesh.size)
  save_config(config, workdir_path)

  p_train_step = step_lib.jit_train_step(
      mesh, shardings, model=model, tx=tx, schedule=lr_schedule, loss_cfg=config.loss,
      bank_momentum=config.memory_bank.momentum, num_examples=num_examples,
      skip_nonfinite=config.skip_nonfinite_steps)

  # The progress line below is the log; TensorBoard gets the scalars, from process 0 only.
  writer = (metric_writers.SummaryWriter(str(workdir_path)) if jax.process_index() == 0
            else metric_writers.MultiWriter([]))
  first_step = int(jax.device_get(state.step))
  total = schedule.total_steps
  logging.info("Training steps %d..%d on %d device(s) in %d process(es), global batch %d.",
               first_step, total, mesh.size, jax.process_count(), config.global_batch_size)

  batches = data.iterate(first_step)
  window = None
  last_metrics: dict = {}
  done = first_step
  preempted = False
  window_start, window_steps = time.time(), 0
  train_start = time.time()
  with _TermSignal() as term:
    for step in range(first_step, total):
      batch = sharding_lib.global_batch(next(batches), mesh)
      state, metrics = p_train_step(state, batch)
      window = _accumulate(_empty_window(metrics) if window is None else window, metrics,
                           state.step)
      window_steps += 1
      done = step + 1
      # Every process calls reached_preemption at every step (JAX's sync point requires it).
      preempted = checkpointer.reached_preemption(done) or term.received
      log_now = done % config.log_every_steps == 0 or done == total
      save_now = done % config.checkpoint_every_steps == 0 or done == total or preempted
      if log_now:
        fetched = jax.device_get(window)
      elif save_now and not config.skip_nonfinite_steps:
        fetched = {"first_bad": jax.device_get(window["first_bad"])}
      else:
        fetched = None
      if fetched is not None and not config.skip_nonfinite_steps:
        _raise_if_nonfinite(fetched["first_bad"], checkpointer)
      if log_now:
        last_metrics = _log(config, writer, state, fetched, done, total, window_steps,
                            time.time() - window_start, time.time() - train_start)
        window, window_start, window_steps = None, time.time(), 0
      if save_now:
        checkpointer.save(done, state, force=preempted)
      if preempted:
        logging.warning("SIGTERM: stopped after step %d/%d with a checkpoint; run the same "
                        "command again to resume.", done, total)
        break

  nonfinite_steps = int(jax.device_get(state.nonfinite_steps))
  checkpointer.wait_until_finished()
  writer.flush()
  elapsed = time.time() - start_time
  summary = dict(step=done, total_steps=total, preempted=preempted, metrics=last_metrics,
                 nonfinite_steps=nonfinite_steps, workdir=str(workdir_path),
                 checkpoint_dir=str(checkpointer.directory), wall_seconds=elapsed)
  if jax.process_index() == 0:
    (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _log(config, writer, state, fetched, done: int, total: int, window_steps: int,
         window_seconds: float, elapsed: float) -> dict:
  """Writes the window's mean metrics and the progress line; returns the means."""
  count = int(fetched["count"])
  skipped = window_steps - count
  steps_per_sec = window_steps / max(window_seconds, 1e-9)
  means = {k: float(v) / count if count else float("nan") for k, v in fetched["sums"].items()}
  means["steps_per_sec"] = steps_per_sec
  means["images_per_sec"] = steps_per_sec * config.global_batch_size
  if config.skip_nonfinite_steps:
    means["nonfinite_steps"] = float(jax.device_get(state.nonfinite_steps))
    if skipped:
      first = min(int(v) for v in fetched["first_bad"].values())
      logging.warning("Skipped %d of the last %d step(s) for a non-finite loss or gradient norm "
                      "(first at step %d); %d skipped in all.", skipped, window_steps, first,
                      int(means["nonfinite_steps"]))
  writer.write_scalars(done, {k: v for k, v in means.items() if np.isfinite(v)})
  eta = (total - done) / max(steps_per_sec, 1e-9)
  logging.info(
      "step %d/%d (%.1f%%) loss %.4f [jigsaw %.4f image %.4f] pos %.3f neg %.3f lr %.4g "
      "| %.2f steps/s %.1f img/s | elapsed %s ETA %s",
      done, total, 100.0 * done / total, means["loss"], means["loss_jigsaw"],
      means["loss_image"], means["positive_similarity"], means["negative_similarity"],
      means["learning_rate"], steps_per_sec, means["images_per_sec"],
      _format_duration(elapsed), _format_duration(eta))
  return means
