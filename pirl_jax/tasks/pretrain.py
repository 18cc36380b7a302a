"""Pretraining (PIRL, or another method of `pirl_jax.methods`) as a task of the training loop:
data -> sharded state -> jitted steps.

The loop (`pirl_jax.train.loop`) does what every run needs (preflight, resume, SIGTERM,
checkpoints, logs, evaluators); this module supplies the PIRL pieces: the source and its two
views, the train state with its row-sharded memory bank, the step, and the frozen-trunk probes
(kNN and linear) that give every run a learning curve.
"""

from __future__ import annotations

from absl import logging

from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import methods
from pirl_jax import preflight
from pirl_jax.data import pipeline
from pirl_jax.data import sources
from pirl_jax.eval import probe
from pirl_jax.train import loop
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib

TASK_NAME = "pretraining"


def describe(means: dict) -> str:
  """The method's part of the progress line."""
  if "accuracy" in means:  # a covariant pretext: a classifier
    return (
        f"loss {means['loss']:.4f} accuracy {means['accuracy']:.3f} "
        f"lr {means['learning_rate']:.4g}"
    )
  terms = ""
  for name in ("jigsaw", "rotated"):
    if f"loss_{name}" in means:
      terms = f" [{name} {means[f'loss_{name}']:.4f} image {means['loss_image']:.4f}]"
  return (
      f"loss {means['loss']:.4f}{terms} pos {means['positive_similarity']:.3f} neg "
      f"{means['negative_similarity']:.3f} lr {means['learning_rate']:.4g}"
  )


def _dataset_fingerprint(source) -> dict:
  """The image behind each memory-bank row, as `Run.check_dataset` compares it on resume."""
  if isinstance(source, sources.InMemorySource):
    return preflight.dataset_fingerprint(source.num_examples, source.image_names, source.encoded)
  return preflight.dataset_fingerprint(source.num_examples, [])


def _check_bank_rows(num_examples: int, directory):
  def check(saved_shapes: dict) -> None:
    saved_rows = saved_shapes["bank"][0]
    if saved_rows < num_examples:
      raise checkpointing.CheckpointMismatchError(
          f"The checkpoints in {directory} have a memory bank of {saved_rows} rows but the "
          f"dataset has {num_examples} images: they belong to another dataset."
      )

  return check


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains PIRL as configured, resuming from `workdir` if it holds a checkpoint.

  Returns:
    The run's summary (`loop.Run.train`), with `already_complete=True` and nothing changed when
    this config already ran to the end in `workdir`.

  Raises:
    user_errors.UserError (config, data, preflight): before anything is compiled.
    FloatingPointError: a non-finite loss or gradient norm (unless config.skip_nonfinite_steps).
  """
  configuration.validate_pretrain_config(config)
  with loop.Run(config, workdir, TASK_NAME) as run:
    if run.completed is not None:
      return dict(run.completed, already_complete=True)
    configuration.check_device_count(config, run.mesh.size)

    source = sources.create_source(config.data)
    num_examples = source.num_examples
    configuration.validate_dataset_size(config, num_examples)
    schedule = configuration.resolve_schedule(config, num_examples)
    logging.info(
        "Data: %s, %d images, %d steps/epoch, %d steps in all.",
        source.name,
        num_examples,
        schedule.steps_per_epoch,
        schedule.total_steps,
    )
    if getattr(source, "skipped", None):
      logging.warning("%d bad images were skipped (data.on_bad_image='skip').", len(source.skipped))
    run.check_dataset(_dataset_fingerprint(source))

    model = state_lib.create_model(config.model, run.mesh.size, config.jigsaw_permutations)
    tx, lr_schedule = state_lib.create_optimizer(
        config.optim, schedule.learning_rate, schedule.warmup_steps, schedule.total_steps
    )
    abstract_state, _ = state_lib.abstract_train_state(config, model, tx, num_examples, run.mesh)
    run.check_disk(abstract_state)
    evaluators = probe.evaluators_for_pretraining(config, model, run.mesh)

    data = pipeline.PretrainInput(
        source,
        pipeline.view_config(config.data.views),
        seed=config.seed,
        global_batch_size=config.global_batch_size,
        process_index=run.process_index,
        process_count=run.process_count,
        num_parallel_calls=config.data.num_parallel_calls,
        prefetch_batches=config.data.prefetch_batches,
        method=config.method,
        jigsaw_permutations=config.jigsaw_permutations,
    )
    state, shardings = state_lib.create_train_state(
        config, model, tx, num_examples, run.mesh, config.seed
    )
    train_step = step_lib.jit_train_step(
        run.mesh,
        shardings,
        model=model,
        tx=tx,
        schedule=lr_schedule,
        loss_cfg=config.loss,
        bank_momentum=config.memory_bank.momentum,
        num_examples=num_examples,
        score_chunk_size=config.memory_bank.score_chunk_size,
        skip_nonfinite=config.skip_nonfinite_steps,
        method=config.method,
        running_stats_from_images=config.model.bn_running_stats == "images",
        moco_cfg=config.moco,
        simclr_cfg=config.simclr,
        ema_decay=state_lib.ema_decay(config),
        shuffle_keys=config.moco.shuffle_bn and config.model.batch_norm == "per_device",
    )
    task = loop.Task(
        state=state,
        shardings=shardings,
        train_step=train_step,
        batches=data.iterate,
        total_steps=schedule.total_steps,
        steps_per_epoch=schedule.steps_per_epoch,
        describe=describe,
        evaluators=evaluators,
        eval_every_steps=config.eval_every_steps,
        resize=("bank", "key_queue"),
        derive=state_lib.fields_of_earlier_version(config, abstract_state),
        check_restorable=(
            _check_bank_rows(num_examples, run.checkpointer.directory)
            if methods.uses_bank(config.method)
            else None
        ),
    )
    return run.train(task)


def next_steps(config, summary: dict) -> str:
  """What to run next on the pretrained trunk, on the data it was pretrained on."""
  workdir = summary["workdir"]
  data = config.data
  probe_cmd = f"python -m pirl_jax.commands.probe --checkpoint={workdir}"
  # A smoke run (the tiny preset) is followed by the tiny fine-tuning: the same small trunk.
  tiny = config.get("name") == "pirl-tiny"
  # With a tenth of the labels, as the README's fine-tuning numbers (where labels are scarce is
  # where pretraining counts); the tiny preset sets its own few steps.
  labels = "" if tiny else "--config.label_fraction=0.1 "
  if data.source == "synthetic":
    scarce = "" if tiny else ", with 10% of the labels"
    return (
        f"  fine-tune on the embedded ISIC-layout set from it{scarce}:\n"
        f"    python main.py --config=configs/finetune_isic.py{':tiny' if tiny else ''} "
        f"--config.init.checkpoint={workdir} {labels}--workdir={workdir}-finetune\n"
        f"  probe its frozen features (kNN and linear, vs a random trunk):\n    {probe_cmd}"
    )
  if data.source == "isic":
    scarce = "" if tiny else ", with 10% of the labels"
    return (
        f"  fine-tune on the same ISIC 2017 data from it{scarce}:\n"
        "    python main.py --config=configs/finetune_isic.py"
        f"{':tiny --config.data.source=isic' if tiny else ':isic'} "
        f"--config.data.path={data.path} --config.init.checkpoint={workdir} "
        f"{labels}--workdir={workdir}-finetune\n"
        f"  probe its frozen features (kNN and linear, vs a random trunk):\n"
        f"    {probe_cmd} --data=isic:{data.path}"
    )
  if data.source == "folder":
    return (
        "  probe its frozen features on your labelled images (kNN and linear, vs a random "
        "trunk):\n"
        f"    {probe_cmd} --data={data.path} --labels=LABELS.csv   "
        "# LABELS.csv: lines 'file,label' (file relative to --data)"
    )
  return (
      "  probe its frozen features on a labelled tfds dataset (kNN and linear, vs a random "
      f"trunk):\n    {probe_cmd} --data=tfds:{data.tfds_name} "
      f"--tfds_data_dir={data.tfds_data_dir or 'DIR'}"
  )
