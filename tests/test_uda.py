"""Semi-supervised fine-tuning with UDA: the loss pieces against float64 NumPy, the step on 1 and 8
devices, the unlabelled pool (never validation or test images), its input pipeline, config errors,
resuming, and the comparison's UDA arms."""

import json
import pathlib
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune_isic
from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax.commands import compare
from pirl_jax.data import errors
from pirl_jax.data import labelled
from pirl_jax.data import labelled_input
from pirl_jax.data import labelled_views
from pirl_jax.eval import isic
from pirl_jax.tasks import classifier
from pirl_jax.tasks import finetune
from pirl_jax.tasks import uda

import helpers  # tests/helpers.py
import cli_in_process
import tree_arrays


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- The loss pieces against NumPy ----------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "log", "exp", "none"])
def test_tsa_threshold_follows_the_schedule(schedule):
  total, k = 200, 3
  for step in (0, 1, 50, 100, 199, 200):
    r = step / total
    alpha = {"linear": r, "log": 1 - np.exp(-5 * r), "exp": np.exp(5 * (r - 1)), "none": None}[
        schedule
    ]
    expected = 1.0 if alpha is None else alpha * (1 - 1 / k) + 1 / k
    got = float(uda.tsa_threshold(jnp.asarray(step), total, schedule, k))
    assert got == pytest.approx(expected, abs=1e-6), (schedule, step)
  with pytest.raises(ValueError, match="quadratic"):
    uda.tsa_threshold(0, total, "quadratic", k)


def test_supervised_loss_with_tsa_equals_numpy_and_masked_examples_get_no_gradient():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 3)) * 2
  labels = rng.integers(0, 3, 16)
  weights = np.array([2.0, 0.5, 1.0])
  probs = _softmax(logits)
  correct = probs[np.arange(16), labels]
  threshold = float(np.median(correct))  # about half the batch is left out
  keep = (correct <= threshold).astype(np.float64)
  assert 0 < keep.sum() < 16
  ce = -_log_softmax(logits)[np.arange(16), labels]
  w = weights[labels] * keep
  expected = np.sum(w * ce) / np.sum(w)

  def loss(x):
    return uda.supervised_loss(x, jnp.asarray(labels), jnp.asarray(weights, jnp.float32), threshold)

  (got, kept), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits, jnp.float32))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert float(kept) == pytest.approx(keep.mean())
  # d loss / d logits = w_i (softmax_i - onehot_i) / sum(w) for kept rows, 0 for the others.
  onehot = np.eye(3)[labels]
  expected_grad = (w / w.sum())[:, None] * (probs - onehot)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, atol=1e-6)
  assert not np.asarray(grad)[keep == 0].any()
  # A threshold of 1 keeps everything: the plain weighted cross-entropy.
  everything = uda.supervised_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(weights, jnp.float32), 1.0
  )
  assert float(everything[1]) == 1.0
  assert float(everything[0]) == pytest.approx(
      np.sum(weights[labels] * ce) / np.sum(weights[labels]), rel=1e-5
  )
  # Nothing kept: a zero loss, not a division by zero.
  nothing = uda.supervised_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(weights, jnp.float32), -1.0
  )
  assert float(nothing[0]) == 0.0 and float(nothing[1]) == 0.0


def test_consistency_loss_equals_numpy_with_sharpening_masking_and_stop_gradient():
  rng = np.random.default_rng(1)
  clean = rng.normal(size=(24, 3)) * 2
  strong = rng.normal(size=(24, 3))
  temperature, beta = 0.4, 0.6
  target = _softmax(clean / temperature)
  mask = (_softmax(clean).max(-1) > beta).astype(np.float64)
  assert 0 < mask.sum() < 24
  kl = np.sum(target * (np.log(target) - _log_softmax(strong)), -1)
  expected = np.mean(mask * kl)

  def loss(c, s):
    return uda.consistency_loss(c, s, temperature=temperature, confidence_threshold=beta)

  (got, confident), (grad_clean, grad_strong) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True
  )(jnp.asarray(clean, jnp.float32), jnp.asarray(strong, jnp.float32))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert float(confident) == pytest.approx(mask.mean())
  # The clean prediction is a fixed target; the strong view's gradient is
  # mask * (softmax(strong) - target) / B.
  assert not np.asarray(grad_clean).any()
  np.testing.assert_allclose(
      np.asarray(grad_strong), mask[:, None] * (_softmax(strong) - target) / 24, atol=1e-6
  )
  # Threshold 0 and temperature 1: plain KL over every image.
  plain = uda.consistency_loss(
      jnp.asarray(clean), jnp.asarray(strong), temperature=1.0, confidence_threshold=0.0
  )
  p = _softmax(clean)
  assert float(plain[1]) == 1.0
  assert float(plain[0]) == pytest.approx(
      np.mean(np.sum(p * (np.log(p) - _log_softmax(strong)), -1)), rel=1e-5
  )
  # KL of identical predictions is 0.
  same = uda.kl_divergence_with_logits(jnp.asarray(clean), jnp.asarray(clean))
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


def test_uda_loss_adds_the_weighted_consistency_to_the_annealed_supervised_term():
  rng = np.random.default_rng(2)
  labelled_logits, clean, strong = (
      jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 3), (16, 3), (16, 3))
  )
  labels = jnp.asarray(rng.integers(0, 3, 8))
  weights = jnp.ones(3)
  settings = uda.UdaSettings(weight=3.0, temperature=0.5, confidence_threshold=0.4, tsa="log")
  total, metrics = uda.uda_loss(
      labelled_logits,
      labels,
      clean,
      strong,
      class_weights=weights,
      step=jnp.asarray(30),
      total_steps=100,
      settings=settings,
  )
  threshold = uda.tsa_threshold(30, 100, "log", 3)
  sup = uda.supervised_loss(labelled_logits, labels, weights, threshold)[0]
  cons = uda.consistency_loss(clean, strong, temperature=0.5, confidence_threshold=0.4)[0]
  assert float(total) == pytest.approx(float(sup) + 3.0 * float(cons), rel=1e-6)
  assert float(metrics["tsa_threshold"]) == pytest.approx(float(threshold))
  assert set(metrics) == {
      "supervised_loss",
      "consistency_loss",
      "tsa_threshold",
      "tsa_kept_fraction",
      "confident_fraction",
  }


# --- The step on 1 and 8 devices ------------------------------------------------------------------


def _uda_batch(config, seed, ratio):
  rng = np.random.default_rng(seed)
  b, s = config.global_batch_size, config.augment.image_size
  image = lambda n: rng.normal(size=(n, s, s, 3)).astype(np.float32)
  return {
      "image": image(b),
      "label": rng.integers(0, 3, size=b).astype(np.int32),
      "unlabelled": image(b * ratio),
      "unlabelled_strong": image(b * ratio),
  }


def test_uda_step_on_eight_devices_equals_one_and_uses_the_unlabelled_images(
    small_isic_root, shared_cache_dir
):
  config = helpers.tiny_finetuning_config(small_isic_root, shared_cache_dir)
  model = classifier.create_model(config)
  tx, schedule = classifier.create_optimizer(config.optim, 4, probe=False)
  # Threshold 0 and temperature 1: every unlabelled image contributes to the gradient.
  settings = uda.UdaSettings(weight=1.0, temperature=1.0, confidence_threshold=0.0, tsa="linear")
  kwargs = dict(
      model=model,
      tx=tx,
      schedule=schedule,
      class_weights=np.ones(3, np.float32),
      uda=settings,
      total_steps=4,
  )
  batch = _uda_batch(config, 0, ratio=2)
  results = []
  for num_devices, the_batch in (
      (1, batch),
      (8, batch),
      (1, dict(batch, unlabelled_strong=batch["unlabelled"])),
  ):
    mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
    state, shardings = classifier.create_state(model, tx, config.augment.image_size, mesh, 0)
    step = classifier.jit_train_step(mesh, shardings, **kwargs)
    state, metrics = step(state, sharding_lib.global_batch(the_batch, mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (one, m1), (eight, m8), (same_views, m_same) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one.params, eight.params)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one.batch_stats, eight.batch_stats
  )
  for key in ("loss", "supervised_loss", "consistency_loss", "confident_fraction"):
    assert float(m1[key]) == pytest.approx(float(m8[key]), abs=1e-5), key
  assert float(m1["confident_fraction"]) == 1.0
  assert float(m1["consistency_loss"]) > 0
  assert float(m1["loss"]) == pytest.approx(
      float(m1["supervised_loss"]) + float(m1["consistency_loss"]), rel=1e-6
  )
  # Identical clean and strong views: no consistency loss, and another update.
  assert float(m_same["consistency_loss"]) == pytest.approx(0.0, abs=1e-6)
  assert any(
      not np.allclose(a, b)
      for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(same_views.params))
  )


# --- The unlabelled pool --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits(small_isic_root, shared_cache_dir):
  config = helpers.tiny_finetuning_config(small_isic_root, shared_cache_dir)
  return config, {s: labelled.load_split(config.data, s) for s in labelled.SPLITS}


def _held_out(splits_):
  return [splits_["validation"], splits_["test"]]


def test_the_pool_is_the_training_images_outside_the_subset_and_never_held_out(splits):
  config, splits_ = splits
  train = splits_["train"]
  positions = labelled.stratified_subset(train.label, 0.5, seed=0)
  pool = labelled.unlabelled_pool(config.data, "", train, positions, _held_out(splits_))
  rest = sorted(set(range(len(train))) - set(positions.tolist()))
  assert pool.image_ids == [f"train/{train.image_ids[i]}" for i in rest]
  assert pool.encoded == [train.encoded[i] for i in rest]
  assert (pool.label == -1).all()
  held_out = {bytes(b) for s in _held_out(splits_) for b in s.encoded}
  labelled_bytes = {bytes(train.encoded[i]) for i in positions}
  assert not held_out & set(map(bytes, pool.encoded))
  assert not labelled_bytes & set(map(bytes, pool.encoded))
  # Every training image is labelled and there is no folder: nothing to train on, said so.
  with pytest.raises(errors.DataSourceError, match="uda.unlabelled_path"):
    labelled.unlabelled_pool(config.data, "", train, np.arange(len(train)), _held_out(splits_))


def _write_images(folder, count, seed):
  from PIL import Image

  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        folder / f"extra_{i}.png"
    )


def test_an_unlabelled_folder_is_added_and_held_out_images_in_it_are_refused(
    splits, small_isic_root, tmp_path
):
  config, splits_ = splits
  train = splits_["train"]
  positions = labelled.stratified_subset(train.label, 0.5, seed=0)
  extra = tmp_path / "extra"
  _write_images(extra / "nested", 3, seed=0)
  pool = labelled.unlabelled_pool(config.data, str(extra), train, positions, _held_out(splits_))
  assert len(pool) == len(train) - len(positions) + 3
  assert pool.image_ids[-3:] == [f"unlabelled_path/nested/extra_{i}.png" for i in range(3)]
  # A copy of a test image (under another name) and a validation image id are refused by name.
  test_files = sorted(p for p in small_isic_root.rglob("*.jpg") if "Test" in str(p))
  assert test_files
  shutil.copy(test_files[0], extra / "renamed_copy.jpg")
  with pytest.raises(errors.DataSourceError, match="renamed_copy.jpg.*the test image"):
    labelled.unlabelled_pool(config.data, str(extra), train, positions, _held_out(splits_))
  (extra / "renamed_copy.jpg").unlink()
  # The same picture in another encoding: its decoded pixels, saved as a lossless PNG.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.open(test_files[1]).convert("RGB").save(extra / "lossless_copy.png")
  with pytest.raises(errors.DataSourceError, match="lossless_copy.png.*the test image"):
    labelled.unlabelled_pool(config.data, str(extra), train, positions, _held_out(splits_))
  (extra / "lossless_copy.png").unlink()
  validation_id = splits_["validation"].image_ids[0]
  _write_images(tmp_path / "other", 1, seed=1)
  shutil.move(tmp_path / "other" / "extra_0.png", extra / f"{validation_id}_resized.png")
  with pytest.raises(errors.DataSourceError, match=f"the validation image {validation_id}"):
    labelled.unlabelled_pool(config.data, str(extra), train, positions, _held_out(splits_))
  with pytest.raises(errors.MissingDataError, match="uda.unlabelled_path"):
    labelled.unlabelled_pool(
        config.data, str(tmp_path / "absent"), train, positions, _held_out(splits_)
    )
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.DataSourceError, match="No jpg/png images.*uda.unlabelled_path"):
    labelled.unlabelled_pool(
        config.data, str(tmp_path / "empty"), train, positions, _held_out(splits_)
    )


def test_the_layouts_unlabelled_folder_joins_the_pool(tmp_path, shared_cache_dir):
  from pirl_jax.data import synthetic

  root = tmp_path / "isic"
  synthetic.generate(root, seed=0, num_train=12, num_val=6, num_test=6, num_unlabeled=3)
  config = helpers.tiny_finetuning_config(root, shared_cache_dir)
  train = labelled.load_split(config.data, "train")
  held = [labelled.load_split(config.data, s) for s in ("validation", "test")]
  positions = labelled.stratified_subset(train.label, 0.5, seed=0)
  pool = labelled.unlabelled_pool(config.data, "", train, positions, held)
  assert len(pool) == len(train) - len(positions) + 3
  assert all(name.startswith(f"{synthetic.UNLABELED_DIR}/ISIC_") for name in pool.image_ids[-3:])


def test_unlabelled_input_gives_clean_and_strong_views_deterministically(splits):
  config, splits_ = splits
  train = splits_["train"]
  positions = labelled.stratified_subset(train.label, 0.5, seed=0)
  pool = labelled.unlabelled_pool(config.data, "", train, positions, _held_out(splits_))
  view = labelled_views.augment_config(config.augment)
  strong = labelled_views.StrongAugmentConfig(num_ops=2, magnitude=9, prob=1.0, cutout_fraction=0.5)

  def batches(start, seed=0, strong_cfg=strong, n=2):
    source = labelled_input.UnlabelledInput(pool, view, strong_cfg, seed=seed, global_batch_size=8)
    it = source.iterate(start)
    return [next(it) for _ in range(n)]

  first = batches(0, n=3)
  assert set(first[0]) == {"unlabelled", "unlabelled_strong"}
  assert first[0]["unlabelled"].shape == (8, view.image_size, view.image_size, 3)
  # Resuming at step 1 gives step 1's batch; another seed gives other images and views.
  again = batches(1)
  for key in first[0]:
    np.testing.assert_array_equal(again[0][key], first[1][key])
  assert not np.array_equal(batches(0, seed=1)[0]["unlabelled"], first[0]["unlabelled"])
  # The strong view differs from the clean one, which is exactly the view without RandAugment
  # and cutout (the same crop, flips and colours).
  assert not np.allclose(first[0]["unlabelled"], first[0]["unlabelled_strong"])
  off = labelled_views.StrongAugmentConfig(num_ops=0, magnitude=9, prob=1.0, cutout_fraction=0.0)
  plain = batches(0, strong_cfg=off, n=1)[0]
  np.testing.assert_array_equal(plain["unlabelled"], first[0]["unlabelled"])
  np.testing.assert_allclose(plain["unlabelled_strong"], plain["unlabelled"], atol=1e-6)
  # The pool has labels -1: they are never passed on.
  assert "label" not in first[0]


# --- Config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"uda.weight": -1.0}, "config.uda.weight"),
        ({"uda.unlabelled_ratio": 0}, "config.uda.unlabelled_ratio"),
        ({"uda.confidence_threshold": 1.0}, "config.uda.confidence_threshold"),
        ({"uda.temperature": 0.0}, "config.uda.temperature"),
        ({"uda.tsa": "cosine"}, "config.uda.tsa"),
        ({"uda.randaugment_num_ops": -1}, "num_ops"),
        ({"uda.randaugment_magnitude": 11.0}, "magnitude"),
        ({"uda.randaugment_prob": 1.5}, "prob"),
        ({"uda.cutout_fraction": 2.0}, "cutout_fraction"),
    ],
)
def test_uda_config_errors_name_the_field(overrides, message):
  config = finetune_isic.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(configuration.ConfigError, match=message):
    configuration.validate_finetune_config(config)


def test_a_workdir_written_before_uda_resumes_only_without_it():
  config = preflight.config_as_dict(finetune_isic.get_config("tiny"))
  old = {k: v for k, v in config.items() if k != "uda"}
  assert preflight.config_differences(old, config) == []
  enabled = json.loads(json.dumps(config))
  enabled["uda"]["enabled"] = True
  assert preflight.config_differences(old, enabled) == [
      "uda.enabled: false in the workdir, true now"
  ]
  # With UDA on, its settings matter; with it off, they do not.
  changed = json.loads(json.dumps(enabled))
  changed["uda"]["weight"] = 2.0
  assert preflight.config_differences(enabled, changed) == [
      "uda.weight: 1.0 in the workdir, 2.0 now"
  ]
  off_changed = json.loads(json.dumps(config))
  off_changed["uda"]["weight"] = 2.0
  assert preflight.config_differences(config, off_changed) == []


# --- A run: resumes like any fine-tuning run --------------------------------------------------


def _outputs(workdir):
  metrics = json.loads((workdir / "metrics.json").read_text())
  for split in finetune.EVAL_SPLITS:
    for key in ("ground_truth_csv", "predictions_csv"):
      metrics[split].pop(key)
  last_item, _ = checkpointing.resolve_checkpoint(workdir / "checkpoints")
  return dict(
      csv={s: (workdir / f"predictions_{s}.csv").read_bytes() for s in finetune.EVAL_SPLITS},
      metrics=metrics,
      last=tree_arrays.flat(checkpointing.load_arrays(last_item)),
  )


@pytest.mark.slow
def test_uda_fine_tuning_resumes_after_sigterm_with_the_same_result(
    tmp_path, small_isic_root, shared_cache_dir, monkeypatch
):
  assert threading.current_thread() is threading.main_thread()

  def config():
    return helpers.tiny_finetuning_config(
        small_isic_root,
        shared_cache_dir,
        **{
            "num_train_steps": 4,
            "eval_every_steps": 2,
            "label_fraction": 0.5,
            "uda.enabled": True,
            "uda.unlabelled_ratio": 2,
            "uda.confidence_threshold": 0.0,
        },
    )

  whole = finetune.train_and_evaluate(config(), str(tmp_path / "whole"))
  assert whole["complete"]
  results = whole["results"]
  assert results["uda"]["enabled"] and results["uda"]["num_unlabelled_images"] > 0
  dataset = json.loads((tmp_path / "whole" / "dataset.json").read_text())
  assert sum(n.startswith("unlabelled:") for n in dataset["names"]) == (
      results["uda"]["num_unlabelled_images"]
  )

  workdir = tmp_path / "interrupted"
  evaluate = isic.IsicEvaluator.run

  def evaluate_then_sigterm(self, state):
    metrics = evaluate(self, state)
    if int(jax.device_get(state.step)) == 2:
      signal.raise_signal(signal.SIGTERM)
    return metrics

  monkeypatch.setattr(isic.IsicEvaluator, "run", evaluate_then_sigterm)
  stopped = finetune.train_and_evaluate(config(), str(workdir))
  monkeypatch.setattr(isic.IsicEvaluator, "run", evaluate)
  assert stopped["preempted"] and stopped["step"] == 3
  resumed = finetune.train_and_evaluate(config(), str(workdir))
  assert resumed["complete"] and resumed["step"] == 4
  expected, got = _outputs(tmp_path / "whole"), _outputs(workdir)
  assert got["csv"] == expected["csv"] and got["metrics"] == expected["metrics"]
  for name, array in expected["last"].items():
    np.testing.assert_array_equal(got["last"][name], array, err_msg=name)
  # Resuming the same workdir with UDA off is refused, naming the field.
  off = config()
  off.uda.enabled = False
  off.num_train_steps = 6
  with pytest.raises(preflight.PreflightError, match="uda.enabled"):
    finetune.train_and_evaluate(off, str(workdir))


# --- The comparison's UDA arms --------------------------------------------------------------------


def test_uda_arms_switch_uda_on_and_keep_the_initialisation():
  base = finetune_isic.get_config()
  base.uda.enabled = True  # the recipe's switch is the arm's to set
  for arm, kind, on in (
      ("scratch", "scratch", False),
      ("scratch_uda", "scratch", True),
      ("pirl", "pirl", False),
      ("pirl_uda", "pirl", True),
      ("supervised_uda", "", True),
  ):
    config = compare.arm_config(
        base, arm, "" if kind == "scratch" else "ckpt", 1, 0.1, ("resnet18", 0.25)
    )
    assert config.uda.enabled is on and config.init.kind == kind, arm
    assert config.seed == 1 and config.label_fraction == 0.1


def test_the_table_pairs_each_uda_arm_with_the_same_initialisation_without_it():
  def run(seed, value):
    metrics = {k: value for k, _ in compare.METRICS}
    return dict(seed=seed, test=metrics, validation=metrics, workdir="")

  results = {
      "scratch": [run(s, 0.6 + 0.01 * s) for s in range(3)],
      "pirl": [run(s, 0.7 + 0.02 * s) for s in range(3)],
      "scratch_uda": [run(s, 0.65 + 0.03 * s) for s in range(3)],
      "pirl_uda": [run(s, 0.72 - 0.01 * s) for s in range(3)],
  }
  lines = [line for line in compare.paired_comparison(results) if line.startswith("- ")]
  pairs = [line.split(",")[0][2:] for line in lines[:: len(compare.METRICS)]]
  assert pairs == [
      "PIRL (self-supervised) − scratch",
      "scratch + UDA − scratch",
      "PIRL + UDA − scratch",
      "PIRL + UDA − PIRL (self-supervised)",
  ]
  table = compare.markdown_table(results, 0.1, "finetune")
  assert "| scratch + UDA | 0.680 ± 0.030" in table and "| PIRL + UDA |" in table


def test_run_comparison_with_uda_runs_each_initialisation_with_and_without_it(
    tmp_path, monkeypatch
):
  pirl = tmp_path / "pirl_run"
  pirl.mkdir()
  (pirl / "config.json").write_text(
      json.dumps({"mode": "pretrain", "model": {"trunk": "resnet_tiny", "width_multiplier": 1.0}})
  )
  saver = checkpointing.Checkpointer(pirl / "checkpoints", keep=1, async_save=False)
  saver.save(2, {"params": {"trunk": {"kernel": np.zeros((3,), np.float32)}}})
  saver.close()
  calls = []

  def fake_train_and_evaluate(config, workdir):
    calls.append(
        (
            pathlib.Path(workdir).parent.name,
            config.init.kind,
            config.uda.enabled,
            config.uda.unlabelled_ratio,
        )
    )
    value = 0.6 + 0.01 * config.seed + 0.05 * config.uda.enabled
    metrics = {k: value for k, _ in compare.METRICS}
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / "metrics.json").write_text(
        json.dumps(dict(test=metrics, validation=metrics))
    )
    return {}

  monkeypatch.setattr(finetune, "train_and_evaluate", fake_train_and_evaluate)
  base = finetune_isic.get_config("tiny")
  base.uda.unlabelled_ratio = 3
  results, table = compare.run_comparison(
      base, str(tmp_path / "compare"), str(pirl), None, [0, 1], 0.1, uda=True
  )
  assert list(results) == ["scratch", "pirl", "scratch_uda", "pirl_uda"]
  assert sorted(set(calls)) == [
      ("pirl", "pirl", False, 3),
      ("pirl_uda", "pirl", True, 3),
      ("scratch", "scratch", False, 3),
      ("scratch_uda", "scratch", True, 3),
  ]
  assert "| PIRL + UDA | 0.655 ± 0.007" in table
  assert "- PIRL + UDA − PIRL (self-supervised), test mean AUC: +0.050" in table
  saved = json.loads((tmp_path / "compare" / "compare.json").read_text())
  assert saved["uda"]["unlabelled_ratio"] == 3


def test_the_cli_runs_uda_as_typed_and_names_a_bad_value(
    tmp_path, small_isic_root, shared_cache_dir, capsys, monkeypatch
):
  common = [
      "--config=configs/finetune_isic.py:tiny",
      "--config.data.source=isic",
      f"--config.data.path={small_isic_root}",
      f"--config.data.cache_dir={shared_cache_dir}",
      "--config.label_fraction=0.5",
      "--config.uda.enabled=True",
      "--config.uda.unlabelled_ratio=2",
  ]
  status, out, err = cli_in_process.main_in_process(
      common + ["--config.uda.tsa=cosine", f"--workdir={tmp_path / 'bad'}"], capsys, monkeypatch
  )
  assert status == 2 and "config.uda.tsa='cosine' is not one of" in err, err[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists()
  status, out, err = cli_in_process.main_in_process(
      common + ["--config.num_train_steps=2", f"--workdir={tmp_path / 'run'}"], capsys, monkeypatch
  )
  assert status in (0, None), (status, err[-3000:])
  assert "UDA: " in err and "consistency" in err and "test" in out
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["uda"]["enabled"] and metrics["uda"]["unlabelled_ratio"] == 2
