"""The PIRL pretraining loop: config -> data -> sharded state -> jitted steps -> checkpoints."""

from __future__ import annotations

import json
import pathlib
import time

from absl import logging
from clu import metric_writers
import jax
import numpy as np

from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import pipeline
from pirl_jax.data import sources
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def save_config(config, workdir: pathlib.Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains PIRL as configured, resuming from `workdir` if it holds a checkpoint.

  Returns:
    A summary: final step, last logged metrics, checkpoint directory, wall time.
  """
  start_time = time.time()
  workdir_path = pathlib.Path(workdir).absolute()
  workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = sharding_lib.create_mesh()
  configuration.validate_pretrain_config(config, mesh.size)

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
  state, shardings = state_lib.create_train_state(config, model, tx, num_examples, mesh,
                                                  config.seed)

  checkpointer = checkpointing.Checkpointer(workdir_path / "checkpoints",
                                            keep=config.keep_checkpoints)
  latest = checkpointer.latest_step() if config.resume != "never" else None
  if latest is not None:
    state = checkpointer.restore(latest, checkpointing.abstract_like(state, shardings))
    logging.info("Resumed from %s at step %d.", checkpointer.directory, latest)
  save_config(config, workdir_path)

  p_train_step = step_lib.jit_train_step(
      mesh, shardings, model=model, tx=tx, schedule=lr_schedule, loss_cfg=config.loss,
      bank_momentum=config.memory_bank.momentum, num_examples=num_examples)

  writer = metric_writers.create_default_writer(
      str(workdir_path), just_logging=jax.process_index() > 0)
  first_step = int(jax.device_get(state.step))
  total = schedule.total_steps
  logging.info("Training steps %d..%d on %d device(s), global batch %d.",
               first_step, total, mesh.size, config.global_batch_size)

  batches = data.iterate(first_step)
  accumulated, count = None, 0
  last_metrics: dict = {}
  window_start, window_steps = time.time(), 0
  train_start, compiled_at = time.time(), None
  for step in range(first_step, total):
    batch = sharding_lib.global_batch(next(batches), mesh)
    state, metrics = p_train_step(state, batch)
    # Summed on device: no host sync until the next log line.
    accumulated = metrics if accumulated is None else jax.tree.map(
        lambda a, b: a + b, accumulated, metrics)
    count += 1
    window_steps += 1
    done = step + 1
    if done % config.log_every_steps == 0 or done == total:
      means = {k: float(v) / count for k, v in jax.device_get(accumulated).items()}
      bad = [k for k, v in means.items() if not np.isfinite(v)]
      if bad:
        raise FloatingPointError(
            f"Non-finite {', '.join(bad)} in steps {done - count + 1}..{done}; stopping without "
            f"a checkpoint of this state (the latest good one is step {checkpointer.latest_step()}).")
      now = time.time()
      if compiled_at is None:
        compiled_at = now  # the first window includes compilation
      steps_per_sec = window_steps / max(now - window_start, 1e-9)
      means["steps_per_sec"] = steps_per_sec
      means["images_per_sec"] = steps_per_sec * config.global_batch_size
      writer.write_scalars(done, means)
      eta = (total - done) / max(steps_per_sec, 1e-9)
      logging.info(
          "step %d/%d (%.1f%%) loss %.4f [jigsaw %.4f image %.4f] pos %.3f neg %.3f lr %.4g "
          "| %.2f steps/s %.1f img/s | elapsed %s ETA %s",
          done, total, 100.0 * done / total, means["loss"], means["loss_jigsaw"],
          means["loss_image"], means["positive_similarity"], means["negative_similarity"],
          means["learning_rate"], steps_per_sec, means["images_per_sec"],
          _format_duration(now - train_start), _format_duration(eta))
      last_metrics = means
      accumulated, count = None, 0
      window_start, window_steps = now, 0
    if done % config.checkpoint_every_steps == 0 or done == total:
      checkpointer.save(done, state)

  checkpointer.close()
  writer.flush()
  elapsed = time.time() - start_time
  summary = dict(step=total, metrics=last_metrics, workdir=str(workdir_path),
                 checkpoint_dir=str(checkpointer.directory), wall_seconds=elapsed)
  if jax.process_index() == 0:
    (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
