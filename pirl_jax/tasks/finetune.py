"""ISIC 2017 Part 3 evaluation as a task of the training loop: fine-tune or linear-probe a trunk.

config -> labelled splits -> sharded classifier state (trunk from scratch, a PIRL run or a
checkpoint) -> jitted steps -> validation AUCs every `eval_every_*` (the best state is kept in
`best/`) -> the best state scored on validation and test -> predictions CSVs, metrics.json,
roc.png. The loop gives fine-tuning what pretraining has: resume from `checkpoints/`, SIGTERM,
`num_devices`, the non-finite check, a finished run reported instead of re-run.

The network is the trunk, then a 3-way softmax over melanoma / seborrheic keratosis / nevus; the
challenge's two probabilities are the first two (`classifier.py`).
"""

from __future__ import annotations

import json
import math
import pathlib

from absl import logging
import jax
import ml_collections
import numpy as np

from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax import trunk_init
from pirl_jax.data import labelled
from pirl_jax.data import labelled_input
from pirl_jax.data import labelled_views
from pirl_jax.eval import isic
from pirl_jax.tasks import classifier
from pirl_jax.tasks import uda as uda_lib
from pirl_jax.train import loop

TASK_NAME = "fine-tuning"
EVAL_SPLITS = ("validation", "test")
SELECTED_BY = ("validation", "auc_mean")


def training_length(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total steps, validation interval in steps) for a labelled subset of `steps_per_epoch`.

  `num_train_steps` > 0 is taken as given. Otherwise `num_epochs` epochs over the labelled subset,
  but at least `min_train_steps`: 30 epochs of a 10 % subset (200 images) are ~190 steps, too few
  to fit even those 200 images, and a comparison of initialisations in that regime measures
  which one is quickest to start, not which represents the data better.
  """
  if config.num_train_steps > 0:
    total = int(config.num_train_steps)
  else:
    total = max(1, math.ceil(config.num_epochs * steps_per_epoch), int(config.min_train_steps))
  eval_every = (
      int(config.eval_every_steps)
      if config.eval_every_steps > 0
      else max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  )
  return total, min(eval_every, total)


def _score(metrics: dict) -> float:
  auc = metrics[SELECTED_BY[1]]
  return -math.inf if math.isnan(auc) else auc


class BestState:
  """Model selection: the state with the best validation mean AUC so far, kept in `best/`.

  Saved synchronously, then `best.json` records its step and score, so that a resumed run
  continues the selection where it stopped.
  """

  def __init__(self, workdir: pathlib.Path):
    self.directory = workdir / "best"
    self.record_path = workdir / "best.json"
    self.checkpointer = checkpointing.Checkpointer(self.directory, keep=1, async_save=False)
    self.step, self.score, self.metrics = None, -math.inf, None
    if self.record_path.is_file():
      record = json.loads(self.record_path.read_text())
      if record["step"] in self.checkpointer.all_steps():
        self.step, self.score, self.metrics = record["step"], record["score"], record["metrics"]

  @staticmethod
  def exists(workdir: pathlib.Path) -> bool:
    return (workdir / "best.json").is_file()

  def update(self, step: int, state, evaluations: dict) -> None:
    metrics = evaluations[SELECTED_BY[0]]
    if self.step is not None and _score(metrics) <= self.score:
      return
    self.checkpointer.save(step, state, force=True)
    self.step, self.score, self.metrics = step, _score(metrics), metrics
    if jax.process_index() == 0:
      self.record_path.write_text(
          json.dumps({"step": step, "score": self.score, "metrics": metrics}, indent=2)
      )
    logging.info(
        "Step %d has the best validation mean AUC so far (%.4f): kept in %s.",
        step,
        metrics[SELECTED_BY[1]],
        self.directory,
    )

  def restore(self, target):
    return self.checkpointer.restore(self.step, target)

  def close(self) -> None:
    self.checkpointer.close()


def _fingerprint(
    train: labelled.LabelledSplit, positions: np.ndarray, pool: labelled.LabelledSplit | None = None
) -> dict:
  """The labelled subset (and UDA's unlabelled pool, its names prefixed 'unlabelled:')."""
  names = [train.image_ids[i] for i in positions]
  contents = [train.encoded[i] for i in positions]
  if pool is not None:
    names += [f"unlabelled:{name}" for name in pool.image_ids]
    contents += list(pool.encoded)
  return preflight.dataset_fingerprint(len(names), names, contents)


def roc_title(config, init_kind: str) -> str:
  """The ROC plot's title: which data (the embedded synthetic set is not ISIC), from which start,
  which protocol, and the share of the training labels used."""
  data = (
      "synthetic ISIC-layout set"
      if config.data.source == "synthetic"
      else "ISIC 2017"
      if config.data.source == "isic"
      else config.data.source
  )
  return (
      f"{data}, test split: {init_kind} init, {config.protocol}, "
      f"{config.label_fraction:.0%} of the training labels"
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes (or linear-probes) as configured and scores the best validation state on test.

  Writes to `workdir`: predictions_{validation,test}.csv, metrics.json, roc.png, config.json,
  summary.json, TensorBoard scalars, `checkpoints/` (the latest state, for resuming) and `best/`
  (the state with the best validation mean AUC).

  Returns:
    The run's summary; `summary['results']` holds the metrics per split and the selection.
  """
  configuration.validate_finetune_config(config)
  init = trunk_init.resolve_init(config.init.checkpoint, config.init.kind, config.init.step)
  config = trunk_init.inherit_trunk(config, init)
  model = classifier.create_model(config)
  size = config.augment.image_size
  if init.kind != "scratch":
    trunk_init.check_trunk(
        init,
        trunk_init.abstract_trunk_variables(model.trunk, size),
        f"config.model.trunk={config.model.trunk!r} at config.model.width_multiplier="
        f"{config.model.width_multiplier!r}",
    )
  probe = config.protocol == "linear"
  with loop.Run(config, workdir, TASK_NAME) as run:
    if run.completed is not None:
      return dict(run.completed, already_complete=True)
    mesh = run.mesh
    configuration.check_device_count(config, mesh.size, ("global_batch_size", "eval_batch_size"))
    logging.info(
        "Evaluation protocol %s, init %s%s, label_fraction %g, seed %d, trunk %s x%g.",
        config.protocol,
        init.kind,
        (
            f" from {init.item_dir} (step {init.step})"
            if init.item_dir
            else f" from {init.checkpoint}"
            if init.checkpoint
            else ""
        ),
        config.label_fraction,
        config.seed,
        config.model.trunk,
        config.model.width_multiplier,
    )

    # The state's shapes depend neither on the data nor on the schedule: check the disk before
    # any image is read. Besides checkpoints/, best/ holds the best state and its replacement.
    abstract_state = jax.eval_shape(
        lambda: classifier.create_state_variables(
            model, classifier.create_optimizer(config.optim, 1, probe)[0], size
        )
    )
    run.check_disk(abstract_state, extra_copies=1 if BestState.exists(run.workdir) else 2)

    splits = {s: labelled.load_split(config.data, s) for s in ("train",) + EVAL_SPLITS}
    train = splits["train"]
    positions = labelled.stratified_subset(train.label, config.label_fraction, config.seed)
    logging.info(
        "Training on %s of %s.", labelled.summarize(train, positions), labelled.summarize(train)
    )
    use_uda = bool(config.get("uda") and config.uda.enabled)
    pool = None
    if use_uda:
      pool = labelled.unlabelled_pool(
          config.data,
          config.uda.unlabelled_path,
          train,
          positions,
          [splits[s] for s in EVAL_SPLITS],
      )
      logging.info(
          "UDA: %d unlabelled images (%d training images outside the labelled subset, "
          "%d from unlabelled folders), %d per step.",
          len(pool),
          len(train) - len(positions),
          len(pool) - (len(train) - len(positions)),
          config.global_batch_size * config.uda.unlabelled_ratio,
      )
    run.check_dataset(_fingerprint(train, positions, pool))
    view = labelled_views.augment_config(config.augment)
    data_options = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_parallel_calls=config.data.num_parallel_calls,
        prefetch_batches=config.data.prefetch_batches,
    )
    train_input = labelled_input.TrainInput(
        train,
        positions,
        view,
        seed=config.seed,
        global_batch_size=config.global_batch_size,
        balanced=config.loss.class_balance == "sampling",
        **data_options,
    )
    batches = train_input.iterate
    if use_uda:
      unlabelled_input = labelled_input.UnlabelledInput(
          pool,
          view,
          labelled_views.StrongAugmentConfig.from_config(config.uda),
          seed=config.seed,
          global_batch_size=config.global_batch_size * config.uda.unlabelled_ratio,
          **data_options,
      )

      def batches(start_step: int = 0):
        for labelled_batch, unlabelled_batch in zip(
            train_input.iterate(start_step), unlabelled_input.iterate(start_step)
        ):
          yield {**labelled_batch, **unlabelled_batch}

    if config.loss.class_balance == "weighted":
      weights = labelled.class_weights(train.label[positions])
    else:
      weights = np.ones(labelled.NUM_CLASSES, np.float32)
    steps_per_epoch = train_input.steps_per_epoch
    total, eval_every = training_length(config, steps_per_epoch)
    logging.info(
        "%d steps/epoch, %d steps in all, validation every %d steps; class weights %s.",
        steps_per_epoch,
        total,
        eval_every,
        np.round(weights, 3).tolist(),
    )

    tx, schedule = classifier.create_optimizer(config.optim, total, probe)
    state, shardings = classifier.create_state(model, tx, size, mesh, config.seed)
    if init.kind != "scratch" and run.latest is None:
      restored = trunk_init.restore_trunk(
          init,
          {
              "params": state.params[trunk_init.TRUNK],
              "batch_stats": state.batch_stats[trunk_init.TRUNK],
          },
          sharding=sharding_lib.replicated(mesh),
      )
      # The optimizer state (momentum) is still zeros, so it does not depend on the trunk.
      state = state.replace(
          params=dict(state.params, trunk=restored["params"]),
          batch_stats=dict(state.batch_stats, trunk=restored["batch_stats"]),
      )
      logging.info(
          "Restored the trunk's parameters and batch statistics from %s.",
          init.item_dir or init.checkpoint,
      )

    eval_step = classifier.jit_eval_step(mesh, shardings, model)
    evaluators = {
        s: isic.IsicEvaluator(
            splits[s],
            view,
            eval_step,
            mesh,
            eval_batch_size=config.eval_batch_size,
            num_parallel_calls=config.data.num_parallel_calls,
        )
        for s in EVAL_SPLITS
    }
    best = BestState(run.workdir)

    def finish(final_state) -> dict:
      target = checkpointing.abstract_like(final_state, shardings)
      selected = best.restore(target)
      logging.info(
          "Selected the state of step %d (validation mean AUC %.4f).",
          best.step,
          best.metrics["auc_mean"],
      )
      title = roc_title(config, init.kind)
      results = {
          name: evaluators[name].write_outputs(selected, run.workdir, title) for name in EVAL_SPLITS
      }
      outcome = dict(
          results,
          selected=dict(
              step=best.step,
              epoch=best.step / steps_per_epoch,
              validation_auc_mean=best.metrics["auc_mean"],
          ),
          protocol=config.protocol,
          init=dict(
              kind=init.kind, checkpoint=init.checkpoint, item_dir=init.item_dir, step=init.step
          ),
          trunk=dict(name=config.model.trunk, width_multiplier=config.model.width_multiplier),
          label_fraction=config.label_fraction,
          seed=config.seed,
          num_train_images=int(len(positions)),
          total_steps=total,
          uda=(dict(config.uda.to_dict(), num_unlabelled_images=len(pool)) if use_uda else None),
      )
      if jax.process_index() == 0:
        (run.workdir / "metrics.json").write_text(json.dumps(outcome, indent=2))
      return outcome

    def describe(means: dict) -> str:
      chosen = (
          f"best val mean AUC {best.metrics['auc_mean']:.4f} @ {best.step}"
          if best.step is not None
          else "no validation yet"
      )
      consistency = (
          f" (supervised {means['supervised_loss']:.4f}, consistency "
          f"{means['consistency_loss']:.4f}, confident "
          f"{means['confident_fraction']:.2f}, TSA kept "
          f"{means['tsa_kept_fraction']:.2f})"
          if use_uda
          else ""
      )
      return (
          f"loss {means['loss']:.4f}{consistency} acc {means['accuracy']:.3f} lr "
          f"{means['learning_rate']:.4g} | {chosen}"
      )

    task = loop.Task(
        state=state,
        shardings=shardings,
        train_step=classifier.jit_train_step(
            mesh,
            shardings,
            model=model,
            tx=tx,
            schedule=schedule,
            class_weights=weights,
            uda=uda_lib.UdaSettings.from_config(config.uda) if use_uda else None,
            total_steps=total,
        ),
        batches=batches,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        describe=describe,
        evaluators=[evaluators["validation"]],
        eval_every_steps=eval_every,
        on_evaluation=best.update,
        finish=finish,
    )
    try:
      return run.train(task)
    finally:
      best.close()


def format_summary(summary: dict) -> str:
  """A few lines for the terminal: test and validation AUCs, where the outputs are."""
  results = summary.get("results") or {}
  if summary.get("preempted"):
    return (
        f"\nFine-tuning stopped by SIGTERM at step {summary['step']} of "
        f"{summary['total_steps']}, checkpoint written to {summary['checkpoint_dir']}.\n"
        "  Run the same command again to resume."
    )
  when = (
      "is already complete; nothing was changed"
      if summary.get("already_complete")
      else f"finished in {summary['wall_seconds'] / 60:.1f} min"
  )
  lines = [
      f"\nEvaluation ({results['protocol']}, init {results['init']['kind']}, "
      f"label_fraction {results['label_fraction']:g}, seed {results['seed']}) {when}; "
      f"selected step {results['selected']['step']} by validation mean AUC."
  ]
  for name in EVAL_SPLITS:
    m = results.get(name)
    if m:
      lines.append(
          f"  {name:<10} AUC melanoma {m['auc_melanoma']:.4f}  seborrheic keratosis "
          f"{m['auc_seborrheic_keratosis']:.4f}  mean {m['auc_mean']:.4f}  "
          f"accuracy {m['accuracy']:.3f}"
      )
  lines.append(
      f"  outputs: {summary['workdir']}/{{predictions_validation.csv, "
      "predictions_test.csv, metrics.json, roc.png}, best/, checkpoints/"
  )
  return "\n".join(lines)
