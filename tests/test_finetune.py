"""ISIC 2017 evaluation: label subsets, pipelines, trunk restore, probe/fine-tune steps, BN at eval,
resuming, config errors, outputs recomputed from the written files, and the CLI end to end from
the session's tiny pretraining run (`tiny_pretraining` in conftest.py)."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from configs import finetune_isic
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
from pirl_jax.tasks import finetune

import helpers  # tests/helpers.py
import tree_arrays

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set(config, overrides):
  config.update_from_flattened_dict(overrides)
  return config


_tiny = helpers.tiny_finetuning_config


def _no_data(*args, **kwargs):
  raise AssertionError("the data was read before the preflight checks")


@pytest.fixture(scope="module")
def splits(small_isic_root, shared_cache_dir):
  config = _tiny(small_isic_root, shared_cache_dir)
  return {s: labelled.load_split(config.data, s) for s in ("train", "validation")}


def _trunk_arrays(item_dir, like):
  """The checkpoint's trunk params and batch stats as host arrays, in the structure of `like`
  (a state or a checkpoint's `array_metadata`)."""
  restored = checkpointing.restore_subtrees(
      item_dir,
      {
          ("params", "trunk"): like["params"]["trunk"],
          ("batch_stats", "trunk"): like["batch_stats"]["trunk"],
      },
  )
  return restored[("params", "trunk")], restored[("batch_stats", "trunk")]


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _trees_differ(a, b) -> bool:
  return any(
      jax.tree.leaves(
          jax.tree.map(lambda x, y: not np.array_equal(np.asarray(x), np.asarray(y)), a, b)
      )
  )


def _with_trunk(state, init, mesh):
  """`state` with the trunk of `init` restored, replicated on `mesh` (as the run does)."""
  restored = trunk_init.restore_trunk(
      init,
      {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]},
      sharding=sharding_lib.replicated(mesh),
  )
  return state.replace(
      params=dict(state.params, trunk=restored["params"]),
      batch_stats=dict(state.batch_stats, trunk=restored["batch_stats"]),
  )


def _build(config, mesh, total_steps=4, init=None):
  """(model, tx, schedule, state, shardings), the trunk restored from `init` if given."""
  model = classifier.create_model(config)
  tx, schedule = classifier.create_optimizer(
      config.optim, total_steps, probe=config.protocol == "linear"
  )
  state, shardings = classifier.create_state(
      model, tx, config.augment.image_size, mesh, config.seed
  )
  if init is not None:
    state = _with_trunk(state, init, mesh)
  return model, tx, schedule, state, shardings


# Compiling is most of this file's time (the classifier's initialiser alone takes 10-20 s of CPU),
# so the tests build their states and steps as the runs build theirs: the tiny preset's 4 steps,
# the class weights of its training set, the linear probe on one device like the CLI run. The
# persistent compilation cache (conftest.py) then compiles each once for the tests, the in-process
# runs and the CLI runs (which keep the 8 fake devices and use one of them).


@pytest.fixture(scope="module")
def class_weights(splits):
  """The weights a tiny-preset run (all labels) trains with."""
  return labelled.class_weights(splits["train"].label)


@pytest.fixture(scope="module")
def built(tiny_pretraining, small_isic_root, shared_cache_dir):
  """The tiny fine-tune model on all 8 devices: scratch state and the PIRL-initialised one."""
  config = _tiny(small_isic_root, shared_cache_dir)
  mesh = sharding_lib.create_mesh()
  model, tx, schedule, scratch, shardings = _build(config, mesh)
  init = trunk_init.resolve_init(str(tiny_pretraining.workdir))
  restored = _with_trunk(scratch, init, mesh)
  return dict(
      config=config,
      mesh=mesh,
      model=model,
      tx=tx,
      schedule=schedule,
      scratch=scratch,
      restored=restored,
      shardings=shardings,
      init=init,
  )


def _random_batch(config, seed, batch_size=None):
  rng = np.random.default_rng(seed)
  b, s = batch_size or config.global_batch_size, config.augment.image_size
  return {
      "image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
      "label": rng.integers(0, 3, size=b).astype(np.int32),
  }


# --- Label subsets and sampling -------------------------------------------------------------------


def test_label_fraction_subsets_are_stratified_and_deterministic():
  labels = np.repeat([0, 1, 2], [374, 254, 1372])
  labels = np.random.default_rng(1).permutation(labels)
  subset = labelled.stratified_subset(labels, 0.1, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [37, 25, 137])
  np.testing.assert_array_equal(subset, labelled.stratified_subset(labels, 0.1, seed=0))
  assert not np.array_equal(subset, labelled.stratified_subset(labels, 0.1, seed=1))
  # Nested: a smaller fraction of the same seed is inside the larger one.
  assert set(labelled.stratified_subset(labels, 0.01, seed=0)) <= set(subset)
  # Every class keeps at least one example; fraction 1 keeps all.
  np.testing.assert_array_equal(
      np.bincount(labels[labelled.stratified_subset(labels, 1e-4, 0)]), [1, 1, 1]
  )
  np.testing.assert_array_equal(labelled.stratified_subset(labels, 1.0, 3), np.arange(2000))
  with pytest.raises(ValueError, match=r"config\.label_fraction=0"):
    labelled.stratified_subset(labels, 0.0, 0)


def test_class_weights_balance_the_classes():
  labels = np.repeat([0, 1, 2], [10, 30, 60])
  weights = labelled.class_weights(labels)
  totals = np.bincount(labels, weights=weights[labels])
  np.testing.assert_allclose(totals, totals[0])
  np.testing.assert_allclose(weights.dot(np.bincount(labels)), len(labels), rtol=1e-6)


def test_balanced_sampling_evens_out_the_classes(splits):
  train = splits["train"]
  cfg = labelled_views.AugmentConfig(image_size=32)
  data = labelled_input.TrainInput(
      train, np.arange(len(train)), cfg, seed=0, global_batch_size=16, balanced=True
  )
  drawn = np.concatenate([data.epoch_order(e).ravel() for e in range(30)])
  fractions = np.bincount(train.label[drawn], minlength=3) / len(drawn)
  np.testing.assert_allclose(fractions, 1 / 3, atol=0.05)


# --- Pipelines ------------------------------------------------------------------------------------


def test_train_input_is_deterministic_and_visits_the_subset(splits):
  train = splits["train"]
  positions = labelled.stratified_subset(train.label, 0.5, seed=0)
  cfg = labelled_views.AugmentConfig(image_size=32, rotation_degrees=30.0)
  kwargs = dict(seed=0, global_batch_size=16)
  data = labelled_input.TrainInput(train, positions, cfg, **kwargs)
  order = data.epoch_order(0)
  assert order.shape == (data.steps_per_epoch, 16)
  assert set(order.ravel()) == set(positions)  # every labelled example, nothing else

  first = next(data.epoch_dataset(0).as_numpy_iterator())
  again = next(labelled_input.TrainInput(train, positions, cfg, **kwargs).iterate(0))
  np.testing.assert_array_equal(first["image"], again["image"])
  np.testing.assert_array_equal(first["label"], train.label[first["index"]])
  assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.float32
  other_epoch = next(data.epoch_dataset(1).as_numpy_iterator())
  assert not np.array_equal(first["image"], other_epoch["image"])
  # Two processes each take their half of the same global batch.
  halves = [
      next(
          labelled_input.TrainInput(
              train, positions, cfg, process_index=p, process_count=2, **kwargs
          ).iterate(0)
      )
      for p in (0, 1)
  ]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), first["image"])


def test_eval_input_is_deterministic_and_padded(splits):
  val = splits["validation"]  # 30 images
  cfg = labelled_views.AugmentConfig(image_size=32)
  data = labelled_input.EvalInput(val, cfg, global_batch_size=16)
  batches = list(data.batches())
  again = list(data.batches())
  assert len(batches) == 2
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(32) < 30)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:30], val.label)


def test_tfds_source_gives_the_same_split_as_the_files(tmp_path):
  import tensorflow_datasets as tfds
  import isic_fixtures
  import pirl_jax.data.tfds_isic2017  # noqa: F401  (registers 'isic2017')

  manual = isic_fixtures.write_tree(tmp_path / "manual", "zip")
  tfds.builder("isic2017/resized_256", data_dir=str(tmp_path / "tfds")).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
  )
  common = {"data.min_image_side": 8, "data.cache_dir": str(tmp_path / "cache")}
  from_tfds = _set(
      finetune_isic.get_config("tiny").data,
      {
          "source": "tfds",
          "tfds_data_dir": str(tmp_path / "tfds"),
          **{k.split(".")[1]: v for k, v in common.items()},
      },
  )
  from_files = _set(
      finetune_isic.get_config("tiny").data,
      {"source": "isic", "path": str(manual), **{k.split(".")[1]: v for k, v in common.items()}},
  )
  for split in ("train", "test"):
    a, b = labelled.load_split(from_tfds, split), labelled.load_split(from_files, split)
    assert a.image_ids == b.image_ids == sorted(i for i, *_ in isic_fixtures.ROWS[split])
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.melanoma, b.melanoma)
    assert a.csv_path is None and b.csv_path.endswith("_Part3_GroundTruth.csv")


# --- Restore, steps, BatchNorm --------------------------------------------------------------------


def test_restoring_a_pretraining_checkpoint_sets_the_trunk(built, tiny_pretraining):
  init, scratch, restored = built["init"], built["scratch"], built["restored"]
  # Inferred from the workdir's config.json; the latest step.
  assert init.kind == "pirl" and init.step == tiny_pretraining.summary["step"] == 4
  params, stats = _trunk_arrays(
      init.item_dir, {"params": scratch.params, "batch_stats": scratch.batch_stats}
  )
  _assert_trees_equal(restored.params["trunk"], params)
  _assert_trees_equal(restored.batch_stats["trunk"], stats)
  assert _trees_differ(restored.params["trunk"], scratch.params["trunk"])
  assert _trees_differ(restored.batch_stats["trunk"], scratch.batch_stats["trunk"])
  _assert_trees_equal(restored.params["head"], scratch.params["head"])  # same seed, same head
  # Restored onto the current mesh (8 devices; the CLI tests restore it onto 1), replicated.
  leaf = jax.tree.leaves(restored.params["trunk"])[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_architecture_mismatch_names_the_parameter(
    tiny_pretraining, small_isic_root, shared_cache_dir, tmp_path, monkeypatch
):
  config = _tiny(
      small_isic_root,
      shared_cache_dir,
      **{
          "model.trunk": "resnet_tiny",
          "model.width_multiplier": 2.0,
          "init.checkpoint": str(tiny_pretraining.workdir),
          "init.inherit_trunk": False,
      },
  )
  init = trunk_init.resolve_init(str(tiny_pretraining.workdir))
  variables = trunk_init.abstract_trunk_variables(classifier.create_model(config).trunk, 32)
  with pytest.raises(
      checkpointing.CheckpointMismatchError,
      match=r"params/trunk/BasicBlock_0/Conv_0/kernel: checkpoint shape "
      r"\(3, 3, 8, 8\) != model shape \(3, 3, 16, 16\)",
  ):
    trunk_init.restore_trunk(init, variables)
  # The run checks before reading any data, and names the config fields too.
  monkeypatch.setattr(labelled, "load_split", _no_data)
  with pytest.raises(
      checkpointing.CheckpointMismatchError,
      match=r"(?s)BasicBlock_0/Conv_0/kernel.*config\.model\.width_multiplier=2\.0.*"
      r"model\.trunk='resnet_tiny', model\.width_multiplier=1\.0",
  ):
    finetune.train_and_evaluate(config, str(tmp_path / "run"))
  # With init.inherit_trunk (the default) the run takes the checkpoint's own trunk instead.
  inherited = trunk_init.inherit_trunk(_set(config, {"init.inherit_trunk": True}), init)
  assert inherited.model.width_multiplier == 1.0 and inherited.init.kind == "pirl"


def test_linear_probe_leaves_the_trunk_untouched(built, class_weights):
  config = _set(finetune_isic.get_config("tiny"), {"protocol": "linear"})
  mesh = sharding_lib.create_mesh(jax.devices()[:1])  # as the CLI run (num_devices=1)
  model, tx, schedule, state, shardings = _build(config, mesh, init=built["init"])
  before = jax.device_get(state)
  step = classifier.jit_train_step(
      mesh, shardings, model=model, tx=tx, schedule=schedule, class_weights=class_weights
  )
  for i in range(3):
    state, metrics = step(state, sharding_lib.global_batch(_random_batch(config, i), mesh))
  after = jax.device_get(state)
  assert np.isfinite(metrics["loss"])
  _assert_trees_equal(after.params["trunk"], before.params["trunk"])
  _assert_trees_equal(after.batch_stats["trunk"], before.batch_stats["trunk"])
  assert _trees_differ(after.params["head"], before.params["head"])
  assert _trees_differ(after.batch_stats["head_norm"], before.batch_stats["head_norm"])
  # No optimizer state (momentum) is kept for the frozen trunk.
  trunk_size = sum(x.size for x in jax.tree.leaves(after.params["trunk"]))
  assert sum(np.size(x) for x in jax.tree.leaves(after.opt_state)) < trunk_size


def test_fine_tuning_trains_the_trunk_and_eight_devices_equal_one(built, class_weights):
  config, initial = built["config"], jax.device_get(built["restored"])
  assert len(set(class_weights.tolist())) == 3  # a weighted loss
  kwargs = dict(
      model=built["model"], tx=built["tx"], schedule=built["schedule"], class_weights=class_weights
  )
  results = []
  for num_devices in (1, 8):
    mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
    shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), built["shardings"])
    state = jax.device_put(initial, shardings)
    step = classifier.jit_train_step(mesh, shardings, **kwargs)
    for i in range(2):
      state, _ = step(state, sharding_lib.global_batch(_random_batch(config, i), mesh))
    results.append(jax.device_get(state))
  one, eight = results
  assert _trees_differ(one.params["trunk"], initial.params["trunk"])
  assert _trees_differ(one.batch_stats["trunk"], initial.batch_stats["trunk"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one.params, eight.params)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one.batch_stats, eight.batch_stats
  )


def test_batchnorm_statistics_do_not_change_during_evaluation(built, splits):
  config, mesh, state = built["config"], built["mesh"], built["restored"]
  before = jax.device_get(state)
  evaluator = isic.IsicEvaluator(
      splits["validation"],
      labelled_views.augment_config(config.augment),
      classifier.jit_eval_step(mesh, built["shardings"], built["model"]),
      mesh,
      eval_batch_size=config.eval_batch_size,
  )
  probs = evaluator.predict(state)
  metrics = evaluator.run(state)
  _assert_trees_equal(jax.device_get(state), before)
  assert probs.shape == (30, 3)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert 0.0 <= metrics["auc_melanoma"] <= 1.0 and metrics["num_images"] == 30
  # Inference-mode BatchNorm: an image's output does not depend on the rest of its batch.
  p_eval = classifier.jit_eval_step(mesh, built["shardings"], built["model"])
  images = _random_batch(config, 0)["image"]
  others = np.concatenate([images[:1], -images[1:]])
  first = np.asarray(p_eval(state, sharding_lib.global_batch({"image": images}, mesh)))
  second = np.asarray(p_eval(state, sharding_lib.global_batch({"image": others}, mesh)))
  np.testing.assert_allclose(first[0], second[0], rtol=1e-5, atol=1e-6)


def test_learning_rate_steps_at_8_16_24_of_28_epochs():
  optim = finetune_isic.get_config("linear").optim
  schedule = classifier.lr_schedule(optim, total_steps=280)
  lr = optim.learning_rate
  np.testing.assert_allclose(
      [schedule(s) for s in (0, 79, 80, 159, 160, 239, 240, 279)],
      [lr, lr, lr / 10, lr / 10, lr / 100, lr / 100, lr / 1000, lr / 1000],
      rtol=1e-6,
  )


def test_small_label_fractions_train_at_least_min_train_steps():
  config = finetune_isic.get_config("default")
  # All labels: 2000 images / batch 32 = 63 steps per epoch, 30 epochs.
  assert finetune.training_length(config, 63) == (1890, 50)
  # 10 %: 30 epochs of 7 steps would be 210 steps; the floor makes it 800.
  assert finetune.training_length(config, 7) == (config.min_train_steps, 50)
  assert config.min_train_steps == 800
  # num_train_steps overrides both; validation never less often than once in the run.
  fresh = lambda overrides: _set(finetune_isic.get_config("default"), overrides)  # noqa: E731
  assert finetune.training_length(fresh({"num_train_steps": 30}), 7) == (30, 30)
  # eval_every_steps <= 0 falls back to eval_every_epochs.
  assert finetune.training_length(fresh({"eval_every_steps": -1}), 7) == (800, 7)
  with pytest.raises(configuration.ConfigError, match=r"config\.min_train_steps=-1"):
    configuration.validate_finetune_config(
        _set(finetune_isic.get_config("tiny"), {"min_train_steps": -1})
    )


# --- Config errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"label_fraction": 0.0}, r"config\.label_fraction=0\.0 must be in \(0, 1\]"),
        ({"init.kind": "pirl"}, r"config\.init\.kind='pirl' needs config\.init\.checkpoint"),
        ({"protocol": "probe"}, r"config\.protocol='probe' is not one of"),
        (
            {"optim.weight_decay": -1e-4},
            r"config\.optim\.weight_decay=-0\.0001 must be a number >= 0",
        ),
        (
            {"optim.learning_rate": float("nan")},
            r"config\.optim\.learning_rate=nan must be a positive number",
        ),
        ({"seed": -1}, r"config\.seed=-1 must be an integer >= 0"),
        ({"data.max_image_side": 0}, r"config\.data\.max_image_side=0 must be a positive number"),
        ({"data.num_parallel_calls": 0}, r"config\.data\.num_parallel_calls=0 must be -1"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
  config = _set(finetune_isic.get_config("tiny"), overrides)
  with pytest.raises(configuration.ConfigError, match=message):
    configuration.validate_finetune_config(config)


def test_batch_sizes_must_divide_over_the_devices(
    tmp_path, small_isic_root, shared_cache_dir, monkeypatch
):
  config = _set(finetune_isic.get_config("tiny"), {"eval_batch_size": 12})
  configuration.validate_finetune_config(config)  # fine until the device count is known
  with pytest.raises(
      configuration.ConfigError,
      match=r"config\.eval_batch_size=12 must be divisible by the number of " r"devices \(8\)",
  ):
    configuration.check_device_count(config, 8, ("global_batch_size", "eval_batch_size"))
  configuration.check_device_count(config, 4, ("global_batch_size", "eval_batch_size"))
  # The run checks it on its own mesh (the 8 test devices) before reading any data.
  monkeypatch.setattr(labelled, "load_split", _no_data)
  with pytest.raises(configuration.ConfigError, match=r"config\.eval_batch_size=12"):
    finetune.train_and_evaluate(
        _tiny(small_isic_root, shared_cache_dir, eval_batch_size=12), str(tmp_path / "run")
    )


def test_a_missing_checkpoint_names_the_field():
  with pytest.raises(FileNotFoundError, match=r"config\.init\.checkpoint='/nonexistent'"):
    trunk_init.resolve_init("/nonexistent")


# --- Resuming and preflight (in-process runs) -----------------------------------------------------


def _outputs(workdir):
  """What a finished run leaves, comparable across workdirs: the predictions CSVs (bytes),
  best.json, metrics.json without its paths, and the arrays of the selected and the last state."""
  metrics = json.loads((workdir / "metrics.json").read_text())
  for split in finetune.EVAL_SPLITS:
    for key in ("ground_truth_csv", "predictions_csv"):
      metrics[split].pop(key)
  best_item, best_step = checkpointing.resolve_checkpoint(workdir / "best")
  last_item, last_step = checkpointing.resolve_checkpoint(workdir / "checkpoints")
  return dict(
      csv={s: (workdir / f"predictions_{s}.csv").read_bytes() for s in finetune.EVAL_SPLITS},
      best_json=json.loads((workdir / "best.json").read_text()),
      metrics=metrics,
      best_step=best_step,
      last_step=last_step,
      best_state=tree_arrays.flat(checkpointing.load_arrays(best_item)),
      last_state=tree_arrays.flat(checkpointing.load_arrays(last_item)),
  )


def test_fine_tuning_resumes_after_sigterm_with_the_same_result(
    tmp_path, tiny_finetuning, monkeypatch
):
  """SIGTERM after step 2 stops the run at step 3 with a checkpoint; the same call resumes it,
  and the selected state and every output equal those of the uninterrupted session run, bit
  for bit."""
  assert threading.current_thread() is threading.main_thread()  # the loop's SIGTERM handler
  config = tiny_finetuning.config.copy_and_resolve_references
  whole = tiny_finetuning.summary
  assert whole["complete"] and not whole["preempted"]

  workdir = tmp_path / "interrupted"
  evaluate = isic.IsicEvaluator.run

  def evaluate_then_sigterm(self, state):
    metrics = evaluate(self, state)
    if int(jax.device_get(state.step)) == 2:
      signal.raise_signal(signal.SIGTERM)  # as a preemption would, during the evaluation
    return metrics

  monkeypatch.setattr(isic.IsicEvaluator, "run", evaluate_then_sigterm)
  stopped = finetune.train_and_evaluate(config(), str(workdir))
  monkeypatch.setattr(isic.IsicEvaluator, "run", evaluate)
  assert stopped["preempted"] and not stopped["complete"] and stopped["step"] == 3
  assert checkpointing.resolve_checkpoint(workdir)[1] == 3
  assert json.loads((workdir / "best.json").read_text())["step"] == 2
  assert not (workdir / "metrics.json").exists()

  resumed = finetune.train_and_evaluate(config(), str(workdir))
  assert resumed["complete"] and not resumed["preempted"] and resumed["step"] == 4
  assert [e["step"] for e in resumed["evaluation_history"]] == [4]  # steps 1-3 were not redone
  assert resumed["evaluations"] == whole["evaluations"]  # validation at step 4
  expected, got = _outputs(tiny_finetuning.workdir), _outputs(workdir)
  assert got["csv"] == expected["csv"]
  assert got["best_json"] == expected["best_json"] and got["best_step"] == expected["best_step"]
  assert got["metrics"] == expected["metrics"]
  assert got["last_step"] == expected["last_step"] == 4
  # The selected state may be step 2's, saved before the SIGTERM: the last state shows that the
  # resumed steps 3-4 are the uninterrupted run's too.
  for key in ("best_state", "last_state"):
    assert got[key].keys() == expected[key].keys()
    for name, array in expected[key].items():
      np.testing.assert_array_equal(got[key][name], array, err_msg=f"{key} {name}")


def test_preflight_unwritable_workdir_and_full_disk(
    tmp_path, small_isic_root, shared_cache_dir, monkeypatch
):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  monkeypatch.setattr(labelled, "load_split", _no_data)
  with pytest.raises(
      preflight.PreflightError, match=f"The workdir {blocker / 'run'} is not a writable directory"
  ):
    finetune.train_and_evaluate(_tiny(small_isic_root, shared_cache_dir), str(blocker / "run"))
  monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 1 << 20)
  with pytest.raises(
      preflight.PreflightError,
      match=r"Not enough free disk for checkpoints in .*: 1\.0 MiB free, "
      r"about .* MiB needed \(.*Free some space.* pass another --workdir\.",
  ):
    finetune.train_and_evaluate(_tiny(small_isic_root, shared_cache_dir), str(tmp_path / "run"))


def test_preflight_counts_the_best_state_too(
    tmp_path, small_isic_root, shared_cache_dir, monkeypatch
):
  """best/ holds a copy of the state (and briefly its replacement) next to checkpoints/: room
  for checkpoints/ alone is not enough to finish the run."""
  config = _tiny(small_isic_root, shared_cache_dir)
  model = classifier.create_model(config)
  tx, _ = classifier.create_optimizer(config.optim, 1, probe=False)
  state_bytes = preflight.state_bytes(
      jax.eval_shape(
          lambda: classifier.create_state_variables(model, tx, config.augment.image_size)
      )
  )
  # Exactly the room for keep_checkpoints + 1 = 2 checkpoints in checkpoints/ and nothing more.
  room = int(2 * state_bytes * 1.05) + (16 << 20)
  monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: room)

  def no_state(*args, **kwargs):
    raise AssertionError("the run started with no room on disk for its best state")

  monkeypatch.setattr(classifier, "create_state", no_state)
  with pytest.raises(preflight.PreflightError, match=r"Not enough free disk"):
    finetune.train_and_evaluate(config, str(tmp_path / "run"))


# --- End to end -----------------------------------------------------------------------------------


def _main_py(args, cache, timeout=600):
  """main.py as a user types it. It keeps this session's 8 fake devices (and with them the
  compilation cache it shares with the in-process tests); the commands ask for one."""
  env = dict(os.environ)
  env["PIRL_JAX_CACHE"] = str(cache)
  return subprocess.run(
      [sys.executable, "main.py", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_pretraining, small_isic_root, shared_cache_dir):
  """One linear-probe run of the tiny preset from the pretraining workdir, on one device (the
  checkpoint was written on 8), shared by the tests that only read its outputs.
  Returns (workdir, args, cache, result)."""
  workdir = tmp_path_factory.mktemp("cli") / "probe"
  args = [
      "--config=configs/finetune_isic.py:tiny",
      f"--config.init.checkpoint={tiny_pretraining.workdir}",
      f"--workdir={workdir}",
      "--config.data.source=isic",
      f"--config.data.path={small_isic_root}",
      "--config.protocol=linear",
      "--config.num_devices=1",
  ]
  result = _main_py(args, shared_cache_dir)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, args, shared_cache_dir, result


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


@pytest.mark.slow
def test_cli_end_to_end_writes_every_output(cli_run):
  workdir, _, _, result = cli_run
  assert "ETA" in result.stderr  # the progress line
  assert "on 1 device(s)" in result.stderr  # config.num_devices=1 of the 8
  assert "Traceback" not in result.stderr
  for name in (
      "predictions_validation.csv",
      "predictions_test.csv",
      "metrics.json",
      "roc.png",
      "config.json",
      "summary.json",
      "best.json",
  ):
    assert (workdir / name).is_file(), name
  assert (workdir / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list(workdir.glob("events.out.tfevents.*"))
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert {
      "validation",
      "test",
      "selected",
      "protocol",
      "init",
      "trunk",
      "label_fraction",
      "seed",
      "num_train_images",
      "total_steps",
  } <= metrics.keys()
  assert metrics["init"]["kind"] == "pirl" and metrics["protocol"] == "linear"
  assert metrics["total_steps"] == 4 and metrics["selected"]["step"] in (2, 4)
  best = json.loads((workdir / "best.json").read_text())
  assert best["step"] == metrics["selected"]["step"]
  assert checkpointing.resolve_checkpoint(workdir / "best")[1] == best["step"]
  assert checkpointing.resolve_checkpoint(workdir)[1] == 4  # the latest state, for resuming
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["complete"] and summary["results"]["test"] == metrics["test"]
  # The terminal summary names the selection and the test AUCs.
  assert f"selected step {best['step']} by validation mean AUC" in result.stdout
  assert f"mean {metrics['test']['auc_mean']:.4f}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("split", ["validation", "test"])
def test_written_auc_equals_sklearn_on_the_written_csv(cli_run, split):
  from sklearn.metrics import roc_auc_score

  workdir = cli_run[0]
  metrics = json.loads((workdir / "metrics.json").read_text())[split]
  header, rows = _read_csv(workdir / f"predictions_{split}.csv")
  gt_header, gt_rows = _read_csv(metrics["ground_truth_csv"])
  assert header == ["image_id", "melanoma", "seborrheic_keratosis"] == gt_header
  ids = [r[0] for r in rows]
  assert ids == sorted(r[0] for r in gt_rows) and len(set(ids)) == len(ids)
  probs = np.array([[float(r[1]), float(r[2])] for r in rows])
  assert np.all((probs >= 0) & (probs <= 1))
  truth = {r[0]: (float(r[1]), float(r[2])) for r in gt_rows}
  y = np.array([truth[i] for i in ids])
  assert metrics["auc_melanoma"] == roc_auc_score(y[:, 0], probs[:, 0])
  assert metrics["auc_seborrheic_keratosis"] == roc_auc_score(y[:, 1], probs[:, 1])
  assert metrics["auc_mean"] == (metrics["auc_melanoma"] + metrics["auc_seborrheic_keratosis"]) / 2
  confusion = np.array(metrics["confusion_matrix"])
  assert confusion.shape == (3, 3) and confusion.sum() == len(ids)


@pytest.mark.slow
def test_cli_linear_probe_keeps_the_pretrained_trunk(cli_run, tiny_pretraining):
  workdir = cli_run[0]
  pre_item, _ = checkpointing.resolve_checkpoint(tiny_pretraining.workdir)
  for folder in (workdir / "best", workdir / "checkpoints"):  # the selected and the last state
    item, _ = checkpointing.resolve_checkpoint(folder)
    like = checkpointing.array_metadata(item)
    _assert_trees_equal(_trunk_arrays(item, like), _trunk_arrays(pre_item, like))


@pytest.mark.slow
def test_rerunning_a_finished_command_changes_nothing(cli_run):
  """Last of the cli_run tests: the same command again reports the run complete, exits 0, and
  leaves every file (metrics.json, the predictions, best/, checkpoints/, ...) as it was."""
  workdir, args, cache, _ = cli_run
  before = helpers.snapshot(workdir)
  assert {"metrics.json", "predictions_validation.csv", "predictions_test.csv"} <= before.keys()
  assert any(name.startswith("best/") for name in before)
  result = _main_py(args, cache)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "is already complete; nothing was changed" in result.stdout
  assert helpers.snapshot(workdir) == before


def test_the_roc_title_names_the_data_and_the_share_of_labels(small_isic_root, shared_cache_dir):
  config = _tiny(small_isic_root, shared_cache_dir, **{"label_fraction": 0.1})
  assert finetune.roc_title(config, "pirl") == (
      f"ISIC 2017, test split: pirl init, {config.protocol}, 10% of the training labels"
  )
  config.data.source = "synthetic"
  assert finetune.roc_title(config, "scratch").startswith("synthetic ISIC-layout set, test split")
