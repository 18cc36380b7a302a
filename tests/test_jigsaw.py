"""Tests for the PIRL image and jigsaw views (pirl_jax.data.jigsaw).

The augmentations they are built from are tested in test_data_augment.py.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from pirl_jax.data import augment
from pirl_jax.data import jigsaw
import helpers  # tests/helpers.py

SMALL = jigsaw.ViewConfig(image_size=64, jigsaw_crop_size=75, tile_size=21)
PAPER = jigsaw.ViewConfig()


def _plain(cfg, **overrides):
  """cfg without photometric augmentation and with identity normalisation."""
  return dataclasses.replace(
      cfg,
      tile_photometric=False,
      image_photometric=False,
      mean=(0.0, 0.0, 0.0),
      std=(1.0, 1.0, 1.0),
      **overrides,
  )


def _jpeg(array):
  return tf.io.encode_jpeg(array, quality=95).numpy()


def _seed(i):
  return tf.constant([i, 12345], tf.int64)


def _locate(tile, cell_pixels):
  """Offsets (dy, dx) at which `tile` is exactly a window of `cell_pixels`."""
  t = tile.shape[0]
  windows = np.lib.stride_tricks.sliding_window_view(cell_pixels, (t, t, 3))[..., 0, :, :, :]
  hits = np.all(windows == tile[None, None], axis=(2, 3, 4))
  return [tuple(int(v) for v in p) for p in np.argwhere(hits)]


@tf.function
def _small_plain_view(image, seed):
  cfg = _plain(SMALL)
  tiles, perm = jigsaw.jigsaw_view(image, seed, cfg, return_permutation=True)
  return tiles, perm, jigsaw.jigsaw_crop(image, seed, cfg)


# ---------------------------------------------------------------- config ----


def test_config_defaults_are_the_paper_values():
  assert PAPER.cell_size == 85 and PAPER.num_tiles == 9
  assert (PAPER.image_size, PAPER.jigsaw_crop_size, PAPER.tile_size) == (224, 255, 64)
  assert PAPER.color_jitter == (0.4, 0.4, 0.4, 0.2)


def test_config_normalises_lists_to_tuples():
  cfg = jigsaw.ViewConfig(mean=[0.5, 0.5, 0.5], crop_ratio=[1, 2])
  assert cfg.mean == (0.5, 0.5, 0.5) and cfg.crop_ratio == (1.0, 2.0)
  hash(cfg)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tile_size=86), "tile_size"),
        (dict(jigsaw_crop_size=75, tile_size=26), "tile_size"),
        (dict(image_crop_scale=(0.5, 0.1)), "image_crop_scale"),
        (dict(jigsaw_crop_scale=(0.6, 1.2)), "jigsaw_crop_scale"),
        (dict(crop_ratio=(0.0, 1.0)), "crop_ratio"),
        (dict(color_jitter=(0.4, 0.4, 0.4, 0.7)), "color_jitter"),
        (dict(color_jitter=(0.4, 0.4, 0.4)), "color_jitter"),
        (dict(grayscale_prob=1.5), "grayscale_prob"),
        (dict(flip_prob=-0.1), "flip_prob"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(grid=0), "grid"),
        (dict(image_size=0), "image_size"),
        (dict(tile_photometric=1), "tile_photometric"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"data.views.{field}"):
    jigsaw.ViewConfig(**kwargs)


# ---------------------------------------------------------------- shapes ----


@pytest.mark.parametrize("cfg", [SMALL, PAPER], ids=["small", "paper"])
def test_make_views_shapes_and_dtypes(cfg):
  data = [_jpeg(helpers.noise_image(i, 200 + 40 * i, 260)) for i in range(2)]
  ds = tf.data.Dataset.from_tensor_slices((data, np.arange(2, dtype=np.int64)))
  ds = ds.map(
      lambda b, i: jigsaw.make_views(b, i, 0, 0, cfg), num_parallel_calls=tf.data.AUTOTUNE
  ).batch(2)
  s, t = cfg.image_size, cfg.tile_size
  assert ds.element_spec["image"].shape.as_list() == [None, s, s, 3]
  assert ds.element_spec["tiles"].shape.as_list() == [None, 9, t, t, 3]
  batch = next(iter(ds.as_numpy_iterator()))
  assert batch["image"].shape == (2, s, s, 3) and batch["image"].dtype == np.float32
  assert batch["tiles"].shape == (2, 9, t, t, 3) and batch["tiles"].dtype == np.float32
  assert batch["index"].dtype == np.int32 and list(batch["index"]) == [0, 1]
  assert np.all(np.isfinite(batch["image"])) and np.all(np.isfinite(batch["tiles"]))


# ------------------------------------------------------- jigsaw geometry ----


def test_tiles_are_exact_windows_of_their_cells():
  cfg = _plain(SMALL)
  cell, t = cfg.cell_size, cfg.tile_size
  offsets = []
  for i in range(12):
    image = helpers.noise_image(i, 90 + 7 * i, 120)
    tiles, perm, crop = (x.numpy() for x in _small_plain_view(image, _seed(i)))
    assert sorted(perm.tolist()) == list(range(9))
    for k in range(9):
      r, c = divmod(int(perm[k]), cfg.grid)
      cell_pixels = crop[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
      hits = _locate(tiles[k], cell_pixels)
      assert len(hits) == 1, f"example {i} tile {k}: found at {hits}"
      offsets.append(hits[0])
  offsets = np.array(offsets)
  assert offsets.min() == 0 and offsets.max() == cell - t
  # Offsets are drawn per tile and independently in y and x.
  assert len(set(map(tuple, offsets))) == (cell - t + 1) ** 2
  assert not np.array_equal(offsets[:, 0], offsets[:, 1])


def test_paper_size_tiles_are_normalised_windows_of_their_cells():
  cfg = dataclasses.replace(PAPER, tile_photometric=False)
  image = helpers.noise_image(3, 300, 380)
  seed = _seed(3)
  tiles, perm = jigsaw.jigsaw_view(image, seed, cfg, return_permutation=True)
  crop = jigsaw.jigsaw_crop(image, seed, cfg).numpy()
  assert crop.shape == (255, 255, 3)
  pixels = tiles.numpy() * np.array(cfg.std, np.float32) + np.array(cfg.mean, np.float32)
  for k, c in enumerate(perm.numpy()):
    r, c = divmod(int(c), 3)
    cell_pixels = crop[r * 85 : (r + 1) * 85, c * 85 : (c + 1) * 85]
    windows = np.lib.stride_tricks.sliding_window_view(cell_pixels, (64, 64, 3))
    err = np.abs(windows[:, :, 0] - pixels[k][None, None]).max(axis=(2, 3, 4))
    assert err.shape == (22, 22) and err.min() < 1e-5


def test_permutations_are_uniformish_and_cover_every_position():
  perms = []
  image = helpers.noise_image(0, 80, 80)
  for i in range(60):
    _, perm, _ = _small_plain_view(image, _seed(1000 + i))
    perms.append(perm.numpy())
  perms = np.array(perms)
  assert all(sorted(p.tolist()) == list(range(9)) for p in perms)
  assert len({tuple(p) for p in perms}) == len(perms)
  # Every cell shows up at every output position.
  counts = np.zeros((9, 9), int)
  for p in perms:
    counts[np.arange(9), p] += 1
  assert counts.min() > 0


def test_tile_photometric_is_independent_per_tile():
  image = np.empty((100, 100, 3), np.uint8)
  image[...] = (150, 90, 60)
  on = dataclasses.replace(SMALL, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  tiles = jigsaw.jigsaw_view(image, _seed(7), on).numpy()
  colours = tiles.mean(axis=(1, 2))
  assert len({tuple(np.round(c, 4)) for c in colours}) == 9
  off = dataclasses.replace(on, tile_photometric=False)
  tiles = jigsaw.jigsaw_view(image, _seed(7), off).numpy()
  np.testing.assert_allclose(tiles, np.broadcast_to(tiles[:1], tiles.shape), atol=1e-6)


def test_tile_flip_is_drawn_per_tile():
  cfg = _plain(SMALL, flip_prob=0.5, grayscale_prob=0.0, color_jitter=(0.0, 0.0, 0.0, 0.0))
  cfg = dataclasses.replace(cfg, tile_photometric=True)
  cell = cfg.cell_size
  flipped = []
  for i in range(3):
    image = helpers.noise_image(i, 100, 100)
    tiles, perm = jigsaw.jigsaw_view(image, _seed(i), cfg, return_permutation=True)
    crop = jigsaw.jigsaw_crop(image, _seed(i), cfg).numpy()
    for k, p in enumerate(perm.numpy()):
      r, c = divmod(int(p), cfg.grid)
      cell_pixels = crop[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
      straight = bool(_locate(tiles[k].numpy(), cell_pixels))
      mirrored = bool(_locate(tiles[k].numpy()[:, ::-1], cell_pixels))
      assert straight != mirrored
      flipped.append(mirrored)
  assert 0 < sum(flipped) < len(flipped)


# ----------------------------------------------------------- determinism ----


def _pipeline(data, indices, seed, epoch, cfg=SMALL):
  ds = tf.data.Dataset.from_tensor_slices((data, indices))
  ds = ds.map(
      lambda b, i: jigsaw.make_views(b, i, seed, epoch, cfg), num_parallel_calls=tf.data.AUTOTUNE
  )
  return list(ds.as_numpy_iterator())


def test_pipeline_is_deterministic_and_keyed_by_seed_epoch_index():
  data = [_jpeg(helpers.noise_image(i, 96, 128)) for i in range(4)]
  indices = np.arange(4, dtype=np.int64)
  first = _pipeline(data, indices, 0, 3)
  second = _pipeline(data, indices, 0, 3)
  for a, b in zip(first, second):
    for key in ("image", "tiles", "index"):
      np.testing.assert_array_equal(a[key], b[key])

  def differ(x, y):
    return not np.array_equal(x["image"], y["image"]) and not np.array_equal(x["tiles"], y["tiles"])

  other_epoch = _pipeline(data, indices, 0, 4)
  other_seed = _pipeline(data, indices, 1, 3)
  other_index = _pipeline(data, indices + 10, 0, 3)
  for k in range(4):
    assert differ(first[k], other_epoch[k])
    assert differ(first[k], other_seed[k])
    assert differ(first[k], other_index[k])
  # Same bytes, different dataset index: different views.
  same_bytes = _pipeline([data[0]] * 2, np.array([5, 6]), 0, 3)
  assert differ(same_bytes[0], same_bytes[1])


# ------------------------------------------------------------ image view ----


def test_image_view_is_normalised():
  image = helpers.noise_image(5, 120, 150)
  cfg = SMALL
  views = np.stack([jigsaw.image_view(image, _seed(i), cfg).numpy() for i in range(4)])
  pixels = views * np.array(cfg.std, np.float32) + np.array(cfg.mean, np.float32)
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  # Without augmentation the view is the normalised crop.
  plain = dataclasses.replace(cfg, image_photometric=False)
  view = jigsaw.image_view(image, _seed(0), plain).numpy()
  crop_seed = tf.random.experimental.stateless_split(_seed(0), 2)[0]
  crop = augment.random_resized_crop(
      image, crop_seed, 64, cfg.image_crop_scale, cfg.crop_ratio
  ).numpy()
  np.testing.assert_allclose(view, (crop - np.array(cfg.mean)) / np.array(cfg.std), atol=1e-5)
