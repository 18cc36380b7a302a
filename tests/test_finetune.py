"""ISIC 2017 evaluation: label subsets, pipelines, trunk restore, probe/fine-tune steps, BN at eval,
outputs recomputed from the written files, and the CLI end to end from a real pretraining run."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import finetune_isic
from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import labelled
from pirl_jax.eval import compare
from pirl_jax.eval import finetune
from pirl_jax.train import pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set(config, overrides):
  config.update_from_flattened_dict(overrides)
  return config


def _tiny(isic_root, cache_dir, **overrides):
  config = finetune_isic.get_config("tiny")
  return _set(config, {"data.source": "isic", "data.path": str(isic_root),
                       "data.cache_dir": str(cache_dir), **overrides})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("finetune_cache")


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory, small_isic_root, cache_dir):
  """One short real pretraining run (on the 8 fake devices), shared by the module."""
  config = _set(pirl_configs.get_config("tiny"), {
      "data.source": "isic", "data.path": str(small_isic_root), "data.cache_dir": str(cache_dir),
      "num_train_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 1})
  workdir = tmp_path_factory.mktemp("pretrain") / "run"
  pretrain.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def splits(small_isic_root, cache_dir):
  config = _tiny(small_isic_root, cache_dir)
  return {s: labelled.load_split(config.data, s) for s in ("train", "validation")}


def _trunk_arrays(item_dir, state_like):
  """The checkpoint's trunk params and batch stats as host arrays."""
  restored = checkpointing.restore_subtrees(item_dir, {
      ("params", "trunk"): state_like.params["trunk"],
      ("batch_stats", "trunk"): state_like.batch_stats["trunk"]})
  return restored[("params", "trunk")], restored[("batch_stats", "trunk")]


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _trees_differ(a, b) -> bool:
  return any(jax.tree.leaves(jax.tree.map(
      lambda x, y: not np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def _build(config, mesh, total_steps=10, init_dir=None):
  """(model, tx, schedule, state, shardings), the trunk restored from `init_dir` if given."""
  model = finetune.create_model(config)
  tx, schedule = finetune.create_optimizer(config.optim, total_steps,
                                           probe=config.protocol == "linear")
  state, shardings = finetune.create_state(model, tx, config.augment.image_size, mesh,
                                           config.seed)
  if init_dir is not None:
    init = finetune.resolve_init(_set(config.init, {"checkpoint": str(init_dir)}))
    state = finetune.load_trunk(state, init, mesh)
  return model, tx, schedule, state, shardings


@pytest.fixture(scope="module")
def built(pretrain_dir, small_isic_root, cache_dir):
  """The tiny fine-tune model on all 8 devices: scratch state and the PIRL-initialised one."""
  config = _tiny(small_isic_root, cache_dir)
  mesh = sharding_lib.create_mesh()
  model, tx, schedule, scratch, shardings = _build(config, mesh)
  init = finetune.resolve_init(_set(config.init, {"checkpoint": str(pretrain_dir)}))
  restored = finetune.load_trunk(scratch, init, mesh)
  return dict(config=config, mesh=mesh, model=model, tx=tx, schedule=schedule,
              scratch=scratch, restored=restored, shardings=shardings, init=init)


def _random_batch(config, seed, batch_size=None):
  rng = np.random.default_rng(seed)
  b, s = batch_size or config.global_batch_size, config.augment.image_size
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
          "label": rng.integers(0, 3, size=b).astype(np.int32)}


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
  np.testing.assert_array_equal(np.bincount(labels[labelled.stratified_subset(labels, 1e-4, 0)]),
                                [1, 1, 1])
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
  cfg = labelled.AugmentConfig(image_size=32)
  data = labelled.TrainInput(train, np.arange(len(train)), cfg, seed=0, global_batch_size=16,
                             balanced=True)
  drawn = np.concatenate([data.epoch_order(e).ravel() for e in range(30)])
  fractions = np.bincount(train.label[drawn], minlength=3) / len(drawn)
  np.testing.assert_allclose(fractions, 1 / 3, atol=0.05)


# --- Pipelines ------------------------------------------------------------------------------------


def test_train_input_is_deterministic_and_visits_the_subset(splits):
  train = splits["train"]
  positions = labelled.stratified_subset(train.label, 0.5, seed=0)
  cfg = labelled.AugmentConfig(image_size=32, rotation_degrees=30.0)
  kwargs = dict(seed=0, global_batch_size=16)
  data = labelled.TrainInput(train, positions, cfg, **kwargs)
  order = data.epoch_order(0)
  assert order.shape == (data.steps_per_epoch, 16)
  assert set(order.ravel()) == set(positions)  # every labelled example, nothing else

  first = next(data.epoch_dataset(0).as_numpy_iterator())
  again = next(labelled.TrainInput(train, positions, cfg, **kwargs).iterate(0))
  np.testing.assert_array_equal(first["image"], again["image"])
  np.testing.assert_array_equal(first["label"], train.label[first["index"]])
  assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.float32
  other_epoch = next(data.epoch_dataset(1).as_numpy_iterator())
  assert not np.array_equal(first["image"], other_epoch["image"])
  # Two processes each take their half of the same global batch.
  halves = [next(labelled.TrainInput(train, positions, cfg, process_index=p, process_count=2,
                                     **kwargs).iterate(0)) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), first["image"])


def test_eval_input_is_deterministic_and_padded(splits):
  val = splits["validation"]  # 30 images
  cfg = labelled.AugmentConfig(image_size=32)
  data = labelled.EvalInput(val, cfg, global_batch_size=16)
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
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  common = {"data.min_image_side": 8, "data.cache_dir": str(tmp_path / "cache")}
  from_tfds = _set(finetune_isic.get_config("tiny").data, {
      "source": "tfds", "tfds_data_dir": str(tmp_path / "tfds"),
      **{k.split(".")[1]: v for k, v in common.items()}})
  from_files = _set(finetune_isic.get_config("tiny").data, {
      "source": "isic", "path": str(manual), **{k.split(".")[1]: v for k, v in common.items()}})
  for split in ("train", "test"):
    a, b = labelled.load_split(from_tfds, split), labelled.load_split(from_files, split)
    assert a.image_ids == b.image_ids == sorted(i for i, *_ in isic_fixtures.ROWS[split])
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.melanoma, b.melanoma)
    assert a.csv_path is None and b.csv_path.endswith("_Part3_GroundTruth.csv")


# --- Restore, steps, BatchNorm --------------------------------------------------------------------


def test_restoring_a_pretraining_checkpoint_sets_the_trunk(built):
  init, scratch, restored = built["init"], built["scratch"], built["restored"]
  assert init.kind == "pirl" and init.step == 2  # inferred from config.json, latest step
  params, stats = _trunk_arrays(init.item_dir, scratch)
  _assert_trees_equal(restored.params["trunk"], params)
  _assert_trees_equal(restored.batch_stats["trunk"], stats)
  assert _trees_differ(restored.params["trunk"], scratch.params["trunk"])
  assert _trees_differ(restored.batch_stats["trunk"], scratch.batch_stats["trunk"])
  _assert_trees_equal(restored.params["head"], scratch.params["head"])  # same seed, same head
  # Restored onto the current mesh (8 devices), replicated.
  leaf = jax.tree.leaves(restored.params["trunk"])[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_architecture_mismatch_names_the_parameter(pretrain_dir, small_isic_root, cache_dir):
  config = _tiny(small_isic_root, cache_dir, **{"model.trunk": "resnet_tiny",
                                                "model.width_multiplier": 2.0})
  model = finetune.create_model(config)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
  state = finetune.FinetuneState(step=None, params=variables["params"],
                                 batch_stats=variables["batch_stats"], opt_state=None)
  init = finetune.resolve_init(_set(config.init, {"checkpoint": str(pretrain_dir)}))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/trunk/BasicBlock_0/Conv_0/kernel: checkpoint shape "
                           r"\(3, 3, 8, 8\) != model shape \(3, 3, 16, 16\)"):
    finetune.load_trunk(state, init, sharding_lib.create_mesh())
  # The loop checks before reading any data, and names the config fields too.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"(?s)BasicBlock_0/Conv_0/kernel.*config\.model\.width_multiplier=2\.0.*"
                           r"model\.trunk='resnet_tiny', model\.width_multiplier=1\.0"):
    finetune.check_trunk(config, init, model)
  # With init.inherit_trunk (the default) the run takes the checkpoint's own trunk instead.
  assert finetune.resolve_config(config, init).model.width_multiplier == 1.0


def test_linear_probe_leaves_the_trunk_untouched(pretrain_dir, small_isic_root, cache_dir):
  config = _tiny(small_isic_root, cache_dir, protocol="linear")
  mesh = sharding_lib.create_mesh()
  model, tx, schedule, state, shardings = _build(config, mesh, init_dir=pretrain_dir)
  before = jax.device_get(state)
  step = finetune.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule,
                                 class_weights=np.ones(3, np.float32))
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


def test_fine_tuning_trains_the_trunk_and_eight_devices_equal_one(built):
  config, initial = built["config"], jax.device_get(built["restored"])
  kwargs = dict(model=built["model"], tx=built["tx"], schedule=built["schedule"],
                class_weights=np.array([2.0, 3.0, 0.5], np.float32))
  results = []
  for num_devices in (1, 8):
    mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
    shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), built["shardings"])
    state = jax.device_put(initial, shardings)
    step = finetune.jit_train_step(mesh, shardings, **kwargs)
    for i in range(2):
      state, _ = step(state, sharding_lib.global_batch(_random_batch(config, i), mesh))
    results.append(jax.device_get(state))
  one, eight = results
  assert _trees_differ(one.params["trunk"], initial.params["trunk"])
  assert _trees_differ(one.batch_stats["trunk"], initial.batch_stats["trunk"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one.params, eight.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one.batch_stats,
               eight.batch_stats)


def test_batchnorm_statistics_do_not_change_during_evaluation(built, splits):
  config, mesh, state = built["config"], built["mesh"], built["restored"]
  before = jax.device_get(state)
  p_eval = finetune.jit_eval_step(mesh, built["shardings"], built["model"])
  evaluator = finetune.Evaluator(splits["validation"], labelled.augment_config(config.augment),
                                 p_eval, mesh, config)
  probs, metrics = evaluator.run(state)
  _assert_trees_equal(jax.device_get(state), before)
  assert probs.shape == (30, 3)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert 0.0 <= metrics["auc_melanoma"] <= 1.0
  # Inference-mode BatchNorm: an image's output does not depend on the rest of its batch.
  images = _random_batch(config, 0)["image"]
  others = np.concatenate([images[:1], -images[1:]])
  first = np.asarray(p_eval(state, sharding_lib.global_batch({"image": images}, mesh)))
  second = np.asarray(p_eval(state, sharding_lib.global_batch({"image": others}, mesh)))
  np.testing.assert_allclose(first[0], second[0], rtol=1e-5, atol=1e-6)


def test_learning_rate_steps_at_8_16_24_of_28_epochs():
  optim = finetune_isic.get_config("linear").optim
  schedule = finetune.lr_schedule(optim, total_steps=280)
  lr = optim.learning_rate
  np.testing.assert_allclose([schedule(s) for s in (0, 79, 80, 159, 160, 239, 240, 279)],
                             [lr, lr, lr / 10, lr / 10, lr / 100, lr / 100, lr / 1000,
                              lr / 1000], rtol=1e-6)


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
    finetune.validate_config(_set(finetune_isic.get_config("tiny"), {"min_train_steps": -1}), 1)


def test_config_errors_name_the_field():
  config = finetune_isic.get_config("tiny")
  with pytest.raises(configuration.ConfigError, match=r"config\.label_fraction=0\.0"):
    finetune.validate_config(_set(config, {"label_fraction": 0.0}), 1)
  config = finetune_isic.get_config("tiny")
  with pytest.raises(configuration.ConfigError, match=r"config\.init\.kind='pirl' needs "
                                                      r"config\.init\.checkpoint"):
    finetune.validate_config(_set(config, {"init.kind": "pirl"}), 1)
  config = finetune_isic.get_config("tiny")
  with pytest.raises(configuration.ConfigError, match=r"config\.protocol='probe'"):
    finetune.validate_config(_set(config, {"protocol": "probe"}), 1)
  with pytest.raises(FileNotFoundError, match=r"config\.init\.checkpoint='/nonexistent'"):
    finetune.resolve_init(_set(finetune_isic.get_config("tiny").init,
                               {"checkpoint": "/nonexistent"}))


def test_compare_table():
  run = lambda seed, mel: dict(seed=seed, test=dict(auc_melanoma=mel, auc_seborrheic_keratosis=0.5,
                                                    auc_mean=(mel + 0.5) / 2))
  table = compare.markdown_table({"scratch": [run(0, 0.5), run(1, 0.7)],
                                  "pirl": [run(0, 0.8), run(1, 0.8)]}, 0.1, "finetune")
  assert "| scratch | 0.600 ± 0.141 | 0.500 ± 0.000 | 0.550 ± 0.071 | 0,1 |" in table
  assert "| PIRL (self-supervised) | 0.800 ± 0.000 |" in table
  assert "label_fraction=0.1" in table


# --- End to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, pretrain_dir, small_isic_root):
  """main.py as a user types it: the tiny preset, linear probe, from the pretraining workdir."""
  tmp = tmp_path_factory.mktemp("cli")
  workdir = tmp / "probe"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device: the checkpoint was written on eight
  env["PIRL_JAX_CACHE"] = str(tmp / "cache")
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/finetune_isic.py:tiny",
       f"--config.init.checkpoint={pretrain_dir}", f"--workdir={workdir}",
       "--config.data.source=isic", f"--config.data.path={small_isic_root}",
       "--config.protocol=linear"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, result


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


@pytest.mark.slow
def test_cli_end_to_end_writes_every_output(cli_run):
  workdir, result = cli_run
  assert "ETA" in result.stderr  # the progress line
  for name in ("predictions_validation.csv", "predictions_test.csv", "metrics.json", "roc.png",
               "config.json"):
    assert (workdir / name).is_file(), name
  assert (workdir / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list(workdir.glob("events.out.tfevents.*"))
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["init"]["kind"] == "pirl" and metrics["protocol"] == "linear"
  assert metrics["selected"]["step"] in (2, 4)
  assert (workdir / "checkpoints" / str(metrics["selected"]["step"])).is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("split", ["validation", "test"])
def test_written_auc_equals_sklearn_on_the_written_csv(cli_run, split):
  from sklearn.metrics import roc_auc_score
  workdir, _ = cli_run
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
def test_cli_linear_probe_keeps_the_pretrained_trunk(cli_run, pretrain_dir):
  workdir, _ = cli_run
  probe_item, _ = checkpointing.resolve_checkpoint(workdir)
  pre_item, _ = checkpointing.resolve_checkpoint(pretrain_dir)
  saved = checkpointing.array_metadata(probe_item)
  like = finetune.FinetuneState(step=None, params=saved["params"],
                                batch_stats=saved["batch_stats"], opt_state=None)
  _assert_trees_equal(_trunk_arrays(probe_item, like), _trunk_arrays(pre_item, like))


@pytest.mark.slow
def test_a_used_workdir_is_not_overwritten(cli_run, small_isic_root, cache_dir):
  workdir, _ = cli_run
  with pytest.raises(FileExistsError, match="already holds a fine-tuned model"):
    finetune.train_and_evaluate(_tiny(small_isic_root, cache_dir), str(workdir))


def test_preflight_unwritable_workdir_and_full_disk(tmp_path, small_isic_root, cache_dir,
                                                    monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  def no_data(*args, **kwargs):
    raise AssertionError("the data was read before the preflight checks")
  monkeypatch.setattr(labelled, "load_split", no_data)
  with pytest.raises(preflight.PreflightError,
                     match=f"The workdir {blocker / 'run'} is not a writable directory"):
    finetune.train_and_evaluate(_tiny(small_isic_root, cache_dir), str(blocker / "run"))
  monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 1 << 20)
  with pytest.raises(preflight.PreflightError,
                     match=r"Not enough free disk for checkpoints in .*checkpoints: 1\.0 MiB free, "
                           r"about .* MiB needed \(2 checkpoint\(s\) of .* the best state and its "
                           r"replacement\)\. Free some space or pass another --workdir\."):
    finetune.train_and_evaluate(_tiny(small_isic_root, cache_dir), str(tmp_path / "run"))
