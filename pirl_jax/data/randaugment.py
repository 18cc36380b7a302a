"""RandAugment and cutout as pure TensorFlow functions for `tf.data`, with stateless randomness.

The strong augmentation of UDA (Xie et al. 2019, google-research/uda image/randaugment): RandAugment
(Cubuk et al. 2019) picks `num_ops` operations uniformly from the 14 of `OPS` and applies each with
a probability at a common magnitude, then cutout (DeVries & Taylor 2017) paints a square with the
mean colour. UDA ran AutoAugment's PIL code on 8-bit images in Python; here every operation is a
TensorFlow graph function on float32 (H, W, 3) images in [0, 1], so it runs inside
`tf.data.Dataset.map` (any `num_parallel_calls`), and every draw comes from stateless ops keyed by
an explicit seed (`augment.split_seed`), so an augmented image depends only on its seed.

Magnitudes: a `level` in [0, MAX_LEVEL] maps to each operation's parameter as in UDA's
`augmentation_transforms.py` (rotate up to 30 degrees, shear up to 0.3, translate up to 10/32 of
the side, solarize threshold 256 - 25.6 level, posterize 4 - 0.4 level bits, enhancement factors
0.1 + 0.18 level). Signed operations take a sign of +1 or -1; +1 is the PIL transform that UDA
applies for a positive level (rotate counter-clockwise as displayed; shear_x samples the input at
(x + shear * y, y); translate_x samples it at (x + shift, y), so the content moves left).

Deviations from UDA, on purpose: parameters are continuous (no `int()` of the angle or the shift;
the 8-bit thresholds keep it); geometric operations interpolate bilinearly (UDA: nearest) and fill
with grey 128/255 (UDA: transparent pixels that became the dataset mean after normalisation); the
translation scales with the image side; posterize keeps at least one bit; the enhancements blend in
float against a float grey image (PIL rounds to 8 bits). `docs/uda.md` lists them.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple, Sequence

import tensorflow as tf

from pirl_jax.data import augment

# The operations of RandAugment (Cubuk et al. 2019, Fig. 2 / Table 6), in a fixed order: a drawn
# op index is a position in this tuple. Index 0 (identity) is also what an op not applied becomes.
OPS = (
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
# The largest level: magnitudes map linearly from [0, MAX_LEVEL] to each op's range.
MAX_LEVEL = 10

# Geometric ops fill the pixels they uncover with this grey.
FILL_GREY = 128.0 / 255.0
_MAX_DEGREES = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 10.0 / 32.0  # fraction of the side: UDA's 10 px on 32 px images
# UDA draws the level of each op from the integers 1..9 (policies.randaug_policies).
_RANDOM_LEVELS = (1, 9)
# PIL's ImageFilter.SMOOTH, the degenerate image of ImageEnhance.Sharpness.
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))


class OpDraws(NamedTuple):
  """The random choices of `randaugment` for one seed, one entry per op slot.

  Attributes:
    index: int32 (num_ops,) positions in `OPS`, uniform.
    level: float32 (num_ops,) levels: the magnitude, or integers in 1..9 for magnitude -1.
    sign: float32 (num_ops,) +1 or -1, each with probability 1/2.
    applied: bool (num_ops,) whether the slot's op is applied (probability `prob`).
  """

  index: tf.Tensor
  level: tf.Tensor
  sign: tf.Tensor
  applied: tf.Tensor


def config_problem(num_ops, magnitude, prob, cutout_fraction) -> str | None:
  """Why the strong augmentation settings are invalid, naming the value, or None."""
  if isinstance(num_ops, bool) or not isinstance(num_ops, numbers.Integral) or num_ops < 0:
    return f"num_ops must be an integer >= 0, got {num_ops!r}"
  if not (magnitude == -1 or 0 <= magnitude <= MAX_LEVEL):
    return (
        f"magnitude must be -1 (a random level per op, as UDA) or in [0, {MAX_LEVEL}], "
        f"got {magnitude!r}"
    )
  if not 0.0 <= prob <= 1.0:
    return f"prob must be in [0, 1], got {prob!r}"
  if not 0.0 <= cutout_fraction <= 1.0:
    return f"cutout_fraction must be in [0, 1], got {cutout_fraction!r}"
  return None


# ------------------------------------------------------------------------------ the ops ----


def _to_8bit(image):
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.int32)


def _from_8bit(values):
  return tf.cast(values, tf.float32) * (1.0 / 255.0)


def _identity(image, level, sign):
  del level, sign
  return image


def _autocontrast(image, level, sign):
  """PIL `ImageOps.autocontrast` (no cutoff): each channel's 8-bit [min, max] onto [0, 255]."""
  del level, sign
  values = _to_8bit(image)
  low = tf.reduce_min(values, axis=[0, 1])
  high = tf.reduce_max(values, axis=[0, 1])
  span = tf.maximum(high - low, 1)
  stretched = _from_8bit((values - low) * 255 // span)
  return tf.where(high > low, stretched, image)


def _equalize(image, level, sign):
  """PIL `ImageOps.equalize`: per channel, a lookup table from the cumulative histogram."""
  del level, sign
  values = _to_8bit(image)
  channels = tf.transpose(tf.reshape(values, [-1, 3]))  # (3, H * W)
  hist = tf.math.bincount(channels, minlength=256, maxlength=256, axis=-1)  # (3, 256)
  last = 255 - tf.argmax(tf.reverse(hist, axis=[1]) > 0, axis=1, output_type=tf.int32)
  last_count = tf.gather(hist, last, batch_dims=1)
  step = (tf.shape(channels)[1] - last_count) // 255  # (3,)
  # PIL: lut[i] = (step // 2 + number of pixels below i) // step.
  below = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((step[:, None] // 2 + below) // tf.maximum(step[:, None], 1), 255)
  mapped = tf.transpose(tf.gather(lut, channels, batch_dims=1))  # (H * W, 3)
  equalized = _from_8bit(tf.reshape(mapped, tf.shape(values)))
  return tf.where(step > 0, equalized, image)  # step 0 (one grey level, nearly): unchanged


def _solarize(image, level, sign):
  """Inverts the 8-bit values >= 256 - int(256 * level / 10): nothing at level 0."""
  del sign
  threshold = 256.0 - tf.floor(level * 256.0 / MAX_LEVEL)
  values = _to_8bit(image)
  return _from_8bit(tf.where(tf.cast(values, tf.float32) >= threshold, 255 - values, values))


def _posterize(image, level, sign):
  """Keeps the top 4 - int(4 * level / 10) bits (at least 1) of each 8-bit value."""
  del sign
  bits = tf.maximum(4 - tf.cast(tf.floor(level * 4.0 / MAX_LEVEL), tf.int32), 1)
  quantum = tf.bitwise.left_shift(1, 8 - bits)
  return _from_8bit(_to_8bit(image) // quantum * quantum)


def _enhance_factor(level):
  return 0.1 + 1.8 * level / MAX_LEVEL


def _color(image, level, sign):
  """PIL `ImageEnhance.Color`: blend with the grey image."""
  del sign
  return augment.blend(image, augment.grayscale(image), _enhance_factor(level))


def _contrast(image, level, sign):
  """PIL `ImageEnhance.Contrast`: blend with the mean grey level."""
  del sign
  return augment.blend(image, tf.reduce_mean(augment.grayscale(image)), _enhance_factor(level))


def _brightness(image, level, sign):
  """PIL `ImageEnhance.Brightness`: blend with black."""
  del sign
  return augment.blend(image, 0.0, _enhance_factor(level))


def _sharpness(image, level, sign):
  """PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image (border unfiltered)."""
  del sign
  kernel = tf.constant(_SMOOTH, tf.float32) / 13.0
  smooth = tf.nn.depthwise_conv2d(
      image[None],
      tf.tile(kernel[:, :, None, None], [1, 1, 3, 1]),
      strides=[1, 1, 1, 1],
      padding="SAME",
  )[0]
  shape = tf.shape(image)
  rows = tf.range(shape[0])
  cols = tf.range(shape[1])
  inner_rows = (rows > 0) & (rows < shape[0] - 1)
  inner_cols = (cols > 0) & (cols < shape[1] - 1)
  inner = (inner_rows[:, None] & inner_cols[None, :])[..., None]
  return augment.blend(image, tf.where(inner, smooth, image), _enhance_factor(level))


def _affine(image, a0, a1, a2, b0, b1, b2):
  """Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2), grey fill."""
  transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])
  out = augment.projective_transform(image, transform, fill_mode="CONSTANT", fill_value=FILL_GREY)
  return tf.clip_by_value(out, 0.0, 1.0)


def _rotate(image, level, sign):
  """Rotates by 30 * level / 10 degrees, counter-clockwise as displayed for sign +1 (as PIL)."""
  angle = sign * (_MAX_DEGREES * level / MAX_LEVEL) * (math.pi / 180.0)
  out = augment.rotate(image, angle, fill_mode="CONSTANT", fill_value=FILL_GREY)
  return tf.clip_by_value(out, 0.0, 1.0)


def _shear_x(image, level, sign):
  # PIL's AFFINE (1, s, 0, 0, 1, 0) works on pixel-corner coordinates (pixel centres at i + 0.5):
  # in pixel indices, x_in = x + s * (y + 0.5).
  shear = sign * _MAX_SHEAR * level / MAX_LEVEL
  return _affine(image, 1.0, shear, 0.5 * shear, 0.0, 1.0, 0.0)


def _shear_y(image, level, sign):
  shear = sign * _MAX_SHEAR * level / MAX_LEVEL
  return _affine(image, 1.0, 0.0, 0.0, shear, 1.0, 0.5 * shear)


def _translate_x(image, level, sign):
  width = tf.cast(tf.shape(image)[1], tf.float32)
  shift = sign * _MAX_TRANSLATE * width * level / MAX_LEVEL
  return _affine(image, 1.0, 0.0, shift, 0.0, 1.0, 0.0)


def _translate_y(image, level, sign):
  height = tf.cast(tf.shape(image)[0], tf.float32)
  shift = sign * _MAX_TRANSLATE * height * level / MAX_LEVEL
  return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, shift)


_OP_FNS = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
    "solarize": _solarize,
    "color": _color,
    "posterize": _posterize,
    "contrast": _contrast,
    "brightness": _brightness,
    "sharpness": _sharpness,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}
assert tuple(_OP_FNS) == OPS


def apply_op(image, op: str, level, sign=1.0) -> tf.Tensor:
  """Applies one operation of `OPS`, deterministically.

  Args:
    image: (H, W, 3) float32 in [0, 1].
    op: a name in `OPS`.
    level: magnitude in [0, MAX_LEVEL] (float or scalar float tensor); ignored by identity,
      autocontrast and equalize.
    sign: +1 or -1, the direction of rotate, shear_* and translate_*; ignored by the others.

  Returns:
    float32 (H, W, 3) in [0, 1], with the static shape of `image`.
  """
  if op not in _OP_FNS:
    raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(OPS)}")
  image = tf.convert_to_tensor(image, tf.float32)
  out = _OP_FNS[op](image, tf.cast(level, tf.float32), tf.cast(sign, tf.float32))
  return tf.ensure_shape(out, image.shape)


# ------------------------------------------------------------------- random application ----


def draw_ops(seed, num_ops: int, magnitude: float = -1, prob: float = 0.5) -> OpDraws:
  """The ops, levels, signs and coins that `randaugment` uses for `seed` (see `OpDraws`)."""
  seed = tf.convert_to_tensor(seed)
  index_seed, level_seed, sign_seed, apply_seed = augment.split_seed(seed, 4)
  index = tf.random.stateless_uniform(
      [num_ops], index_seed, minval=0, maxval=len(OPS), dtype=tf.int32
  )
  if magnitude >= 0:
    level = tf.fill([num_ops], tf.constant(magnitude, tf.float32))
  else:
    level = tf.cast(
        tf.random.stateless_uniform(
            [num_ops],
            level_seed,
            minval=_RANDOM_LEVELS[0],
            maxval=_RANDOM_LEVELS[1] + 1,
            dtype=tf.int32,
        ),
        tf.float32,
    )
  sign = tf.where(tf.random.stateless_uniform([num_ops], sign_seed) < 0.5, -1.0, 1.0)
  applied = tf.random.stateless_uniform([num_ops], apply_seed) < prob
  return OpDraws(index, level, sign, applied)


def randaugment(
    image, seed, *, num_ops: int = 2, magnitude: float = -1, prob: float = 0.5
) -> tf.Tensor:
  """RandAugment of one image: `num_ops` ops drawn uniformly from `OPS`, each applied with `prob`.

  Args:
    image: (H, W, 3) float32 in [0, 1].
    seed: stateless seed, shape (2,).
    num_ops: number of op slots (UDA: 2).
    magnitude: the level of every op in [0, MAX_LEVEL], or -1 for a level drawn uniformly from the
      integers 1..9 per op (UDA's setting).
    prob: probability of applying each drawn op (UDA: 0.5).

  Returns:
    float32 (H, W, 3) in [0, 1], with the static shape of `image`.
  """
  problem = config_problem(num_ops, magnitude, prob, 0.0)
  if problem:
    raise ValueError(problem)
  image = tf.convert_to_tensor(image, tf.float32)
  if num_ops == 0:
    return image
  out = _randaugment(image, tf.convert_to_tensor(seed), int(num_ops), float(magnitude), float(prob))
  return tf.ensure_shape(out, image.shape)


# A tf.function, as `augment._color_augment`: the 14-branch switches are traced once per image
# shape and settings and reused, rather than at every call site.
@functools.partial(tf.function, autograph=False)
def _randaugment(image, seed, num_ops, magnitude, prob):
  draws = draw_ops(seed, num_ops, magnitude, prob)
  for slot in range(num_ops):
    # An op not applied is the identity, index 0.
    index = tf.where(draws.applied[slot], draws.index[slot], 0)
    level, sign = draws.level[slot], draws.sign[slot]
    image = tf.switch_case(
        index, [lambda op=op, x=image, l=level, s=sign: _OP_FNS[op](x, l, s) for op in OPS]
    )
  return image


def cutout(
    image, seed, *, size_fraction: float = 0.5, fill: Sequence[float] = augment.IMAGENET_MEAN
) -> tf.Tensor:
  """Cutout (DeVries & Taylor 2017): a square set to `fill`, centred at a uniform random pixel.

  The square's side is round(size_fraction * min(H, W)); rows [cy - side // 2, cy - side // 2 +
  side) and the same columns around the centre (cy, cx), clipped at the borders.

  Args:
    image: (H, W, 3) float32.
    seed: stateless seed, shape (2,).
    size_fraction: side of the square over the short side of the image; 0 leaves it unchanged
      (UDA: 16 px on 32 px images, 0.5).
    fill: the colour of the square: the normalisation mean, so that it normalises to 0.

  Returns:
    float32 (H, W, 3), with the static shape of `image`.
  """
  if not 0.0 <= size_fraction <= 1.0:
    raise ValueError(f"cutout size_fraction must be in [0, 1], got {size_fraction!r}")
  image = tf.convert_to_tensor(image, tf.float32)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  side = tf.cast(tf.round(size_fraction * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32)
  y_seed, x_seed = augment.split_seed(tf.convert_to_tensor(seed), 2)
  cy = tf.random.stateless_uniform([], y_seed, minval=0, maxval=height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], x_seed, minval=0, maxval=width, dtype=tf.int32)
  top, left = cy - side // 2, cx - side // 2
  rows, cols = tf.range(height), tf.range(width)
  in_rows = (rows >= top) & (rows < top + side)
  in_cols = (cols >= left) & (cols < left + side)
  square = (in_rows[:, None] & in_cols[None, :])[..., None]
  out = tf.where(square, tf.constant(fill, tf.float32), image)
  return tf.ensure_shape(out, image.shape)


def strong_augment(
    image,
    seed,
    *,
    num_ops: int,
    magnitude: float,
    prob: float,
    cutout_fraction: float,
    cutout_fill: Sequence[float] = augment.IMAGENET_MEAN,
) -> tf.Tensor:
  """UDA's strong augmentation: `randaugment`, then `cutout`, with seeds split from `seed`.

  Args:
    image: (H, W, 3) float32 in [0, 1].
    seed: stateless seed, shape (2,).
    num_ops, magnitude, prob: as in `randaugment`.
    cutout_fraction: `cutout`'s size_fraction.
    cutout_fill: `cutout`'s fill colour (the normalisation mean).

  Returns:
    float32 (H, W, 3), with the static shape of `image`.
  """
  problem = config_problem(num_ops, magnitude, prob, cutout_fraction)
  if problem:
    raise ValueError(problem)
  ra_seed, cutout_seed = augment.split_seed(tf.convert_to_tensor(seed), 2)
  image = randaugment(image, ra_seed, num_ops=num_ops, magnitude=magnitude, prob=prob)
  return cutout(image, cutout_seed, size_fraction=cutout_fraction, fill=cutout_fill)
