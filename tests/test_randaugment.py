"""Tests for RandAugment and cutout (pirl_jax.data.randaugment): each op against NumPy or against
PIL (what UDA ran), the random policy's draws, determinism and tf.data use."""

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from pirl_jax.data import augment
from pirl_jax.data import randaugment as ra

GREY = 128.0 / 255.0
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, PIL's convert("L")


def _test_image(height=32, width=32):
  """uint8: distinct channels (x ramp, y ramp, a product pattern) and a bright off-centre square."""
  ys, xs = np.indices((height, width))
  image = np.stack([40 + 5 * xs, 100 + 3 * ys, 60 + (xs * ys) % 50], axis=-1)
  image[6:12, 20:26] = (230, 220, 200)
  return image.astype(np.uint8)


def _smooth_noise(seed, height, width):
  """uint8 with smooth colour structure (a blown-up random image)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 4, width // 4, 3)).astype(np.uint8)
  return np.array(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _float(image_u8):
  return tf.constant(image_u8, tf.float32) / 255.0


def _op(image_u8, op, level, sign=1.0):
  return ra.apply_op(_float(image_u8), op, level, sign).numpy()


def _seed(i):
  return tf.constant([i, 2024], tf.int64)


def _centroid(weights):
  ys, xs = np.indices(weights.shape)
  return (weights * ys).sum() / weights.sum(), (weights * xs).sum() / weights.sum()


# -------------------------------------------------------------------------- every op ----


def test_ops_are_randaugments_fourteen_in_order():
  assert ra.OPS == (
      "identity",
      "autocontrast",
      "equalize",
      "rotate",
      "solarize",
      "color",
      "posterize",
      "contrast",
      "brightness",
      "sharpness",
      "shear_x",
      "shear_y",
      "translate_x",
      "translate_y",
  )
  assert ra.MAX_LEVEL == 10
  with pytest.raises(ValueError, match="'invert'"):
    ra.apply_op(_float(_test_image()), "invert", 5.0)


@pytest.mark.parametrize("op", ra.OPS)
def test_op_keeps_shape_dtype_and_range_on_a_non_square_image(op):
  image = _float(_smooth_noise(0, 24, 40))
  for level, sign in [(0.0, 1.0), (10.0, 1.0), (7.5, -1.0)]:
    out = ra.apply_op(image, op, tf.constant(level), sign).numpy()
    assert out.shape == (24, 40, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
  # In a graph, the static shape of the input survives.
  graph_op = tf.function(
      lambda x, level: ra.apply_op(x, op, level),
      input_signature=[tf.TensorSpec([24, 40, 3], tf.float32), tf.TensorSpec([], tf.float32)],
  )
  assert graph_op.get_concrete_function().structured_outputs.shape == (24, 40, 3)


def test_identity_returns_the_image_exactly():
  image = _test_image()
  np.testing.assert_array_equal(_op(image, "identity", 10.0, -1.0), image / np.float32(255))


# ----------------------------------------------------------------------- 8-bit ops ----


def test_autocontrast_stretches_each_channel_and_leaves_a_constant_one():
  image = _test_image()
  out = _op(image, "autocontrast", 3.0)
  for c in range(3):
    v, o = image[..., c].ravel().astype(int), out[..., c].ravel()
    assert o[v == v.min()].max() == 0.0 and o[v == v.max()].min() == 1.0
    order = np.argsort(v, kind="stable")
    assert np.all(np.diff(o[order]) >= 0)  # monotone
    expected = (v - v.min()) * 255 // (v.max() - v.min()) / 255.0
    np.testing.assert_allclose(o, expected, atol=1e-6)
  # PIL (what UDA ran) computes the same table in floating point; equal up to one 8-bit step.
  np.testing.assert_allclose(
      out, np.asarray(ImageOps.autocontrast(Image.fromarray(image))) / 255.0, atol=1.01 / 255
  )
  constant = image.copy()
  constant[..., 1] = 77
  out = _op(constant, "autocontrast", 3.0)
  np.testing.assert_array_equal(out[..., 1], np.float32(77) / np.float32(255))
  assert out[..., 0].min() == 0.0 and out[..., 0].max() == 1.0


def _numpy_equalize(image_u8):
  """PIL's ImageOps.equalize algorithm, written out per channel."""
  out = image_u8.copy()
  for c in range(3):
    hist = np.bincount(image_u8[..., c].ravel(), minlength=256)
    nonzero = np.flatnonzero(hist)
    step = (hist.sum() - hist[nonzero[-1]]) // 255
    if step == 0:
      continue
    lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step, 255)
    out[..., c] = lut[image_u8[..., c]]
  return out


def test_equalize_matches_pil_and_numpy_on_8bit_images():
  # Channel 2 of the last image is almost constant: PIL's step is 0 and the channel unchanged.
  nearly_flat = _smooth_noise(2, 32, 32)
  nearly_flat[..., 2] = 200
  nearly_flat[:2, :3, 2] = 10
  for image in [_test_image(), _smooth_noise(1, 24, 40), nearly_flat]:
    out = _op(image, "equalize", 0.0)
    pil = np.asarray(ImageOps.equalize(Image.fromarray(image)))
    np.testing.assert_allclose(out, pil / 255.0, atol=1e-6)
    np.testing.assert_allclose(out, _numpy_equalize(image) / 255.0, atol=1e-6)
    assert np.abs(out - image / 255.0).max() > 0.1  # not a no-op
  np.testing.assert_array_equal(
      _op(nearly_flat, "equalize", 0.0)[..., 2], nearly_flat[..., 2] / np.float32(255)
  )


@pytest.mark.parametrize("level", [0.0, 1.0, 3.0, 7.5, 10.0])
def test_solarize_inverts_values_at_or_above_the_threshold(level):
  image = _smooth_noise(3, 32, 32)
  threshold = 256 - int(256 * level / 10)
  expected = np.where(image >= threshold, 255 - image.astype(int), image)
  out = _op(image, "solarize", level)
  np.testing.assert_allclose(out, expected / 255.0, atol=1e-6)
  if level == 0.0:
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)
  else:
    assert np.any(expected != image)
  if level == int(level):
    pil = np.asarray(ImageOps.solarize(Image.fromarray(image), threshold))
    np.testing.assert_allclose(out, pil / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "level, bits", [(0.0, 4), (2.4, 4), (2.5, 3), (5.0, 2), (9.0, 1), (10.0, 1)]
)
def test_posterize_keeps_the_top_bits(level, bits):
  image = _smooth_noise(4, 32, 32)
  mask = (0xFF << (8 - bits)) & 0xFF
  out = _op(image, "posterize", level)
  np.testing.assert_allclose(out, (image & mask) / 255.0, atol=1e-6)
  pil = np.asarray(ImageOps.posterize(Image.fromarray(image), bits))
  np.testing.assert_allclose(out, pil / 255.0, atol=1e-6)


# ----------------------------------------------------------------------- enhancements ----


def _numpy_smooth(x):
  """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) in float, the border left as it is."""
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0
  out = x.copy()
  h, w = x.shape[:2]
  for i in range(1, h - 1):
    for j in range(1, w - 1):
      out[i, j] = np.tensordot(kernel, x[i - 1 : i + 2, j - 1 : j + 2], axes=([0, 1], [0, 1]))
  return out


_DEGENERATE = {
    "color": lambda x: np.repeat((x @ GRAY_WEIGHTS)[..., None], 3, axis=-1),
    "contrast": lambda x: np.full_like(x, (x @ GRAY_WEIGHTS).mean()),
    "brightness": np.zeros_like,
    "sharpness": _numpy_smooth,
}
_ENHANCERS = {
    "color": ImageEnhance.Color,
    "contrast": ImageEnhance.Contrast,
    "brightness": ImageEnhance.Brightness,
    "sharpness": ImageEnhance.Sharpness,
}


@pytest.mark.parametrize("op", sorted(_DEGENERATE))
def test_enhancement_is_a_blend_with_its_degenerate_image(op):
  image = _smooth_noise(5, 24, 40)
  x = image / 255.0
  degenerate = _DEGENERATE[op](x)
  for level in [0.0, 2.5, 5.0, 10.0]:
    factor = 0.1 + 0.18 * level
    expected = np.clip(degenerate + factor * (x - degenerate), 0.0, 1.0)
    out = _op(image, op, level)
    # tf's grey weights are (0.2989, 0.587, 0.114): 1e-4 from PIL's 0.299.
    np.testing.assert_allclose(out, expected, atol=2e-4, err_msg=f"{op} level {level}")
    # PIL rounds the degenerate image and the blend to 8 bits (truncating): a few steps apart.
    pil = np.asarray(_ENHANCERS[op](Image.fromarray(image)).enhance(factor)) / 255.0
    np.testing.assert_allclose(out, pil, atol=2.01 / 255, err_msg=f"{op} level {level} vs PIL")
  out = _op(image, op, 0.0)
  if op == "color":  # factor 0.1: nearly grey
    assert (
        np.abs(out - out.mean(axis=-1, keepdims=True)).max()
        < 0.1 * np.abs(x - x.mean(axis=-1, keepdims=True)).max() + 1e-4
    )
  if op == "brightness":
    np.testing.assert_allclose(out, 0.1 * x, atol=1e-6)


# --------------------------------------------------------------------------- geometric ----


def _spot_image(size, y, x, radius=1):
  image = np.zeros((size, size, 3), np.uint8)
  image[y - radius : y + radius + 1, x - radius : x + radius + 1] = 255
  return image


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rotate_moves_a_spot_counter_clockwise_as_displayed_for_sign_plus(sign):
  size, y0, x0 = 33, 8, 24  # centre (16, 16); the spot right of and above it
  out = _op(_spot_image(size, y0, x0), "rotate", 10.0, sign)
  c = (size - 1) / 2
  theta = np.radians(30.0) * sign
  # Counter-clockwise on screen (y down) for theta > 0: right -> up.
  dx, dy = x0 - c, y0 - c
  want_x = c + dx * np.cos(theta) + dy * np.sin(theta)
  want_y = c - dx * np.sin(theta) + dy * np.cos(theta)
  ys, xs = np.indices((size, size))
  in_disc = (ys - c) ** 2 + (xs - c) ** 2 < 14.5**2  # the grey fill stays outside this disc
  got_y, got_x = _centroid(out[..., 0] * in_disc)
  np.testing.assert_allclose([got_y, got_x], [want_y, want_x], atol=0.05)
  if sign > 0:  # up and towards the vertical through the centre
    assert got_y < y0 - 2.5 and got_x < x0 - 4
  else:  # down and further right
    assert got_y > y0 + 2.5 and got_x > x0 + 2.5
  for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
    np.testing.assert_allclose(out[corner], GREY, atol=1e-6)
  np.testing.assert_allclose(
      _op(_smooth_noise(6, 24, 40), "rotate", 0.0, sign),
      _smooth_noise(6, 24, 40) / 255.0,
      atol=1e-5,
  )


def _vertical_line(size, x0):
  image = np.zeros((size, size, 3), np.uint8)
  image[:, x0] = 255
  return image


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_shear_x_shifts_row_y_by_shear_times_y(sign):
  size, x0 = 32, 16
  shear = 0.3 * sign
  out = _op(_vertical_line(size, x0), "shear_x", 10.0, sign)[..., 0]
  # Output (x, y) samples the input at (x + shear * y, y): the line is at x0 - shear * y, plus
  # PIL's half-pixel (its coordinates put pixel centres at i + 0.5).
  positions = []
  for y in range(size):
    want = x0 - shear * (y + 0.5)
    window = np.abs(np.arange(size) - want) <= 3  # away from the grey fill
    positions.append((out[y] * window * np.arange(size)).sum() / (out[y] * window).sum())
    assert positions[-1] == pytest.approx(want, abs=1e-3)
  np.testing.assert_allclose(
      np.array(positions) - positions[0], -shear * np.arange(size), atol=1e-3
  )
  # The uncovered corner (bottom right for +, bottom left for -) is grey.
  corner = out[-1, -1] if sign > 0 else out[-1, 0]
  assert corner == pytest.approx(GREY, abs=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_shear_y_shifts_column_x_by_shear_times_x(sign):
  size, y0 = 32, 16
  shear = 0.3 * sign
  horizontal = np.transpose(_vertical_line(size, y0), (1, 0, 2))
  out = _op(horizontal, "shear_y", 10.0, sign)[..., 0]
  for x in range(size):
    want = y0 - shear * (x + 0.5)
    window = np.abs(np.arange(size) - want) <= 3
    got = (out[:, x] * window * np.arange(size)).sum() / (out[:, x] * window).sum()
    assert got == pytest.approx(want, abs=1e-3)
  corner = out[-1, -1] if sign > 0 else out[0, -1]
  assert corner == pytest.approx(GREY, abs=1e-6)


@pytest.mark.parametrize(
    "op, sign",
    [("translate_x", 1.0), ("translate_x", -1.0), ("translate_y", 1.0), ("translate_y", -1.0)],
)
def test_translate_shifts_by_ten_32ths_of_the_side(op, sign):
  image = _smooth_noise(7, 24, 40)
  x = image / 255.0
  # Level 8: 0.8 * 10/32 of the side, 10 px of 40 across, 6 px of 24 down. Sign + samples the
  # input at x + shift (as PIL's AFFINE (1, 0, shift, 0, 1, 0)): the content moves left (up).
  out = _op(image, op, 8.0, sign)
  expected = np.full_like(x, GREY)
  if op == "translate_x":
    if sign > 0:
      expected[:, :30] = x[:, 10:]
    else:
      expected[:, 10:] = x[:, :30]
  else:
    if sign > 0:
      expected[:18] = x[6:]
    else:
      expected[6:] = x[:18]
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # A spot moves along one axis only.
  spot = _spot_image(32, 12, 14)
  got = _centroid(_op(spot, op, 10.0, sign)[..., 0] > 0.75)
  shift = -10.0 * sign
  want = (12.0, 14.0 + shift) if op == "translate_x" else (12.0 + shift, 14.0)
  np.testing.assert_allclose(got, want, atol=1e-6)


def _pil_interior(xin, yin, height, width):
  """Output pixels whose bilinear sample lies well inside the input (no border handling)."""
  return (xin >= 1) & (xin <= width - 2) & (yin >= 1) & (yin <= height - 2)


def test_geometric_ops_match_pil_bilinear_inside_the_image():
  """PIL (UDA's library, with bilinear resampling) on the pixels away from the borders."""
  h, w = 24, 40
  image = _smooth_noise(8, h, w)
  pil_image = Image.fromarray(image)
  ys, xs = np.indices((h, w)).astype(np.float64)
  theta = np.radians(21.0)  # level 7
  cx, cy = (w - 1) / 2, (h - 1) / 2
  shear = 0.3 * 0.7
  cases = {
      "rotate": (
          pil_image.rotate(21.0, resample=Image.BILINEAR),
          np.cos(theta) * (xs - cx) - np.sin(theta) * (ys - cy) + cx,
          np.sin(theta) * (xs - cx) + np.cos(theta) * (ys - cy) + cy,
      ),
      "shear_x": (
          pil_image.transform(
              (w, h), Image.AFFINE, (1, shear, 0, 0, 1, 0), resample=Image.BILINEAR
          ),
          xs + shear * (ys + 0.5),
          ys,
      ),
      "shear_y": (
          pil_image.transform(
              (w, h), Image.AFFINE, (1, 0, 0, shear, 1, 0), resample=Image.BILINEAR
          ),
          xs,
          ys + shear * (xs + 0.5),
      ),
      "translate_x": (
          pil_image.transform((w, h), Image.AFFINE, (1, 0, 8.75, 0, 1, 0), resample=Image.BILINEAR),
          xs + 8.75,
          ys,
      ),
      "translate_y": (
          pil_image.transform((w, h), Image.AFFINE, (1, 0, 0, 0, 1, 5.25), resample=Image.BILINEAR),
          xs,
          ys + 5.25,
      ),
  }
  for op, (pil, xin, yin) in cases.items():
    inside = _pil_interior(xin, yin, h, w)
    assert inside.sum() > 300, op
    out = _op(image, op, 7.0)
    np.testing.assert_allclose(
        out[inside], np.asarray(pil)[inside] / 255.0, atol=1.01 / 255, err_msg=op
    )


# ------------------------------------------------------------------------------- cutout ----


def test_cutout_paints_one_clipped_square_with_the_fill():
  h, w = 24, 40
  image = _float(_smooth_noise(9, h, w))  # values k/255: never the ImageNet mean exactly
  fill = np.float32(augment.IMAGENET_MEAN)
  side = 12  # 0.5 * min(24, 40)
  clipped = 0
  for i in range(40):
    out = ra.cutout(image, _seed(i), size_fraction=0.5).numpy()
    painted = np.all(out == fill, axis=-1)
    rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
    # One axis-aligned rectangle of contiguous rows and columns, all of it painted.
    assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
    assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
    assert painted.sum() == rows.size * cols.size
    for idx, n in [(rows, h), (cols, w)]:
      if idx[0] > 0 and idx[-1] < n - 1:
        assert idx.size == side
      else:
        assert 1 <= idx.size <= side  # clipped at a border (at least the centre remains)
        clipped += idx.size < side
    np.testing.assert_array_equal(out[~painted], image.numpy()[~painted])
    # Normalised with the same mean, the square is 0.
    normalised = augment.normalize(out, augment.IMAGENET_MEAN, augment.IMAGENET_STD).numpy()
    np.testing.assert_allclose(normalised[painted], 0.0, atol=1e-6)
  assert clipped > 0
  np.testing.assert_array_equal(ra.cutout(image, _seed(0), size_fraction=0.0).numpy(), image)
  other = ra.cutout(image, _seed(0), size_fraction=0.25, fill=(0.0, 1.0, 0.5)).numpy()
  assert np.all(other == np.float32([0.0, 1.0, 0.5]), axis=-1).sum() <= 6 * 6
  with pytest.raises(ValueError, match="size_fraction"):
    ra.cutout(image, _seed(0), size_fraction=1.5)


def test_cutout_centres_are_spread_over_the_image():
  image = tf.zeros([32, 32, 3])
  centres = []
  for i in range(60):
    painted = np.all(
        ra.cutout(image, _seed(i), size_fraction=0.125, fill=(1.0, 1.0, 1.0)).numpy() == 1.0,
        axis=-1,
    )
    centres.append(_centroid(painted.astype(float)))
  centres = np.array(centres)
  assert centres.min() < 6 and centres.max() > 26
  assert len({tuple(np.round(c)) for c in centres}) > 40


# -------------------------------------------------------------------------- the policy ----


@tf.function
def _draws(seeds, num_ops, magnitude, prob):
  return tf.map_fn(
      lambda s: ra.draw_ops(s, num_ops, magnitude, prob),
      seeds,
      fn_output_signature=ra.OpDraws(tf.int32, tf.float32, tf.float32, tf.bool),
  )


def test_draws_are_uniform_over_ops_and_random_levels_are_integers_1_to_9():
  n = 1400
  seeds = tf.random.experimental.stateless_split(tf.constant([5, 6], tf.int64), n)
  draws = _draws(seeds, 2, -1.0, 0.5)
  index = draws.index.numpy().ravel()
  counts = np.bincount(index, minlength=len(ra.OPS))
  assert counts.size == len(ra.OPS)
  expected = index.size / len(ra.OPS)  # 200
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))  # all picked, evenly
  level = draws.level.numpy().ravel()
  assert set(np.unique(level)) == set(range(1, 10))
  assert np.all(
      np.abs(np.bincount(level.astype(int))[1:] - index.size / 9) < 5 * np.sqrt(index.size / 9)
  )
  sign = draws.sign.numpy().ravel()
  assert set(np.unique(sign)) == {-1.0, 1.0} and abs(np.mean(sign)) < 0.1
  assert abs(draws.applied.numpy().mean() - 0.5) < 0.05
  # The two slots of one seed are independent draws.
  assert np.mean(draws.index.numpy()[:, 0] == draws.index.numpy()[:, 1]) < 0.15

  fixed = _draws(seeds[:50], 3, 7.0, 0.2)
  np.testing.assert_array_equal(fixed.level.numpy(), 7.0)
  assert abs(fixed.applied.numpy().mean() - 0.2) < 0.1


def test_randaugment_applies_the_drawn_ops_in_order():
  image = _float(_smooth_noise(10, 32, 32))
  checked = 0
  for i in range(12):
    draws = ra.draw_ops(_seed(i), 2, -1.0, 0.5)
    expected = image
    for index, level, sign, applied in zip(*(t.numpy() for t in draws)):
      if applied:
        expected = ra.apply_op(expected, ra.OPS[index], level, sign)
        checked += index != 0
    out = ra.randaugment(image, _seed(i), num_ops=2, magnitude=-1, prob=0.5)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5)
  assert checked >= 5


def test_randaugment_is_deterministic_seeded_and_an_identity_without_ops():
  image = _float(_smooth_noise(11, 32, 32))
  outs = [
      ra.randaugment(image, _seed(i), num_ops=2, magnitude=9.0, prob=1.0).numpy() for i in range(6)
  ]
  for out in outs:
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_array_equal(
      ra.randaugment(image, _seed(0), num_ops=2, magnitude=9.0, prob=1.0).numpy(), outs[0]
  )
  assert len({out.tobytes() for out in outs}) == len(outs)
  for kwargs in [dict(num_ops=0), dict(prob=0.0), dict(num_ops=3, magnitude=0.0, prob=0.0)]:
    np.testing.assert_array_equal(ra.randaugment(image, _seed(3), **kwargs).numpy(), image)


def test_strong_augment_in_a_parallel_dataset_map_equals_eager():
  image = _float(_smooth_noise(12, 32, 32))
  settings = dict(num_ops=2, magnitude=-1, prob=0.5, cutout_fraction=0.5)

  def example(i):
    seed = augment.example_seed(7, 0, i)
    return ra.strong_augment(image, seed, **settings)

  ds = tf.data.Dataset.range(8).map(example, num_parallel_calls=4, deterministic=True)
  element = ds.element_spec
  assert element.shape == (32, 32, 3) and element.dtype == tf.float32
  graph = list(ds.as_numpy_iterator())
  for i, got in enumerate(graph):
    np.testing.assert_array_equal(got, example(tf.constant(i, tf.int64)).numpy())
    # Cutout came last: the square of the mean colour is there.
    assert np.all(got == np.float32(augment.IMAGENET_MEAN), axis=-1).sum() >= 8 * 8
  assert len({g.tobytes() for g in graph}) == 8


@pytest.mark.parametrize(
    "values, named",
    [
        ((-1, -1, 0.5, 0.5), "num_ops"),
        ((1.5, -1, 0.5, 0.5), "num_ops"),
        ((True, -1, 0.5, 0.5), "num_ops"),
        ((2, 11, 0.5, 0.5), "magnitude"),
        ((2, -0.5, 0.5, 0.5), "magnitude"),
        ((2, -2, 0.5, 0.5), "magnitude"),
        ((2, float("nan"), 0.5, 0.5), "magnitude"),
        ((2, 5, 1.5, 0.5), "prob"),
        ((2, 5, -0.1, 0.5), "prob"),
        ((2, 5, 0.5, 1.01), "cutout_fraction"),
        ((2, 5, 0.5, -0.5), "cutout_fraction"),
    ],
)
def test_config_problem_names_the_bad_value(values, named):
  problem = ra.config_problem(*values)
  assert problem is not None and problem.startswith(named)
  with pytest.raises(ValueError, match=named):
    ra.strong_augment(
        tf.zeros([8, 8, 3]),
        _seed(0),
        num_ops=values[0],
        magnitude=values[1],
        prob=values[2],
        cutout_fraction=values[3],
    )


def test_config_problem_accepts_udas_and_the_edge_settings():
  for values in [(2, -1, 0.5, 0.5), (0, 0, 0.0, 0.0), (3, 10, 1.0, 1.0), (np.int64(1), 4.5, 1, 0)]:
    assert ra.config_problem(*values) is None, values
