"""Pretraining: multi-device equals single-device, learning, checkpoints and resume, config errors."""

import json

import jax
import numpy as np
import pytest

from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import sharding as sharding_lib
from pirl_jax import storage
from pirl_jax.tasks import pretrain
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib


def _tiny_config(**overrides):
  config = pirl_configs.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


def _random_batch(config, num_examples, seed=0):
  rng = np.random.default_rng(seed)
  views, b = config.data.views, config.global_batch_size
  batch = {
      "image": rng.normal(size=(b, views.image_size, views.image_size, 3)).astype(np.float32),
      "tiles": rng.normal(size=(b, 9, views.tile_size, views.tile_size, 3)).astype(np.float32),
      "index": rng.permutation(num_examples)[:b].astype(np.int32),
  }
  if config.method == "npid":
    del batch["tiles"]
  return batch


def _run_steps(config, num_devices, num_examples, num_steps):
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  schedule = configuration.resolve_schedule(config, num_examples)
  model = state_lib.create_model(config.model)
  tx, lr = state_lib.create_optimizer(
      config.optim, schedule.learning_rate, schedule.warmup_steps, schedule.total_steps
  )
  state, shardings = state_lib.create_train_state(config, model, tx, num_examples, mesh, 0)
  step = step_lib.jit_train_step(
      mesh,
      shardings,
      model=model,
      tx=tx,
      schedule=lr,
      loss_cfg=config.loss,
      bank_momentum=0.5,
      num_examples=num_examples,
      method=config.method,
  )
  metrics = []
  for i in range(num_steps):
    state, m = step(state, sharding_lib.global_batch(_random_batch(config, num_examples, i), mesh))
    metrics.append(jax.device_get(m))
  return state, metrics


def _max_abs_diff(a, b):
  diffs = jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
      a,
      b,
  )
  return max(jax.tree.leaves(diffs))


@pytest.mark.parametrize(
    "loss_kind,num_examples,num_negatives,method",
    [
        # NCE with PIRL combines what the next two cover; it runs with the slow set.
        pytest.param("nce", 203, 64, "pirl", marks=pytest.mark.slow),
        ("infonce", 203, 64, "pirl"),
        ("nce", 203, 64, "npid"),
        # A size at which the partitioner, left alone, gathered the whole bank on every device; the
        # bank's chunked-scoring and compiled-program tests keep that promise in the quick set.
        pytest.param("infonce", 20_003, 4096, "pirl", marks=pytest.mark.slow),
    ],
)
def test_eight_devices_equal_one_device(loss_kind, num_examples, num_negatives, method):
  # N is not a multiple of 8: the 8-device bank carries padding rows.
  config = _tiny_config(
      **{"loss.kind": loss_kind, "loss.num_negatives": num_negatives, "method": method}
  )
  one, metrics_one = _run_steps(config, 1, num_examples, 2)
  eight, metrics_eight = _run_steps(config, 8, num_examples, 2)

  padded = -(-num_examples // 8) * 8
  assert eight.bank.shape == (padded, 128) and one.bank.shape == (num_examples, 128)
  assert (
      eight.bank.sharding.spec
      == sharding_lib.bank_sharding(sharding_lib.create_mesh(jax.devices()[:8])).spec
  )
  # Each device holds 1/8 of the bank's rows.
  assert {s.data.shape for s in eight.bank.addressable_shards} == {(padded // 8, 128)}
  one, eight = jax.device_get(one), jax.device_get(eight)
  # Tolerances: float32 reductions are ordered differently across 8 shards.
  for m1, m8 in zip(metrics_one, metrics_eight):
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["nce_z"], m8["nce_z"], rtol=1e-5)
  assert _max_abs_diff(one.params, eight.params) < 1e-5
  assert _max_abs_diff(one.batch_stats, eight.batch_stats) < 1e-5
  assert _max_abs_diff(one.tile_batch_stats, eight.tile_batch_stats) < 1e-5
  np.testing.assert_allclose(one.bank, eight.bank[:num_examples], atol=1e-5)
  np.testing.assert_array_equal(eight.bank[num_examples:], 0.0)  # padding never written
  if method == "npid":  # no jigsaw head was made
    assert set(one.params) == {"trunk", "f_out"}, set(one.params)
  if loss_kind == "nce":
    assert metrics_one[0]["nce_z"] > 0
    # Z is estimated at the first step and then frozen (nce_z_ema=0).
    assert metrics_one[1]["nce_z"] == metrics_one[0]["nce_z"] == one.nce_z


def test_weight_decay_mask_excludes_batchnorm_and_biases():
  config = _tiny_config()
  model = state_lib.create_model(config.model)
  views = config.data.views
  variables = jax.eval_shape(
      lambda: model.init(
          jax.random.PRNGKey(0),
          np.zeros((1, 32, 32, 3), np.float32),
          np.zeros((1, 9, views.tile_size, views.tile_size, 3), np.float32),
          train=False,
      )
  )
  mask = state_lib.weight_decay_mask(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  decayed = {jax.tree_util.keystr(p) for p, m in flat if m}
  kept = {jax.tree_util.keystr(p) for p, m in flat if not m}
  assert decayed and all("kernel" in k for k in decayed)
  assert any("scale" in k for k in kept) and any("bias" in k for k in kept)
  assert not any("kernel" in k for k in kept)


def _pretrain(tmp_path, name, isic_root, **overrides):
  config = _tiny_config(
      **{
          "data.source": "isic",
          "data.path": str(isic_root),
          "data.cache_dir": str(tmp_path / "cache"),
          **overrides,
      }
  )
  workdir = tmp_path / name
  return config, workdir, pretrain.train_and_evaluate(config, str(workdir))


def _scalars(workdir, tag):
  """The values logged for `tag`, in step order, as TensorBoard itself reads them: scalars."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  accumulator = event_accumulator.EventAccumulator(str(workdir))
  accumulator.Reload()
  return [event.value for event in sorted(accumulator.Scalars(tag), key=lambda e: e.step)]


def test_tensorboard_scalars_are_scalars_to_tensorboard(tmp_path):
  writer = storage.TensorBoardWriter(tmp_path / "run")
  writer.write_scalars(1, {"loss": 6.5, "probe/knn_auc_mean": 0.625})
  writer.write_scalars(3, {"loss": np.float32(5.25)})
  writer.close()
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "run"))
  accumulator.Reload()
  assert sorted(accumulator.Tags()["scalars"]) == ["loss", "probe/knn_auc_mean"]
  assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(1, 6.5), (3, 5.25)]
  assert [(e.step, e.value) for e in accumulator.Scalars("probe/knn_auc_mean")] == [(1, 0.625)]


def test_npid_pretrains_without_a_jigsaw_view(tmp_path, small_isic_root, caplog):
  """method='npid': the pipeline makes no tiles, the state has no jigsaw head, the loss is the
  image term, and the run ends with probes like a PIRL run."""
  from pirl_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  seen = []
  iterate = pipeline.PretrainInput.iterate

  def recording_iterate(self, start_step=0):
    for batch in iterate(self, start_step):
      seen.append(set(batch))
      yield batch

  with pytest.MonkeyPatch.context() as m:
    m.setattr(pipeline.PretrainInput, "iterate", recording_iterate)
    with caplog.at_level("INFO", logger="absl"):
      _, workdir, summary = _pretrain(
          tmp_path,
          "npid",
          small_isic_root,
          **{"method": "npid", "num_train_steps": 4, "eval_every_steps": 0},
      )
  assert seen and all(keys == {"image", "index"} for keys in seen)
  assert summary["complete"] and "loss_jigsaw" not in summary["metrics"]
  assert summary["metrics"]["loss"] == summary["metrics"]["loss_image"]
  assert set(summary["evaluations"]["probe"]) >= {"knn_auc_mean", "linear_auc_mean"}
  arrays = checkpointing.load_arrays(checkpointing.resolve_checkpoint(workdir)[0])
  assert set(arrays["params"]) == {"trunk", "f_out"}
  assert any(
      " loss " in r.getMessage() and "jigsaw" not in r.getMessage()
      for r in caplog.records
      if "step 4/4" in r.getMessage()
  )


def test_loss_decreases_and_positives_separate(tmp_path, small_isic_root):
  _, workdir, summary = _pretrain(
      tmp_path,
      "learn",
      small_isic_root,
      **{
          "num_train_steps": 40,
          "log_every_steps": 10,
          "checkpoint_every_steps": 40,
          "optim.base_learning_rate": 0.5,
          "probe.enabled": False,
      },
  )
  logged = json.loads((workdir / "summary.json").read_text())
  assert logged["step"] == 40
  values = _scalars(workdir, "loss")
  assert len(values) == 4
  assert values[-1] < values[0]
  positive = _scalars(workdir, "positive_similarity")
  negative = _scalars(workdir, "negative_similarity")
  gaps = [p - n for p, n in zip(positive, negative)]
  assert gaps[-1] > 0.02, gaps  # the memory-bank positive is closer than the negatives ...
  assert gaps[-1] > gaps[0], gaps  # ... and increasingly so
  assert summary["metrics"]["positive_similarity"] == pytest.approx(positive[-1])


def test_checkpoint_roundtrip_is_identical(tmp_path):
  config = _tiny_config()
  state, _ = _run_steps(config, 1, 100, 1)
  mesh = sharding_lib.create_mesh(jax.devices()[:1])
  shardings = state_lib.state_shardings(state, mesh)
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=2)
  ckpt.save(1, state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(1, checkpointing.abstract_like(state, shardings))
  ckpt.close()
  assert _max_abs_diff(jax.device_get(state), jax.device_get(restored)) == 0.0
  assert restored.bank.sharding.spec == state.bank.sharding.spec


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("global_batch_size", 12, "divisible by the number of devices (8)"),
        ("loss.kind", "ntxent", "config.loss.kind='ntxent'"),
        ("loss.temperature", 0.0, "config.loss.temperature"),
        ("data.source", "s3", "config.data.source='s3'"),
        ("method", "byol", "config.method='byol'"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
  config = _tiny_config(**{field: value})
  with pytest.raises(
      configuration.ConfigError,
      match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\."),
  ):
    configuration.validate_pretrain_config(config)
    configuration.check_device_count(config, 8)


def test_npid_has_no_jigsaw_term_to_estimate_z_from():
  config = _tiny_config(**{"method": "npid", "loss.kind": "nce", "loss.nce_z_from": "jigsaw"})
  with pytest.raises(configuration.ConfigError, match="config.loss.nce_z_from='jigsaw' needs"):
    configuration.validate_pretrain_config(config)


def test_num_negatives_must_be_below_dataset_size():
  config = _tiny_config(**{"loss.num_negatives": 100})
  with pytest.raises(configuration.ConfigError, match=r"num_negatives=100 must be < .* N=100"):
    configuration.validate_dataset_size(config, 100)
  configuration.validate_dataset_size(config, 101)
  config = _tiny_config(**{"global_batch_size": 64})
  with pytest.raises(configuration.ConfigError, match="fewer than config.global_batch_size=64"):
    configuration.validate_dataset_size(config, 50)


def test_per_device_batch_norm_uses_each_devices_share_only():
  """model.batch_norm='per_device': on 8 devices, the trunk's outputs and running statistics
  equal 8 groups on one device, and differ from global statistics; the variables are flax's."""
  from pirl_jax.models import resnet  # pylint: disable=g-import-not-at-top

  images = np.random.default_rng(0).normal(size=(32, 16, 16, 3)).astype(np.float32)
  images[16:] *= 3.0  # the devices' shares differ in scale, so their statistics differ

  def forward(groups, num_devices):
    trunk = resnet.get_trunk("resnet_tiny", bn_groups=groups)
    variables = trunk.init(jax.random.PRNGKey(0), images[:1], train=False)
    mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
    apply = jax.jit(
        lambda v, x: trunk.apply(v, x, train=True, mutable=["batch_stats"]),
        in_shardings=(sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)),
        out_shardings=sharding_lib.replicated(mesh),
    )
    return variables, jax.device_get(apply(variables, images))

  variables, (per_device, stats) = forward(8, 8)
  _, (grouped, grouped_stats) = forward(8, 1)
  global_variables, (global_out, _) = forward(1, 8)
  # Tolerance: the deepest layers normalise 4 images at 1x1, a statistic of 4 numbers whose
  # float32 summation order differs between one device and eight.
  np.testing.assert_allclose(per_device, grouped, rtol=1e-3, atol=1e-3)
  assert _max_abs_diff(stats, grouped_stats) < 1e-4
  assert np.max(np.abs(per_device - global_out)) > 0.1
  assert jax.tree.structure(variables) == jax.tree.structure(global_variables)
  state_lib.create_model(_tiny_config(**{"model.batch_norm": "per_device"}).model, 8)
  assert (
      state_lib.create_model(
          _tiny_config(**{"model.batch_norm": "per_device"}).model, 8
      ).trunk.bn_groups
      == 8
  )
  assert state_lib.create_model(_tiny_config().model, 8).trunk.bn_groups == 1


def test_head_batch_norm_running_stats_come_from_their_own_pass():
  """With head BatchNorm and bn_running_stats='images': the trunk's and f's running statistics
  are the image pass's, the jigsaw head's the tile pass's (it never sees images)."""
  config = _tiny_config(**{"model.head_batch_norm": True})
  num_examples = 64
  mesh = sharding_lib.create_mesh(jax.devices()[:1])
  schedule = configuration.resolve_schedule(config, num_examples)
  model = state_lib.create_model(config.model)
  tx, lr = state_lib.create_optimizer(
      config.optim, schedule.learning_rate, schedule.warmup_steps, schedule.total_steps
  )
  state, shardings = state_lib.create_train_state(config, model, tx, num_examples, mesh, 0)
  before = jax.device_get(state)
  batch = _random_batch(config, num_examples)
  step = step_lib.jit_train_step(
      mesh,
      shardings,
      model=model,
      tx=tx,
      schedule=lr,
      loss_cfg=config.loss,
      bank_momentum=0.5,
      num_examples=num_examples,
      running_stats_from_images=True,
  )
  after = jax.device_get(step(state, sharding_lib.global_batch(batch, mesh))[0])
  variables = {"params": before.params, "batch_stats": before.batch_stats}
  _, tile_vars = model.apply(
      variables, batch["tiles"], train=True, mutable=["batch_stats"], method="embed_tiles"
  )
  _, image_vars = model.apply(
      variables, batch["image"], train=True, mutable=["batch_stats"], method="embed_images"
  )
  assert set(after.batch_stats) == {"trunk", "f_norm", "g_tile_norm"}
  for name, source in (("trunk", image_vars), ("f_norm", image_vars), ("g_tile_norm", tile_vars)):
    assert _max_abs_diff(after.batch_stats[name], source["batch_stats"][name]) < 1e-5, name
  assert (
      _max_abs_diff(after.batch_stats["g_tile_norm"], before.batch_stats["g_tile_norm"]) > 1e-3
  )  # it moved
