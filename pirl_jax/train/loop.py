"""The one training loop. Pretraining and fine-tuning are `Task`s; `Run` does what every run needs.

A run goes through two phases:

  with loop.Run(config, workdir, task_name) as run:   # preflight, resume checks, completion
    if run.completed: ...                             # the same command ran to the end before
    ... build the data, the state and the step ...    # the task's own code
    run.check_dataset(fingerprint); run.check_disk(abstract_state)
    summary = run.train(task)

What lives here, once:
  * Preflight before anything is compiled: a writable workdir, free disk for the checkpoints, no
    resuming into another experiment's workdir (`config.json` compared), no resuming over a
    changed dataset (`dataset.json`: the index -> image mapping, compared name by name).
  * Resume from the latest intact checkpoint, on any device or process count, falling back past
    damaged ones (`checkpointing.Checkpointer.restore_latest`). Data order and augmentation are a
    pure function of (seed, step), so a resumed run is bitwise identical to an uninterrupted one.
  * A finished run is not run again: the same command reports it complete and writes nothing.
  * The metric window, kept on device: means at log steps, and the first step at which the loss
    or gradient norm was not finite, recorded without a host sync per step; a checkpoint written
    between two logs carries it, so a resumed run logs what an uninterrupted one does. Such a
    step stops the run before any checkpoint of the poisoned state is written (or, with
    `config.skip_nonfinite_steps`, the task's step skips it and it is counted).
  * Periodic actions: the progress line (with ETA), TensorBoard scalars, evaluators
    (`Evaluator.run(state) -> metrics`), checkpoints.
  * SIGTERM (preemption): the current step finishes, a checkpoint is written and `train` returns
    with `preempted=True`. Under `jax.distributed`, JAX's preemption service catches the signal
    and all processes stop at the same step.
  * config.json (a forced resume keeps the replaced one as config.<n>.json) and summary.json,
    written by process 0 only.
"""

from __future__ import annotations

import json
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
from pirl_jax import signals
from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.train import metric_window
from pirl_jax.train import task as task_lib

Evaluator = task_lib.Evaluator
Task = task_lib.Task


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _TermSignal:
  """Notes a SIGTERM during training so that the loop can finish its step, checkpoint and return."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if (
        not jax.distributed.is_initialized()
        and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    if signals.startup_sigterm_received():  # a start-up SIGTERM whose exception was swallowed
      self.__exit__(None, None, None)
      raise signals.StartupInterrupted()
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Run:
  """One run in one workdir: preflight, resume, the training loop, config.json and summary.json."""

  def __init__(self, config, workdir: str | storage.Path, task_name: str):
    self.config = config
    self.task_name = task_name
    self.start_time = time.time()
    self.workdir = storage.path(workdir)
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_main = self.process_index == 0
    # Folders this run creates; removed again if it stops before writing anything into them.
    self._created = [p for p in (self.workdir, self.workdir / "checkpoints") if not p.exists()]
    preflight.agree(lambda: preflight.check_workdir_writable(self.workdir))
    devices = configuration.select_devices(config, jax.devices(), jax.process_count())
    self.mesh = sharding_lib.create_mesh(devices)
    self.checkpointer = checkpointing.Checkpointer(
        self.workdir / "checkpoints", keep=config.get("keep_checkpoints", 1)
    )
    try:
      self.latest = self.checkpointer.latest_step()
      preflight.agree(lambda: preflight.check_resume(config, self.workdir, self.latest))
      self.completed = self._completed_summary()
    except BaseException:
      self.close(failed=True)
      raise

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self.close(failed=exc_type is not None)

  def close(self, failed: bool = False) -> None:
    # Waits for in-flight saves: they are of states that passed the finiteness check.
    self.checkpointer.close()
    if failed and self.is_main:
      self._remove_empty_created_folders()

  def _remove_empty_created_folders(self) -> None:
    """A run that fails before writing anything leaves no empty workdir behind. Only empty
    folders this run created are removed: nothing a user or an earlier run wrote can go."""
    for folder in reversed(self._created):
      try:
        if folder.is_dir() and not any(folder.iterdir()):
          folder.rmdir()
      except Exception:  # pylint: disable=broad-except
        pass  # not empty after all, or a store without folders: leave it

  def _completed_summary(self) -> dict | None:
    """The summary of a run of this config that already finished in the workdir, or None."""
    path = self.workdir / "summary.json"
    if self.latest is None or not path.is_file():
      return None
    try:
      summary = json.loads(path.read_text())
    except (OSError, ValueError):
      return None
    if not summary.get("complete") or summary.get("step") != self.latest:
      return None
    # A forced resume with another config (e.g. more steps) is not the run that finished.
    saved_config = self.workdir / "config.json"
    if saved_config.is_file() and preflight.config_differences(
        json.loads(saved_config.read_text()), preflight.config_as_dict(self.config)
    ):
      return None
    # The workdir may have moved since: report where it is now.
    return dict(summary, workdir=str(self.workdir), checkpoint_dir=str(self.checkpointer.directory))

  def check_dataset(self, fingerprint: dict) -> None:
    """Refuses to resume over another dataset; records the dataset of a new run.

    Args:
      fingerprint: {'source': str, 'names': [the name of the image at each dataset index],
        'digests': [a short content digest per index, or empty]} -- what the checkpoint's
        memory-bank rows and data order refer to.
    """
    path = self.workdir / "dataset.json"
    if self.latest is not None and not path.is_file():
      message = (
          f"{path} is missing: it records which image each of the checkpoints' rows "
          f"refers to (latest step {self.latest}), so resuming cannot check that the "
          "images are the same."
      )
      if self.config.get("resume") != "force":
        raise preflight.PreflightError(
            f"{message} Restore it, start a new run in another --workdir, or resume anyway with "
            "--config.resume=force (the images found now are recorded as the run's)."
        )
      logging.warning(
          "%s Resuming anyway (config.resume='force'); recording the images found " "now.", message
      )
    if self.latest is not None and path.is_file():
      try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
          raise ValueError(f"a JSON {type(saved).__name__}, not an object")
      except (ValueError, UnicodeDecodeError) as e:
        raise preflight.PreflightError(
            f"{path} is damaged ({e}); it records which images the checkpoints refer to. "
            "Restore it, or start a new run in another --workdir."
        ) from None
      differences = preflight.dataset_differences(saved, fingerprint)

      def check():
        if differences:
          raise preflight.PreflightError(
              f"The dataset changed since {self.workdir} was checkpointed (step {self.latest}); "
              f"its checkpoints refer to the images recorded in {path}:"
              f"{user_errors.listing(differences)}\n"
              "Restore the original images, or start a new run in another --workdir."
          )

      preflight.agree(check)
    elif self.is_main:
      path.write_text(json.dumps(fingerprint))

  def check_disk(self, abstract_state, extra_copies: int = 0) -> None:
    """Room for the checkpoints this run will keep (estimated from the state's shapes).

    Args:
      abstract_state: the train state's shapes and dtypes.
      extra_copies: further full copies of the state the task writes besides `checkpoints/`
        (fine-tuning's best state and its replacement).
    """
    keep = self.config.get("keep_checkpoints", 1)
    existing = len(self.checkpointer.all_steps())
    preflight.agree(
        lambda: preflight.check_free_disk(
            self.checkpointer.directory,
            preflight.state_bytes(abstract_state),
            max(1, keep + 1 - existing) + extra_copies,
        )
    )

  def save_config(self) -> None:
    """Writes config.json; a differing one (forced resume) is kept as config.<n>.json."""
    if not self.is_main:
      return
    path = self.workdir / "config.json"
    text = self.config.to_json_best_effort(indent=2, sort_keys=True)
    if path.is_file() and path.read_text() != text:
      n = 1
      while (self.workdir / f"config.{n}.json").exists():
        n += 1
      path.rename(self.workdir / f"config.{n}.json")
    path.write_text(text)

  def _restore(self, task: Task):
    """The task's state, or the latest intact checkpoint restored into its shardings."""
    if self.latest is None:
      return task.state
    check = None
    if task.check_restorable is not None:
      check = lambda step, saved_shapes: task.check_restorable(saved_shapes)
    state, step = self.checkpointer.restore_latest(
        checkpointing.abstract_like(task.state, task.shardings),
        resize=task.resize,
        check=check,
        derive=task.derive,
    )
    if state is None:
      return task.state
    skipped = "".join(
        f"; skipped damaged step {d.step} ({d.reason}), kept as {d.kept_as}"
        for d in self.checkpointer.damaged_steps
    )
    logging.info(
        "Resumed from %s at step %d on %d device(s)%s.",
        self.checkpointer.directory,
        step,
        self.mesh.size,
        skipped,
    )
    return state

  def train(self, task: Task) -> dict:
    """Trains `task` to its last step (or until SIGTERM); returns the run's summary."""
    config = self.config
    state = self._restore(task)
    self.save_config()
    writer = (
        storage.TensorBoardWriter(self.workdir) if self.is_main else metric_writers.MultiWriter([])
    )
    first_step = task.state_step(state)
    total = task.total_steps
    skip_nonfinite = config.get("skip_nonfinite_steps", False)
    log_every = config.log_every_steps
    checkpoint_every = config.get("checkpoint_every_steps", 0) or total
    logging.info(
        "%s: steps %d..%d on %d device(s) in %d process(es), global batch %d.",
        self.task_name.capitalize(),
        first_step,
        total,
        self.mesh.size,
        jax.process_count(),
        config.global_batch_size,
    )

    batches = task.batches(first_step)
    # A checkpoint written between two logs carries the sums since the last log, so that the
    # next log (and the final loss) averages the same steps as an uninterrupted run.
    window, carried_steps = metric_window.from_record(
        self.checkpointer.log_window(first_step) if self.latest is not None else None
    )
    last_metrics, evaluations, history = {}, {}, []
    done, preempted = first_step, False
    window_start, window_steps = time.time(), 0
    train_start, first_log = time.time(), None
    with _TermSignal() as term:
      for step in range(first_step, total):
        batch = sharding_lib.global_batch(next(batches), self.mesh)
        state, metrics = task.train_step(state, batch)
        if window is not None and set(window["sums"]) != set(metrics):
          window, carried_steps = None, 0  # saved by a version with other metrics
        window = metric_window.accumulate(
            metric_window.empty(metrics) if window is None else window,
            metrics,
            jnp.asarray(step + 1, jnp.int32),
        )
        window_steps += 1
        done = step + 1
        # Every process calls reached_preemption at every step (JAX's sync point requires it).
        preempted = self.checkpointer.reached_preemption(done) or term.received
        last = done == total
        log_now = done % log_every == 0 or last
        eval_now = bool(task.evaluators) and (
            last or (task.eval_every_steps > 0 and done % task.eval_every_steps == 0)
        )
        save_now = done % checkpoint_every == 0 or last or preempted
        fetched = None
        if log_now:
          fetched = dict(jax.device_get(window), steps=window_steps + carried_steps)
        elif (save_now or eval_now) and not skip_nonfinite:
          fetched = {"first_bad": jax.device_get(window["first_bad"])}
        if fetched is not None and not skip_nonfinite:
          self._raise_if_nonfinite(fetched["first_bad"])
        if log_now:
          now = time.time()
          # The ETA counts evaluation time too: wall time per step since the first log (after
          # compiling), or the first window's rate until there is a second log.
          if first_log is None:
            first_log = (done, now)
            wall_per_step = (now - window_start) / max(window_steps, 1)
          else:
            wall_per_step = (now - first_log[1]) / max(done - first_log[0], 1)
          last_metrics = self._log(
              task,
              writer,
              state,
              fetched,
              done,
              total,
              window_steps,
              now - window_start,
              now - train_start,
              (total - done) * wall_per_step,
              skip_nonfinite,
          )
          window, window_start, window_steps, carried_steps = None, time.time(), 0, 0
        if eval_now:
          eval_start = time.time()
          evaluations = self._evaluate(task, state, writer, done)
          history.append({"step": done, **evaluations})
          if task.on_evaluation is not None:
            task.on_evaluation(done, state, evaluations)
          # Evaluation time is not training time: keep it out of the steps/s window.
          window_start += time.time() - eval_start
        if save_now:
          log_window = (
              None
              if window is None
              else metric_window.record(jax.device_get(window), window_steps + carried_steps)
          )
          self.checkpointer.save(done, state, force=preempted, log_window=log_window)
          writer.flush()  # the events so far reach the workdir with each checkpoint
        if preempted and not last:
          logging.warning(
              "SIGTERM: stopped after step %d/%d with a checkpoint; run the same "
              "command again to resume.",
              done,
              total,
          )
          break
    preempted = preempted and done < total

    self.checkpointer.wait_until_finished()
    results = task.finish(state) if (task.finish is not None and not preempted) else {}
    writer.close()
    summary = dict(
        task=self.task_name,
        step=done,
        total_steps=total,
        complete=done == total,
        preempted=preempted,
        metrics=last_metrics,
        evaluations=evaluations,
        evaluation_history=history,
        results=results,
        nonfinite_steps=int(jax.device_get(getattr(state, "nonfinite_steps", 0))),
        workdir=str(self.workdir),
        checkpoint_dir=str(self.checkpointer.directory),
        wall_seconds=time.time() - self.start_time,
    )
    if self.is_main:
      (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

  def _raise_if_nonfinite(self, first_bad: dict) -> None:
    bad = {
        k: int(first_bad[k])
        for k in metric_window.WATCHED
        if int(first_bad[k]) != metric_window.NEVER
    }
    if not bad:
      return
    self.checkpointer.wait_until_finished()  # so that "latest" below is the last complete one
    first = min(bad.values())
    names = " and ".join(k for k, v in bad.items() if v == first)
    later = "".join(f"; {k} first at step {v}" for k, v in bad.items() if v != first)
    skip = (
        ""
        if "skip_nonfinite_steps" not in self.config
        else ", or set config.skip_nonfinite_steps=True to skip such steps"
    )
    raise FloatingPointError(
        f"Non-finite {names} at step {first}{later}. Stopped without checkpointing this state; "
        f"the latest good checkpoint is step {self.checkpointer.latest_step()} in "
        f"{self.checkpointer.directory}. Lower the learning rate{skip}."
    )

  def _log(
      self,
      task: Task,
      writer,
      state,
      fetched,
      done: int,
      total: int,
      window_steps: int,
      window_seconds: float,
      elapsed: float,
      eta: float,
      skip_nonfinite: bool,
  ) -> dict:
    """Writes the window's mean metrics and the progress line; returns the means."""
    count = int(fetched["count"])
    skipped = fetched["steps"] - count  # the window may have begun before a resume
    steps_per_sec = window_steps / max(window_seconds, 1e-9)
    means = {k: float(v) / count if count else float("nan") for k, v in fetched["sums"].items()}
    means["steps_per_sec"] = steps_per_sec
    means["images_per_sec"] = steps_per_sec * self.config.global_batch_size
    if skip_nonfinite:
      means["nonfinite_steps"] = float(jax.device_get(state.nonfinite_steps))
      if skipped:
        first = min(int(v) for v in fetched["first_bad"].values())
        logging.warning(
            "Skipped %d of the last %d step(s) for a non-finite loss or gradient "
            "norm (first at step %d); %d skipped in all.",
            skipped,
            fetched["steps"],
            first,
            int(means["nonfinite_steps"]),
        )
    writer.write_scalars(done, {k: v for k, v in means.items() if np.isfinite(v)})
    logging.info(
        "step %d/%d (%.1f%%) epoch %.1f %s | %.2f steps/s %.0f img/s | elapsed %s ETA %s",
        done,
        total,
        100.0 * done / total,
        done / max(task.steps_per_epoch, 1),
        task.describe(means),
        steps_per_sec,
        means["images_per_sec"],
        format_duration(elapsed),
        format_duration(eta),
    )
    return means

  def _evaluate(self, task: Task, state, writer, step: int) -> dict:
    results = {}
    for evaluator in task.evaluators:
      start = time.time()
      metrics = evaluator.run(state)
      results[evaluator.name] = metrics
      writer.write_scalars(
          step,
          {
              f"{evaluator.name}/{k}": v
              for k, v in metrics.items()
              if isinstance(v, (int, float)) and np.isfinite(v)
          },
      )
      logging.info(
          "step %d %s: %s (%.0f s)",
          step,
          evaluator.name,
          evaluator.describe(metrics),
          time.time() - start,
      )
    return results
