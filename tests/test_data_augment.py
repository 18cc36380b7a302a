"""Tests for the stateless augmentations (pirl_jax.data.augment) and their use by the views and
the fine-tuning input."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from pirl_jax.data import augment
from pirl_jax.data import jigsaw
from pirl_jax.data import labelled_views
from pirl_jax.user_errors import UserError
import helpers  # tests/helpers.py

SMALL_VIEWS = jigsaw.ViewConfig(image_size=64, jigsaw_crop_size=75, tile_size=21)
FINETUNE_CONFIGS = [
    labelled_views.AugmentConfig(image_size=48, rotation_degrees=15.0),
    labelled_views.AugmentConfig(image_size=40, rot90=False, color_jitter=(0.4, 0.3, 0.2, 0.1)),
]
JITTER = dict(color_jitter=(0.4, 0.4, 0.4, 0.2), grayscale_prob=0.2, flip_prob=0.5)
NO_JITTER = dict(color_jitter=(0.0, 0.0, 0.0, 0.0), grayscale_prob=0.0, flip_prob=0.0)


def _jpeg(i):
  return tf.io.encode_jpeg(helpers.noise_image(i, 90 + 13 * i, 120), quality=95).numpy()


def _seed(i):
  return tf.constant([i, 12345], tf.int64)


def _image_pixels(image):
  s = image.shape[0]
  return np.stack([image[0, 0], image[5, 6], image[s - 1, s // 2]])


def _tile_pixels(tiles):
  return np.stack([tiles[0, 0, 0], tiles[4, 10, 7], tiles[8, 20, 20]])


# ------------------------------------------------- outputs pinned before augment.py existed ----

# Pixels of the views of jpeg(0) and jpeg(1) (indices 40 and 41, seed 7, epoch 2, SMALL_VIEWS):
# image view at _IMAGE_PIXELS, jigsaw tiles at _TILE_PIXELS.
PINNED_VIEWS = [
    (
        [
            [1.1096218824386597, 1.0735067129135132, 0.4428247809410095],
            [-0.949751079082489, 0.7847897410392761, -0.5743899941444397],
            [-1.4806147813796997, 0.6891288161277771, -1.3496663570404053],
        ],
        [
            [-0.5674954056739807, 1.486677885055542, -0.40496233105659485],
            [1.8499782085418701, -1.559325933456421, 2.4144909381866455],
            [0.9738537669181824, -0.45754629373550415, 1.954939842224121],
        ],
    ),
    (
        [
            [1.407295823097229, 1.5681730508804321, 1.7834258079528809],
            [0.4295615553855896, 0.5686143636703491, 0.7883094549179077],
            [-0.928551197052002, -0.8198134899139404, -0.5939475893974304],
        ],
        [
            [1.2381696701049805, 1.3952717781066895, 1.611292839050293],
            [-1.7076506614685059, 2.4285717010498047, -1.4947806596755981],
            [0.8936612606048584, -0.5933959484100342, 0.7214762568473816],
        ],
    ),
]
# train_example pixels of jpeg(0) and jpeg(1) (indices 5 and 6) and eval_image pixels of jpeg(2),
# for each of FINETUNE_CONFIGS, at _IMAGE_PIXELS.
PINNED_TRAIN = [
    [
        [
            [-0.14171329140663147, -0.33434441685676575, -0.04763682931661606],
            [-0.7190006971359253, 1.1795347929000854, -0.9381501078605652],
            [-1.036423683166504, 1.0527453422546387, -0.10547267645597458],
        ],
        [
            [-0.23877321183681488, -0.6870346665382385, -1.0625731945037842],
            [0.9468393325805664, 0.7797779440879822, 1.3356740474700928],
            [-0.4994488060474396, 0.19732290506362915, 1.2737315893173218],
        ],
    ],
    [
        [
            [0.7929984331130981, -0.4724872410297394, 1.0088008642196655],
            [-0.672566831111908, 0.8554034233093262, -1.1918823719024658],
            [-0.17483825981616974, -0.8473947644233704, 0.5252182483673096],
        ],
        [
            [0.7361647486686707, 0.18700984120368958, 0.4486599564552307],
            [-0.9517213106155396, -0.2240920513868332, 0.09715981781482697],
            [0.12111742049455643, 0.32317066192626953, 0.04060904309153557],
        ],
    ],
]
PINNED_EVAL = [
    [
        [-0.6984813213348389, -0.3190092444419861, -0.7874239683151245],
        [-1.2999359369277954, 0.7379737496376038, -0.7264862656593323],
        [0.6133716106414795, 0.04359813779592514, 0.5380566120147705],
    ],
    [
        [0.44924670457839966, -0.9114785194396973, -0.4769836664199829],
        [0.5347806811332703, 1.8493961095809937, 0.6199207901954651],
        [0.10629069805145264, 0.8594599962234497, 1.4757425785064697],
    ],
]


def test_views_and_finetuning_input_match_the_values_pinned_before_the_move():
  """The augmentation moved out of jigsaw.py bit for bit: same seed, same float32 pixels."""
  ds = tf.data.Dataset.from_tensor_slices(([_jpeg(0), _jpeg(1)], np.array([40, 41], np.int64)))
  views = list(ds.map(lambda b, i: jigsaw.make_views(b, i, 7, 2, SMALL_VIEWS)).as_numpy_iterator())
  for got, (image, tiles) in zip(views, PINNED_VIEWS, strict=True):
    np.testing.assert_array_equal(_image_pixels(got["image"]), np.float32(image))
    np.testing.assert_array_equal(_tile_pixels(got["tiles"]), np.float32(tiles))
  for cfg, train, evaluated in zip(FINETUNE_CONFIGS, PINNED_TRAIN, PINNED_EVAL, strict=True):
    ds = tf.data.Dataset.from_tensor_slices(([_jpeg(0), _jpeg(1)], np.array([5, 6], np.int64)))
    examples = list(
        ds.map(
            lambda b, i, cfg=cfg: labelled_views.train_example(b, 1, i, i * 4 + 1, 7, 2, cfg)
        ).as_numpy_iterator()
    )
    for got, want in zip(examples, train, strict=True):
      np.testing.assert_array_equal(_image_pixels(got["image"]), np.float32(want))
    np.testing.assert_array_equal(
        _image_pixels(labelled_views.eval_image(_jpeg(2), cfg).numpy()), np.float32(evaluated)
    )


# ------------------------------------------------------------------------- seeds, decode ----


def test_example_seed_is_distinct():
  seeds = {
      tuple(augment.example_seed(s, e, i).numpy())
      for s, e, i in itertools.product(range(2), range(3), range(4))
  }
  assert len(seeds) == 24


def test_decode_returns_uint8_rgb():
  image = augment.decode(tf.io.encode_jpeg(helpers.noise_image(0, 30, 40)).numpy())
  assert image.dtype == tf.uint8 and image.shape == (30, 40, 3)


# ------------------------------------------------------------------- random resized crop ----


@tf.function
def _windows(height, width, seeds, scale, ratio):
  return tf.map_fn(
      lambda s: tf.stack(augment.random_resized_crop_window(height, width, s, scale, ratio)),
      seeds,
      fn_output_signature=tf.int32,
  )


def test_random_resized_crop_window_statistics():
  seeds = tf.random.experimental.stateless_split(tf.constant([3, 4], tf.int64), 300)
  height, width = 120, 160
  top, left, h, w = _windows(height, width, seeds, (0.08, 1.0), (3 / 4, 4 / 3)).numpy().T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= height) and np.all(left + w <= width)
  area = h * w / (height * width)
  assert area.min() >= 0.07 and area.max() <= 1.0
  assert area.min() < 0.15 and area.max() > 0.8  # covers the range
  aspect = w / h
  assert aspect.min() > 0.72 and aspect.max() < 1.37
  assert len(set(zip(top, left))) > 250


def test_random_resized_crop_falls_back_to_centre_crop():
  seeds = tf.random.experimental.stateless_split(tf.constant([3, 4], tf.int64), 5)
  # A 10x300 strip has no crop with aspect ratio in [3/4, 4/3] of area >= 50%.
  windows = _windows(10, 300, seeds, (0.5, 1.0), (3 / 4, 4 / 3)).numpy()
  np.testing.assert_array_equal(windows, [[0, 143, 10, 13]] * 5)
  out = augment.random_resized_crop(
      np.zeros((10, 300, 3), np.uint8), seeds[0], 32, (0.5, 1.0), (3 / 4, 4 / 3)
  )
  assert out.shape == (32, 32, 3) and out.dtype == tf.float32


def test_random_resized_crop_full_scale_is_a_resize():
  image = helpers.noise_image(1, 50, 50)
  out = augment.random_resized_crop(image, _seed(0), 40, (1.0, 1.0), (1.0, 1.0))
  expected = tf.image.resize(image, [40, 40], antialias=True) / 255.0
  np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)
  assert 0.0 <= out.numpy().min() and out.numpy().max() <= 1.0 + 1e-6


# ----------------------------------------------------------------------------------- colour ----


def test_color_augment_range_identity_grayscale_and_flip():
  image = tf.constant(helpers.noise_image(2, 32, 32), tf.float32) / 255.0
  for i in range(4):
    out = augment.color_augment(image, _seed(i), **JITTER).numpy()
    assert out.shape == (32, 32, 3) and 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_array_equal(augment.color_augment(image, _seed(0), **NO_JITTER).numpy(), image)
  out = augment.color_augment(image, _seed(0), **{**NO_JITTER, "grayscale_prob": 1.0}).numpy()
  np.testing.assert_allclose(out[..., 0], out[..., 1])
  np.testing.assert_allclose(out[..., 0], out[..., 2])
  flipped = augment.color_augment(image, _seed(0), **{**NO_JITTER, "flip_prob": 1.0}).numpy()
  np.testing.assert_array_equal(flipped, image.numpy()[:, ::-1])


def test_color_jitter_matches_torchvision_formulas():
  """Each jitter op alone: brightness scales, contrast/saturation blend with grey."""
  image = tf.constant(helpers.noise_image(4, 16, 16), tf.float32) / 255.0
  x = image.numpy()
  gray_w = np.array([0.2989, 0.587, 0.114], np.float32)
  gray = (x @ gray_w)[..., None]
  cases = {
      0: lambda f: x * f,
      1: lambda f: f * x + (1 - f) * gray.mean(),
      2: lambda f: f * x + (1 - f) * gray,
  }
  for which, formula in cases.items():
    strengths = [0.0, 0.0, 0.0, 0.0]
    strengths[which] = 0.4
    out = augment.color_augment(
        image, _seed(which), color_jitter=strengths, grayscale_prob=0.0, flip_prob=0.0
    ).numpy()
    # Recover the factor by least squares and check the formula fits exactly.
    candidates = np.linspace(0.6, 1.4, 8001)
    errs = [np.abs(np.clip(formula(f), 0, 1) - out).max() for f in candidates]
    assert min(errs) < 1e-3, which
    assert abs(candidates[int(np.argmin(errs))] - 1.0) > 1e-3  # not a no-op


# ------------------------------------------------------------------------ geometric, norm ----


def test_rot90_flip_and_rotation_permute_or_resample_pixels():
  image = tf.constant(helpers.noise_image(3, 24, 24), tf.float32) / 255.0
  x = image.numpy()
  rotations = {tuple(augment.random_rot90(image, _seed(i)).numpy()[0, 0]) for i in range(16)}
  assert rotations == {tuple(x[0, 0]), tuple(x[0, -1]), tuple(x[-1, 0]), tuple(x[-1, -1])}
  flips = [augment.random_flip(image, _seed(i), axis=0).numpy() for i in range(8)]
  assert all(np.array_equal(f, x) or np.array_equal(f, x[::-1]) for f in flips)
  assert any(np.array_equal(f, x[::-1]) for f in flips) and any(np.array_equal(f, x) for f in flips)
  np.testing.assert_allclose(augment.rotate(image, tf.constant(0.0)).numpy(), x, atol=1e-6)
  np.testing.assert_allclose(
      augment.rotate(image, tf.constant(np.pi)).numpy(), x[::-1, ::-1], atol=1e-5
  )
  assert augment.random_rotation(image, _seed(0), 30.0).shape == (24, 24, 3)


def test_normalize_subtracts_mean_and_divides_by_std():
  out = augment.normalize(tf.fill([2, 2, 3], 0.5), (0.5, 0.25, 0.0), (1.0, 0.5, 0.25)).numpy()
  np.testing.assert_allclose(out[0, 0], [0.0, 0.5, 2.0])


# ------------------------------------------------------- fine-tuning augmentation settings ----


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(color_jitter=(0.2, 0.2, 0.2, 0.7)), "color_jitter"),
        (dict(color_jitter=(-0.1, 0.2, 0.2, 0.0)), "color_jitter"),
        (dict(color_jitter=(0.2, 0.2, 0.2)), "color_jitter"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(crop_scale=(0.5, 0.1)), "crop_scale"),
    ],
)
def test_augment_config_names_its_own_field(overrides, field):
  with pytest.raises(ValueError, match=f"config.augment.{field}=") as err:
    labelled_views.AugmentConfig(**overrides)
  assert isinstance(err.value, UserError)
  assert "data.views" not in str(err.value)
