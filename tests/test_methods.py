"""The pretraining methods beside PIRL (pirl_jax.methods): their views, heads, losses and runs.

PIRL and NPID have their own tests (test_loop's NumPy reference, test_train); here: the jigsaw
permutation set, the rotation and relative-patch geometry and labels, the covariant classifiers'
and PIRL-rotation's losses against float64 NumPy, 8 devices == 1, and tiny runs through main.py.
"""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import pirl as pirl_configs
from pirl_jax import configuration
from pirl_jax import memory_bank
from pirl_jax import methods
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import jigsaw
from pirl_jax.data import permutations
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib
from cli_in_process import main_in_process  # tests/cli_in_process.py
import helpers  # tests/helpers.py

SMALL = jigsaw.ViewConfig(image_size=48, jigsaw_crop_size=75, tile_size=19)
PLAIN = dataclasses.replace(
    SMALL,
    tile_photometric=False,
    image_photometric=False,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)


def _seed(i):
  return tf.constant([i, 777], tf.int64)


def _cell_of(tile, crop, cfg):
  """The grid cells of `crop` that hold `tile` as an exact window."""
  cells = []
  for cell in range(cfg.num_tiles):
    top, left = (cell // cfg.grid) * cfg.cell_size, (cell % cfg.grid) * cfg.cell_size
    pixels = crop[top : top + cfg.cell_size, left : left + cfg.cell_size]
    windows = np.lib.stride_tricks.sliding_window_view(pixels, tile.shape)[..., 0, :, :, :]
    if np.any(np.all(windows == tile[None, None], axis=(2, 3, 4))):
      cells.append(cell)
  return cells


# ------------------------------------------------------------------ the permutation set ----


def test_stored_permutation_set_is_the_generated_one():
  stored = permutations.permutation_set()
  assert stored.shape == (1000, 9) and stored.dtype == np.int32
  assert np.all(np.sort(stored, axis=1) == np.arange(9))  # every row a permutation
  assert len({tuple(r) for r in stored}) == 1000
  # The greedy choice is a sequence: the first 150 of 1000 are the set of 150.
  np.testing.assert_array_equal(stored[:150], permutations.max_hamming_permutations(150))
  # Noroozi & Favaro's maximal-average set of 1000 has minimum distance 3; the maximin set 5.
  assert permutations.min_hamming_distance(stored) == 5


def test_permutation_set_is_deterministic_and_far_apart():
  a, b = permutations.max_hamming_permutations(40), permutations.max_hamming_permutations(40)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, permutations.max_hamming_permutations(40, seed=1))
  # Two permutations can differ everywhere; three of 9 elements pairwise everywhere too.
  assert permutations.min_hamming_distance(permutations.max_hamming_permutations(2)) == 9
  assert permutations.min_hamming_distance(a) >= 7
  assert permutations.permutation_set(40).shape == (40, 9)


def test_min_hamming_distance_matches_a_double_loop():
  rows = np.random.default_rng(0).permuted(np.tile(np.arange(9), (12, 1)), axis=1)
  expected = min(int(np.sum(rows[i] != rows[j])) for i in range(12) for j in range(12) if i != j)
  assert permutations.min_hamming_distance(rows) == expected


# ------------------------------------------------------------------------------- views ----


def test_jigsaw_class_view_shuffles_by_the_labelled_permutation():
  perms = tf.constant(permutations.max_hamming_permutations(30))
  image = helpers.noise_image(1, 96, 112)
  labels = []
  for i in range(4):
    tiles, label = jigsaw.jigsaw_class_view(image, _seed(i), PLAIN, perms)
    crop = jigsaw.jigsaw_crop(image, _seed(i), PLAIN).numpy()
    labels.append(int(label))
    for k, tile in enumerate(tiles.numpy()):
      assert _cell_of(tile, crop, PLAIN) == [int(perms[int(label)][k])]
  assert len(set(labels)) > 1


def test_jigsaw_labels_cover_the_set_uniformly():
  perms = tf.constant(permutations.max_hamming_permutations(4))
  image = helpers.noise_image(2, 40, 40)
  draw = tf.function(lambda s: jigsaw.jigsaw_class_view(image, s, PLAIN, perms)[1])
  counts = np.bincount([int(draw(_seed(i))) for i in range(400)], minlength=4)
  assert counts.min() > 70, counts  # 100 expected per class


def test_relative_patch_is_the_centre_tile_and_the_labelled_neighbour():
  image = helpers.noise_image(3, 96, 112)
  draw = tf.function(lambda s: jigsaw.relative_patch_view(image, s, PLAIN))
  labels = []
  for i in range(300):
    patches, label = draw(_seed(i))
    labels.append(int(label))
    if i < 12:  # geometry on a few; the label distribution on all
      crop = jigsaw.jigsaw_crop(image, _seed(i), PLAIN).numpy()
      centre, neighbour = patches.numpy()
      assert _cell_of(centre, crop, PLAIN) == [4]
      assert _cell_of(neighbour, crop, PLAIN) == [methods.RELATIVE_POSITION_CELLS[int(label)]]
  counts = np.bincount(labels, minlength=8)
  assert counts.shape == (8,) and counts.min() > 15, counts  # 37.5 expected per class
  # Cell 4's neighbours in row-major order: class c is up-left, up, up-right, left, right,
  # down-left, down, down-right.
  assert methods.RELATIVE_POSITION_CELLS == (0, 1, 2, 3, 5, 6, 7, 8)


def test_relative_patch_tiles_keep_their_gap_and_jitter():
  """Each tile sits at a random offset in its cell: between the two tiles there is a gap of
  0 to 2 * (cell - tile) pixels along each axis they are apart on, varying with the draw."""
  image = helpers.noise_image(4, 96, 112)
  cell, t = PLAIN.cell_size, PLAIN.tile_size

  def position(tile, crop, cell_index):  # the tile's top-left corner in the crop
    top, left = (cell_index // 3) * cell, (cell_index % 3) * cell
    pixels = crop[top : top + cell, left : left + cell]
    windows = np.lib.stride_tricks.sliding_window_view(pixels, tile.shape)[..., 0, :, :, :]
    dy, dx = np.argwhere(np.all(windows == tile[None, None], axis=(2, 3, 4)))[0]
    return np.array([top + dy, left + dx])

  gaps = []
  for i in range(16):
    crop = jigsaw.jigsaw_crop(image, _seed(i), PLAIN).numpy()
    patches, label = jigsaw.relative_patch_view(image, _seed(i), PLAIN)
    neighbour = methods.RELATIVE_POSITION_CELLS[int(label)]
    apart = np.array([neighbour // 3 - 1, neighbour % 3 - 1])  # (rows, columns) from the centre
    offset = position(patches[1].numpy(), crop, neighbour) - position(patches[0].numpy(), crop, 4)
    for axis in np.flatnonzero(apart):
      gaps.append(int(offset[axis] * apart[axis] - t))
  assert gaps and all(0 <= g <= 2 * (cell - t) for g in gaps), gaps
  assert len(set(gaps)) > 2  # jittered


def test_rotated_view_is_an_image_view_turned_counter_clockwise():
  image = helpers.noise_image(5, 96, 112)
  ks = []
  for i in range(6):
    view, k = jigsaw.rotated_view(image, _seed(i), PLAIN, return_rotation=True)
    view_seed = jigsaw.augment.split_seed(_seed(i), 2)[0]
    upright = jigsaw.image_view(image, view_seed, PLAIN).numpy()
    np.testing.assert_array_equal(view.numpy(), np.rot90(upright, int(k), axes=(0, 1)))
    ks.append(int(k))
  draw = tf.function(lambda s: jigsaw.rotated_view(image, s, PLAIN, return_rotation=True)[1])
  counts = np.bincount([int(draw(_seed(i))) for i in range(200)], minlength=4)
  assert counts.shape == (4,) and counts.min() > 30, counts


def test_rotation_batch_turns_each_image_four_ways_counter_clockwise():
  images = np.zeros((2, 4, 4, 3), np.float32)
  images[:, 0, 3] = 1.0  # the top-right pixel
  images[1] *= 2.0
  rotated, labels = jax.device_get(step_lib.rotation_batch(images))
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 0, 1, 2, 3])
  # Counter-clockwise: top-right -> top-left -> bottom-left -> bottom-right.
  corners = [(0, 3), (0, 0), (3, 0), (3, 3)]
  for row in range(8):
    example, k = divmod(row, 4)
    assert np.argwhere(rotated[row, ..., 0]).tolist() == [list(corners[k])]
    assert rotated[row].max() == images[example].max()


def test_make_views_makes_each_methods_views():
  cfg = SMALL
  perms = tf.constant(permutations.max_hamming_permutations(10))
  encoded = tf.io.encode_jpeg(helpers.noise_image(6, 96, 112))
  expected = {
      "pirl": {"image", "tiles", "index"},
      "npid": {"image", "index"},
      "pirl_rotation": {"image", "rotated", "index"},
      "rotation": {"image", "index"},
      "jigsaw": {"tiles", "label", "index"},
      "relative_patch": {"patches", "label", "index"},
  }
  images = {}
  for method, keys in expected.items():
    views = jigsaw.make_views(encoded, 3, 0, 1, cfg, method, perms)
    assert set(views) == keys, method
    images[method] = views.get("image")
  # The image view does not depend on the method.
  for method in ("npid", "pirl_rotation", "rotation"):
    np.testing.assert_array_equal(images[method], images["pirl"])
  with pytest.raises(ValueError, match="unknown method|Unknown method"):
    jigsaw.make_views(encoded, 3, 0, 1, cfg, "exemplar")


# ------------------------------------------------------- losses against NumPy float64 ----

NUM_EXAMPLES = 50


def _config(method, **overrides):
  config = pirl_configs.get_config("tiny")
  config.method = method
  config.jigsaw_permutations = 20
  config.model.head_batch_norm = True
  config.loss.num_negatives = 16
  config.update_from_flattened_dict(overrides)
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  views, b = config.data.views, config.global_batch_size
  image = lambda: rng.normal(size=(b, views.image_size, views.image_size, 3)).astype(np.float32)
  tiles = lambda n: rng.normal(size=(b, n, views.tile_size, views.tile_size, 3)).astype(np.float32)
  batch = {"index": rng.permutation(NUM_EXAMPLES)[:b].astype(np.int32)}
  if config.method in ("pirl", "npid", "pirl_rotation", "rotation"):
    batch["image"] = image()
  if config.method == "pirl_rotation":
    batch["rotated"] = image()
  if config.method in ("pirl", "jigsaw"):
    batch["tiles"] = tiles(9)
  if config.method == "relative_patch":
    batch["patches"] = tiles(2)
  if config.method == "jigsaw":
    batch["label"] = rng.integers(0, config.jigsaw_permutations, b).astype(np.int32)
  if config.method == "relative_patch":
    batch["label"] = rng.integers(0, 8, b).astype(np.int32)
  return batch


_RUNS = {}


def _run_steps(config, num_devices, num_steps=2):
  """Steps from the initial state on random batches: (model, state before, state after, metrics
  per step). Memoised per method and device count: the NumPy reference and the 8-device check
  share the 1-device run."""
  key = (config.method, num_devices, num_steps)
  if key not in _RUNS:
    _RUNS[key] = _compute_steps(config, num_devices, num_steps)
  return _RUNS[key]


def _compute_steps(config, num_devices, num_steps):
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  schedule = configuration.resolve_schedule(config, NUM_EXAMPLES)
  model = state_lib.create_model(config.model, num_permutations=config.jigsaw_permutations)
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
  )
  metrics = []
  for i in range(num_steps):
    state, m = step(state, sharding_lib.global_batch(_batch(config, i), mesh))
    metrics.append(jax.device_get(m))
  return model, before, jax.device_get(state), metrics


def _head_input(model, before, x, branch):
  """The model's trunk (+ head BatchNorm) features in train mode, as float64."""
  variables = {"params": before.params, "batch_stats": before.batch_stats}
  features, _ = model.apply(
      variables, x, True, branch, mutable=["batch_stats"], method="_head_input"
  )
  return np.asarray(features, np.float64)


def _dense(params, x):
  return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def _cross_entropy(logits, labels):
  top = logits.max(axis=1, keepdims=True)
  log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
  return float(np.mean(log_z - logits[np.arange(len(labels)), labels]))


@pytest.mark.parametrize("method", ["jigsaw", "rotation", "relative_patch"])
def test_covariant_losses_match_numpy(method):
  config = _config(method)
  model, before, after, metrics = _run_steps(config, 1)  # the first step is checked
  batch = _batch(config, 0)
  params = before.params
  b = config.global_batch_size
  if method == "rotation":
    x = np.stack([np.rot90(batch["image"], k, axes=(1, 2)) for k in range(4)], axis=1)
    x = x.reshape((4 * b,) + batch["image"].shape[1:])
    labels = np.tile(np.arange(4), b)
    logits = _dense(params["rotation_classifier"], _head_input(model, before, x, "f"))
  else:
    tiles = batch["tiles" if method == "jigsaw" else "patches"]
    n = tiles.shape[1]
    per_tile = _dense(
        params["g_tile_out"],
        _head_input(model, before, tiles.reshape((b * n,) + tiles.shape[2:]), "g_tile"),
    )
    classifier = "jigsaw_classifier" if method == "jigsaw" else "relative_position_classifier"
    logits = _dense(params[classifier], per_tile.reshape(b, -1))
    labels = batch["label"]
  assert logits.shape[1] == {"jigsaw": 20, "rotation": 4, "relative_patch": 8}[method]
  np.testing.assert_allclose(metrics[0]["loss"], _cross_entropy(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(metrics[0]["accuracy"], np.mean(logits.argmax(1) == labels))
  # No memory bank: the placeholder is never written, the key never split.
  np.testing.assert_array_equal(after.bank, before.bank)
  np.testing.assert_array_equal(after.rng, before.rng)
  assert int(after.step) == 2
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(
          jax.tree.leaves(after.params["trunk"]), jax.tree.leaves(before.params["trunk"])
      )
  )
  # Only the method's heads were made (BatchNorm before them: model.head_batch_norm).
  assert (
      set(params)
      == {
          "jigsaw": {"trunk", "g_tile_norm", "g_tile_out", "jigsaw_classifier"},
          "rotation": {"trunk", "f_norm", "rotation_classifier"},
          "relative_patch": {"trunk", "g_tile_norm", "g_tile_out", "relative_position_classifier"},
      }[method]
  )


def test_pirl_rotation_loss_matches_numpy():
  config = _config("pirl_rotation")
  model, before, after, metrics = _run_steps(config, 1, num_steps=1)
  batch = _batch(config, 0)
  params, loss_cfg = before.params, config.loss
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  f_hat = unit(_dense(params["f_out"], _head_input(model, before, batch["image"], "f")))
  g_hat = unit(_dense(params["g_rot_out"], _head_input(model, before, batch["rotated"], "g_rot")))
  _, rotated_rng, image_rng = jax.random.split(before.rng, 3)
  index, bank = batch["index"], np.asarray(before.bank, np.float64)

  def term(query, rng):
    negatives = np.asarray(
        memory_bank.sample_negatives(rng, index, loss_cfg.num_negatives, NUM_EXAMPLES)
    )
    rows = bank[np.concatenate([index[:, None], negatives], axis=1)]
    scores = np.einsum("bkd,bd->bk", rows, query) / loss_cfg.temperature
    return _cross_entropy(scores, np.zeros(len(index), int))

  rotated_term, image_term = term(g_hat, rotated_rng), term(f_hat, image_rng)
  lam = loss_cfg.jigsaw_weight
  np.testing.assert_allclose(metrics[0]["loss_rotated"], rotated_term, rtol=1e-5)
  np.testing.assert_allclose(metrics[0]["loss_image"], image_term, rtol=1e-5)
  np.testing.assert_allclose(
      metrics[0]["loss"], lam * rotated_term + (1 - lam) * image_term, rtol=1e-5
  )
  # The bank takes f(image), never g(rotated).
  m = config.memory_bank.momentum
  np.testing.assert_allclose(
      after.bank[index], unit(m * bank[index] + (1 - m) * f_hat), rtol=1e-5, atol=1e-6
  )
  assert {"f_out", "g_rot_out", "trunk"} <= set(params) and "g_concat" not in params
  # The trunk's running statistics are the upright image pass's; g's BatchNorm keeps its own.
  assert set(after.batch_stats) == {"trunk", "f_norm", "g_rot_norm"}


@pytest.mark.parametrize(
    "method",
    [
        "jigsaw",
        "rotation",
        # The bank path is PIRL's (test_train) and the tile classifier jigsaw's: in the slow set.
        *[pytest.param(m, marks=pytest.mark.slow) for m in ("pirl_rotation", "relative_patch")],
    ],
)
def test_eight_devices_equal_one_device(method):
  config = _config(method)
  _, _, one, metrics_one = _run_steps(config, 1)
  _, _, eight, metrics_eight = _run_steps(config, 8)
  for m1, m8 in zip(metrics_one, metrics_eight):
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for field in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(getattr(one, field)), jax.tree.leaves(getattr(eight, field))):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  if method == "pirl_rotation":
    np.testing.assert_allclose(one.bank, eight.bank[:NUM_EXAMPLES], atol=1e-5)
  else:  # the placeholder bank: one zero row per device
    assert one.bank.shape == (1, 128) and eight.bank.shape == (8, 128)


# ----------------------------------------------------------------- config and CLI runs ----


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"method": "jigsaw", "data.views.grid": 2}, "data.views.grid"),
        (
            {"method": "relative_patch", "data.views.grid": 4, "data.views.tile_size": 8},
            "data.views.grid",
        ),
        ({"method": "jigsaw", "jigsaw_permutations": 1}, "jigsaw_permutations"),
        (
            {"method": "rotation", "model.bn_running_stats": "tiles_and_images"},
            "model.bn_running_stats",
        ),
        (
            {"method": "rotation", "loss.kind": "nce", "loss.nce_z_from": "jigsaw"},
            "loss.nce_z_from",
        ),
        ({"method": "exemplar"}, "method"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
  config = pirl_configs.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(configuration.ConfigError, match=field.replace(".", r"\.")):
    configuration.validate_pretrain_config(config)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """Each new method's tiny run through main.py (2 steps, probes at the end)."""
  return tmp_path_factory.mktemp("methods")


def _data_flags(small_isic_root, shared_cache_dir):
  return [
      "--config.data.source=isic",
      f"--config.data.path={small_isic_root}",
      f"--config.data.cache_dir={shared_cache_dir}",
  ]


def _pretrain_through_main(method, workdir, data_flags, capsys, monkeypatch):
  return main_in_process(
      [
          "--config=configs/pirl.py:tiny",
          f"--config.method={method}",
          "--config.num_train_steps=2",
          "--config.jigsaw_permutations=30",
          f"--workdir={workdir}",
          *data_flags,
      ],
      capsys,
      monkeypatch,
  )


@pytest.mark.parametrize(
    "method",
    [
        "jigsaw",  # the CI set runs one method through main.py; each method's step is tested above
        *[
            pytest.param(m, marks=pytest.mark.slow)
            for m in ("pirl_rotation", "rotation", "relative_patch")
        ],
    ],
)
def test_each_method_pretrains_through_main(
    method, tiny_runs, small_isic_root, shared_cache_dir, capsys, monkeypatch
):
  workdir = tiny_runs / method
  code, out, err = _pretrain_through_main(
      method, workdir, _data_flags(small_isic_root, shared_cache_dir), capsys, monkeypatch
  )
  assert code in (0, None), err[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["complete"] and summary["step"] == 2
  assert {"knn_auc_mean", "linear_auc_mean"} <= set(summary["evaluations"]["probe"])
  if method in methods.CLASSIFICATION_METHODS:
    assert "accuracy" in summary["metrics"] and "positive_similarity" not in summary["metrics"]
    assert " accuracy " in err
  else:
    assert "[rotated " in err
  assert json.loads((workdir / "config.json").read_text())["method"] == method


def test_fine_tuning_starts_from_a_covariant_run(
    tiny_runs, small_isic_root, shared_cache_dir, capsys, monkeypatch
):
  data_flags = _data_flags(small_isic_root, shared_cache_dir)
  pretrained = tiny_runs / "jigsaw"
  if not (pretrained / "summary.json").is_file():  # run alone: pretrain it here (never skip)
    code, _, err = _pretrain_through_main("jigsaw", pretrained, data_flags, capsys, monkeypatch)
    assert code in (0, None), err[-3000:]
  workdir = tiny_runs / "jigsaw-finetune"
  code, _, err = main_in_process(
      [
          "--config=configs/finetune_isic.py:tiny",
          f"--config.init.checkpoint={pretrained}",
          f"--workdir={workdir}",
          *data_flags,
      ],
      capsys,
      monkeypatch,
  )
  assert code in (0, None), err[-3000:]
  assert "auc_mean" in json.loads((workdir / "metrics.json").read_text())["test"]
