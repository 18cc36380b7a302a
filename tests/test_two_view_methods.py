"""MoCo v2 and SimCLR (pirl_jax.methods.TWO_VIEW_METHODS): their views, losses and state updates
against float64 NumPy, the sharded key queue, 8 devices == 1, resume, and runs through main.py."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import key_queue
from pirl_jax import losses
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import augment
from pirl_jax.data import jigsaw
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib
from cli_in_process import main_in_process  # tests/cli_in_process.py
import helpers  # tests/helpers.py
import tree_arrays  # tests/tree_arrays.py

NUM_EXAMPLES = 50


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cross_entropy_first(logits):
  """Softmax cross-entropy with target column 0, float64, one row at a time."""
  out = []
  for row in logits:
    top = row.max()
    out.append(top + np.log(np.sum(np.exp(row - top))) - row[0])
  return float(np.mean(out))


def _nt_xent_double_loop(z, tau):
  n = len(z)
  total = 0.0
  for i in range(n):
    partner = i ^ 1
    denominator = sum(np.exp(z[i] @ z[j] / tau) for j in range(n) if j != i)
    total += -np.log(np.exp(z[i] @ z[partner] / tau) / denominator)
  return total / n


# ------------------------------------------------------------------------- the views ----


def test_two_view_methods_make_two_blurred_views_with_their_own_crops():
  cfg = jigsaw.ViewConfig(image_size=48, jigsaw_crop_size=75, tile_size=19)
  encoded = tf.io.encode_jpeg(helpers.noise_image(6, 96, 112))
  for method in ("moco_v2", "simclr"):
    views = jigsaw.make_views(encoded, 3, 0, 1, cfg, method)
    assert set(views) == {"image", "image_2", "index"}
    assert views["image"].shape == views["image_2"].shape == (48, 48, 3)
    assert not np.array_equal(views["image"], views["image_2"])
  # Always blurred (sigma 20 px of a 224 px view: 4.3 px here), nothing else changed: the first
  # view differs from NPID's unblurred image view.
  always = jigsaw.ViewConfig(
      image_size=48, jigsaw_crop_size=75, tile_size=19, blur_prob=1.0, blur_sigma=(20.0, 20.0)
  )
  blurred = jigsaw.make_views(encoded, 3, 0, 1, always, "simclr")["image"]
  plain = jigsaw.make_views(encoded, 3, 0, 1, always, "npid")["image"]
  assert not np.allclose(blurred, plain)


def test_gaussian_blur_matches_a_numpy_convolution():
  image = np.random.default_rng(0).uniform(size=(20, 24, 3)).astype(np.float32)
  sigma, radius = 1.3, 4
  out = augment.gaussian_blur(tf.constant(image), tf.constant(sigma), radius).numpy()
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), "reflect")
  expected = np.zeros(image.shape)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      expected += taps[dy] * taps[dx] * padded[dy : dy + 20, dx : dx + 24]
  np.testing.assert_allclose(out, expected, atol=1e-5)


# ------------------------------------------------------------- losses and the queue ----


def test_nt_xent_matches_a_numpy_double_loop():
  z = _unit(np.random.default_rng(1).normal(size=(10, 8)))
  loss, metrics = losses.nt_xent_loss(jnp.asarray(z, jnp.float32), 0.3)
  np.testing.assert_allclose(float(loss), _nt_xent_double_loop(z, 0.3), rtol=1e-5)
  partners = [z[i] @ z[i ^ 1] for i in range(10)]
  np.testing.assert_allclose(float(metrics["positive_similarity"]), np.mean(partners), rtol=1e-5)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_moco_loss_and_gradient_match_numpy_on_a_padded_sharded_queue(num_devices):
  rng = np.random.default_rng(2)
  size, batch, dim, tau = 13, 8, 6, 0.2  # 13 rows on 8 devices: 16 rows, 3 of them padding
  queries, keys = _unit(rng.normal(size=(batch, dim))), _unit(rng.normal(size=(batch, dim)))
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  queue = np.zeros((-(-size // num_devices) * num_devices, dim))
  queue[:size] = _unit(rng.normal(size=(size, dim)))
  queue[size:] = 5.0  # padding must never be scored

  def loss(q, k, table):
    return key_queue.moco_loss(q, k, table, size, tau, mesh)[0]

  put = lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s)
  args = (
      put(queries, sharding_lib.batch_sharding(mesh)),
      put(keys, sharding_lib.batch_sharding(mesh)),
      put(queue, sharding_lib.bank_sharding(mesh)),
  )
  value, grad = jax.jit(jax.value_and_grad(loss))(*args)

  def reference(q):
    logits = np.concatenate([np.sum(q * keys, 1, keepdims=True), q @ queue[:size].T], 1) / tau
    return _cross_entropy_first(logits)

  np.testing.assert_allclose(float(value), reference(queries), rtol=1e-5)
  numeric = np.zeros_like(queries)
  for i in range(batch):
    for d in range(dim):
      step = np.zeros_like(queries)
      step[i, d] = 1e-6
      numeric[i, d] = (reference(queries + step) - reference(queries - step)) / 2e-6
  np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-4)


def test_queue_write_replaces_the_oldest_rows_and_wraps():
  queue = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
  keys = -np.arange(1, 7, dtype=np.float32).reshape(3, 2)
  expected = queue.copy()
  for step in (0, 1, 2):
    out = key_queue.write(jnp.asarray(expected), jnp.asarray(keys), jnp.asarray(step), 7)
    for j in range(3):
      expected[(step * 3 + j) % 7] = keys[j]
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_ema_update_matches_numpy():
  ema = {"a": np.full((3,), 2.0, np.float32), "b": {"c": np.zeros((2, 2), np.float32)}}
  params = {"a": np.arange(3, dtype=np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
  out = step_lib.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out["a"], 0.9 * 2.0 + 0.1 * np.arange(3), rtol=1e-6)
  np.testing.assert_allclose(out["b"]["c"], 0.1, rtol=1e-6)


# ------------------------------------------------------------------------ the step ----


def _config(method, **overrides):
  config = pirl_configs.get_config("tiny")
  config.method = method
  config.model.head_batch_norm = True
  config.moco.queue_size = 20
  config.moco.momentum = 0.9
  config.update_from_flattened_dict(overrides)
  return config


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  b, s = config.global_batch_size, config.data.views.image_size
  image = lambda: rng.normal(size=(b, s, s, 3)).astype(np.float32)
  return {
      "index": rng.permutation(NUM_EXAMPLES)[:b].astype(np.int32),
      "image": image(),
      "image_2": image(),
  }


_RUNS = {}


def _run_steps(config, num_devices, num_steps=2):
  key = (config.method, num_devices, num_steps, config.model.batch_norm, config.ema_decay)
  if key in _RUNS:
    return _RUNS[key]
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  schedule = configuration.resolve_schedule(config, NUM_EXAMPLES)
  model = state_lib.create_model(config.model, num_devices)
  tx, lr = state_lib.create_optimizer(
      config.optim, schedule.learning_rate, schedule.warmup_steps, schedule.total_steps
  )
  state, shardings = state_lib.create_train_state(config, model, tx, NUM_EXAMPLES, mesh, 0)
  before = jax.device_get(state)
  step = step_lib.jit_train_step(
      mesh,
      shardings,
      model=model,
      tx=tx,
      schedule=lr,
      loss_cfg=config.loss,
      bank_momentum=0.5,
      num_examples=NUM_EXAMPLES,
      method=config.method,
      moco_cfg=config.moco,
      simclr_cfg=config.simclr,
      ema_decay=state_lib.ema_decay(config),
      shuffle_keys=config.model.batch_norm == "per_device",
  )
  metrics = []
  for i in range(num_steps):
    state, m = step(state, sharding_lib.global_batch(_batch(config, i), mesh))
    metrics.append(jax.device_get(m))
  _RUNS[key] = model, before, jax.device_get(state), metrics
  return _RUNS[key]


def _embed(model, params, batch_stats, x):
  """The projection head's embedding in train mode, float64, from the NumPy side of the head."""
  features, _ = model.apply(
      {"params": params, "batch_stats": batch_stats},
      x,
      True,
      "proj",
      mutable=["batch_stats"],
      method="_head_input",
  )
  out = params["proj_out"]
  return _unit(
      np.asarray(features, np.float64) @ np.asarray(out["kernel"], np.float64)
      + np.asarray(out["bias"], np.float64)
  )


def test_moco_v2_step_matches_numpy():
  config = _config("moco_v2")
  model, before, after, metrics = _run_steps(config, 1, num_steps=1)
  batch, m, tau = _batch(config, 0), config.moco.momentum, config.moco.temperature
  # The key encoder first moves towards the query encoder (equal at the start: a copy).
  key_params = jax.tree.map(lambda e, p: m * e + (1 - m) * p, before.ema_params, before.params)
  queries = _embed(model, before.params, before.batch_stats, batch["image"])
  keys = _embed(model, key_params, before.batch_stats, batch["image_2"])
  queue = np.asarray(before.key_queue, np.float64)[: config.moco.queue_size]
  logits = np.concatenate([np.sum(queries * keys, 1, keepdims=True), queries @ queue.T], 1) / tau
  np.testing.assert_allclose(metrics[0]["loss"], _cross_entropy_first(logits), rtol=1e-5)
  # The keys replace the oldest rows; the others stay.
  b = config.global_batch_size
  np.testing.assert_allclose(after.key_queue[:b], keys, atol=1e-5)
  np.testing.assert_array_equal(after.key_queue[b:], before.key_queue[b:])
  for a, e in zip(jax.tree.leaves(after.ema_params), jax.tree.leaves(key_params)):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)
  assert {"trunk", "proj_hidden", "proj_out", "proj_norm"} == set(before.params)


def test_moco_v2_ema_trails_the_query_encoder_over_steps():
  config = _config("moco_v2")
  _, _, one, _ = _run_steps(config, 1, num_steps=1)
  _, _, two, _ = _run_steps(config, 1, num_steps=2)
  m = config.moco.momentum
  for e2, e1, p1 in zip(
      jax.tree.leaves(two.ema_params), jax.tree.leaves(one.ema_params), jax.tree.leaves(one.params)
  ):
    np.testing.assert_allclose(e2, m * e1 + (1 - m) * p1, rtol=1e-5, atol=1e-6)


def test_simclr_step_matches_numpy():
  config = _config("simclr")
  model, before, after, metrics = _run_steps(config, 1, num_steps=1)
  batch = _batch(config, 0)
  views = np.asarray(step_lib.pair_views(batch["image"], batch["image_2"]))
  z = _embed(model, before.params, before.batch_stats, views)
  expected = _nt_xent_double_loop(z, config.simclr.temperature)
  np.testing.assert_allclose(metrics[0]["loss"], expected, rtol=1e-5)
  assert np.asarray(after.ema_params).shape == ()  # no EMA unless asked for


def test_an_ema_for_any_method():
  config = _config("simclr", ema_decay=0.5)
  _, before, after, _ = _run_steps(config, 1, num_steps=1)
  for e, p0, p1 in zip(
      jax.tree.leaves(after.ema_params),
      jax.tree.leaves(before.params),
      jax.tree.leaves(after.params),
  ):
    np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["moco_v2", "simclr"])
def test_eight_devices_equal_one_device(method):
  config = _config(method)
  _, _, one, metrics_one = _run_steps(config, 1)
  _, _, eight, metrics_eight = _run_steps(config, 8)
  for m1, m8 in zip(metrics_one, metrics_eight):
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for field in ("params", "batch_stats", "ema_params"):
    for a, b in zip(jax.tree.leaves(getattr(one, field)), jax.tree.leaves(getattr(eight, field))):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  size = config.moco.queue_size if method == "moco_v2" else 1
  np.testing.assert_allclose(one.key_queue[:size], eight.key_queue[:size], atol=1e-5)


def test_moco_v2_shuffles_keys_across_per_device_batch_norm():
  config = _config("moco_v2", **{"model.batch_norm": "per_device"})
  _, before, after, metrics = _run_steps(config, 8, num_steps=1)
  assert np.isfinite(metrics[0]["loss"])
  b = config.global_batch_size
  assert not np.allclose(after.key_queue[:b], before.key_queue[:b])


def test_imagenet_sized_queue_is_never_gathered_in_the_compiled_step():
  """K = 65536 keys, global batch 256, 8 devices: no collective moves as much as one device's
  share of the queue (the step lowered and compiled from shapes only)."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  config = pirl_configs.get_config("tiny")
  config.method, config.global_batch_size, config.moco.queue_size = "moco_v2", 256, 65536
  config.data.views.image_size = 16
  mesh = sharding_lib.create_mesh(jax.devices())
  model = state_lib.create_model(config.model)
  tx, lr = state_lib.create_optimizer(config.optim, 0.1, 0, 1000)
  abstract, shardings = state_lib.abstract_train_state(config, model, tx, 100_000, mesh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
  rows = sharding_lib.batch_sharding(mesh)
  image = jax.ShapeDtypeStruct((256, 16, 16, 3), jnp.float32, sharding=rows)
  batch = {
      "image": image,
      "image_2": image,
      "index": jax.ShapeDtypeStruct((256,), jnp.int32, sharding=rows),
  }
  step = step_lib.jit_train_step(
      mesh,
      shardings,
      model=model,
      tx=tx,
      schedule=lr,
      loss_cfg=config.loss,
      bank_momentum=0.5,
      num_examples=100_000,
      method="moco_v2",
      moco_cfg=config.moco,
      simclr_cfg=config.simclr,
      ema_decay=state_lib.ema_decay(config),
  )
  compiled = step.lower(abstract, batch).compile()
  queue_bytes = int(np.prod(abstract.key_queue.shape)) * 4
  collectives = common.collective_bytes(compiled.as_text())
  assert collectives, "the step on 8 devices must communicate"
  largest = max(collectives, key=lambda c: c[2])
  assert largest[2] < queue_bytes / 8, largest


# ------------------------------------------------------------- config and main.py ----


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"method": "moco_v2", "moco.queue_size": 8}, "moco.queue_size"),
        ({"method": "moco_v2", "moco.momentum": 1.0}, "moco.momentum"),
        ({"method": "moco_v2", "ema_decay": 0.9}, "ema_decay"),
        ({"method": "simclr", "simclr.temperature": 0.0}, "simclr.temperature"),
        ({"optim.name": "adam"}, "optim.name"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
  config = pirl_configs.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(configuration.ConfigError, match=field.replace(".", r"\.")):
    configuration.validate_pretrain_config(config)


def test_a_queue_longer_than_the_data_allows_is_refused():
  config = pirl_configs.get_config("tiny")
  config.method, config.moco.queue_size = "moco_v2", 40
  with pytest.raises(configuration.ConfigError, match=r"moco\.queue_size=40 must be <="):
    configuration.validate_dataset_size(config, 50)


@pytest.mark.parametrize("method", ["moco_v2", "simclr"])
def test_pretrains_and_resumes_through_main(
    method, tmp_path, small_isic_root, shared_cache_dir, capsys, monkeypatch
):
  flags = [
      "--config=configs/pirl.py:tiny",
      f"--config.method={method}",
      "--config.data.source=isic",
      f"--config.data.path={small_isic_root}",
      f"--config.data.cache_dir={shared_cache_dir}",
      "--config.checkpoint_every_steps=2",
  ]
  if method == "simclr":
    flags.append("--config.optim.name=lars")
  code, _, err = main_in_process(
      flags + ["--config.num_train_steps=4", f"--workdir={tmp_path / 'whole'}"], capsys, monkeypatch
  )
  assert code in (0, None), err[-3000:]
  summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
  assert summary["complete"] and summary["step"] == 4
  assert {"knn_auc_mean", "linear_auc_mean"} <= set(summary["evaluations"]["probe"])
  assert "positive_similarity" in summary["metrics"]
  # Cut off after its step-2 checkpoint: the same command resumes there and ends bitwise where
  # the uninterrupted run ended.
  split = tmp_path / "split"
  shutil.copytree(tmp_path / "whole", split)
  shutil.rmtree(split / "checkpoints" / "4")
  (split / "summary.json").unlink()
  code, _, err = main_in_process(
      flags + ["--config.num_train_steps=4", f"--workdir={split}"], capsys, monkeypatch
  )
  assert code in (0, None), err[-3000:]
  assert "Resumed from" in err and "at step 2" in err
  whole = tree_arrays.flat(checkpointing.load_arrays(helpers.item(tmp_path / "whole", 4)))
  resumed = tree_arrays.flat(checkpointing.load_arrays(helpers.item(split, 4)))
  assert set(whole) == set(resumed)
  assert any(name.startswith("ema_params.") for name in whole) == (method == "moco_v2")
  for name in whole:
    np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)
