"""Image augmentation as pure TensorFlow functions for `tf.data`, with stateless randomness.

The building blocks of the PIRL views (`jigsaw`) and of the fine-tuning input (`labelled`). Every
function runs in graph mode inside `tf.data.Dataset.map` (any `num_parallel_calls`) and draws its
randomness from stateless ops keyed by an explicit seed, so an augmented image depends only on its
seed and never on thread scheduling.

* `random_resized_crop` follows torchvision's sampling algorithm (10 tries of a uniform area
  fraction and a log-uniform aspect ratio, then a centre crop), bilinear resize with antialiasing.
* `color_augment` follows torchvision's `ColorJitter` (multiplicative brightness, contrast against
  the mean grey level, saturation against the grey image, hue rotation in HSV; the four applied in
  a random order), then `RandomGrayscale` and `RandomHorizontalFlip`.
* `random_gaussian_blur` is the blur of the two-view methods (SimCLR, MoCo v2): sigma uniform in
  a range, applied with a probability; a separable kernel, borders reflected.
* `random_rot90`, `random_rotation` and `random_flip` are the geometric augmentations of
  fine-tuning; `normalize` subtracts the mean and divides by the standard deviation.
* `rotate`, `projective_transform`, `grayscale` and `blend` are shared with `randaugment`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import tensorflow as tf

# The ImageNet statistics (in [0, 1] units) that the views and the fine-tuning input normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Arbitrary constant so that seeds derived here do not coincide with stateless seeds `[seed, 0]`
# the user may build elsewhere from the same global seed.
_SEED_SALT = 0x5049524C  # "PIRL"

_RRC_ATTEMPTS = 10


def example_seed(seed, epoch, index) -> tf.Tensor:
  """Derives the stateless seed of one example.

  Args:
    seed: global run seed (int or scalar integer tensor).
    epoch: epoch number (int or scalar integer tensor).
    index: stable dataset index of the example (int or scalar integer tensor).

  Returns:
    int64 tensor of shape (2,), a seed for `tf.random.stateless_*` ops; distinct for distinct
    `(seed, epoch, index)` with overwhelming probability.
  """
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(_SEED_SALT, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def split_seed(seed, num: int) -> list[tf.Tensor]:
  """`num` independent stateless seeds derived from `seed`."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def color_jitter_problem(color_jitter: Sequence[float]) -> str | None:
  """Why `color_jitter` is not a valid (brightness, contrast, saturation, hue), or None."""
  brightness, contrast, saturation, hue = color_jitter
  if min(brightness, contrast, saturation) < 0.0:
    return "brightness, contrast and saturation must be >= 0"
  if not 0.0 <= hue <= 0.5:
    return "hue (4th value) must be in [0, 0.5]"
  return None


def decode(image_bytes) -> tf.Tensor:
  """Decodes a (clean, RGB) JPEG to uint8 (H, W, 3)."""
  return tf.io.decode_jpeg(image_bytes, channels=3)


def random_resized_crop_window(height, width, seed, scale, ratio):
  """torchvision `RandomResizedCrop.get_params` with stateless randomness.

  Not `tf.image.stateless_sample_distorted_bounding_box`: that op draws the aspect ratio linearly
  rather than log-uniformly and falls back to the whole image rather than a centre crop of
  admissible aspect ratio.

  Returns:
    (top, left, crop_height, crop_width) as int32 scalar tensors.
  """
  area_seed, ratio_seed, top_seed, left_seed = split_seed(seed, 4)
  h_f = tf.cast(height, tf.float32)
  w_f = tf.cast(width, tf.float32)
  area = h_f * w_f
  target_area = area * tf.random.stateless_uniform(
      [_RRC_ATTEMPTS], area_seed, minval=scale[0], maxval=scale[1]
  )
  aspect = tf.exp(
      tf.random.stateless_uniform(
          [_RRC_ATTEMPTS], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
      )
  )
  # tf.round rounds half to even, like Python's round() in torchvision.
  cand_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  cand_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  valid = (cand_w > 0) & (cand_w <= width) & (cand_h > 0) & (cand_h <= height)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)

  # Fallback: the largest centre crop whose aspect ratio lies within `ratio`.
  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)

  found = tf.reduce_any(valid)
  crop_h = tf.where(found, cand_h[first], fb_h)
  crop_w = tf.where(found, cand_w[first], fb_w)
  top_rand = tf.random.stateless_uniform(
      [], top_seed, minval=0, maxval=height - crop_h + 1, dtype=tf.int32
  )
  left_rand = tf.random.stateless_uniform(
      [], left_seed, minval=0, maxval=width - crop_w + 1, dtype=tf.int32
  )
  top = tf.where(found, top_rand, (height - crop_h) // 2)
  left = tf.where(found, left_rand, (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def random_resized_crop(
    image, seed, size: int, scale: Sequence[float], ratio: Sequence[float]
) -> tf.Tensor:
  """RandomResizedCrop of one image (torchvision semantics, stateless).

  Args:
    image: (H, W, 3) uint8 or float tensor.
    seed: stateless seed, shape (2,).
    size: output side.
    scale: (min, max) fraction of the image area covered by the crop.
    ratio: (min, max) aspect ratio (width / height) of the crop.

  Returns:
    float32 (size, size, 3). For uint8 input the values are in [0, 1]; float input keeps its range.
  """
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  top, left, crop_h, crop_w = random_resized_crop_window(shape[0], shape[1], seed, scale, ratio)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))
  out = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
  if image.dtype == tf.uint8:
    out = out * (1.0 / 255.0)
  return tf.ensure_shape(tf.cast(out, tf.float32), [size, size, 3])


def grayscale(image) -> tf.Tensor:
  """(H, W, 1) luma of (H, W, 3) `image`: ITU-R 601 weights (0.2989, 0.587, 0.114) (torchvision)."""
  return tf.image.rgb_to_grayscale(image)


def blend(image, other, factor) -> tf.Tensor:
  """`other + factor * (image - other)` clipped to [0, 1]: 0 gives `other`, 1 gives `image`."""
  return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def color_augment(
    image, seed, *, color_jitter: Sequence[float], grayscale_prob: float, flip_prob: float
) -> tf.Tensor:
  """Colour jitter, random grayscale and horizontal flip of one image.

  The four jitter operations (brightness, contrast, saturation, hue) are applied in a random order
  with factors drawn as in torchvision's `ColorJitter`; then grayscale with probability
  `grayscale_prob`, then a horizontal flip with probability `flip_prob`.

  Args:
    image: (H, W, 3) float32 in [0, 1].
    seed: stateless seed, shape (2,).
    color_jitter: (brightness, contrast, saturation, hue) strengths; 0 disables one.
    grayscale_prob: probability of converting the image to grey.
    flip_prob: probability of a horizontal flip.

  Returns:
    float32 (H, W, 3) in [0, 1].
  """
  return _color_augment(
      image, seed, tuple(float(v) for v in color_jitter), float(grayscale_prob), float(flip_prob)
  )


# A tf.function, so that the graph (16 switch branches) is traced once per image shape and reused
# by every tile, instead of re-traced at every call site: this cuts the trace time of a
# `Dataset.map` from seconds to a fraction of a second.
@functools.partial(tf.function, autograph=False)
def _color_augment(image, seed, color_jitter, grayscale_prob, flip_prob):
  image = tf.convert_to_tensor(image, tf.float32)
  seed = tf.convert_to_tensor(seed)
  order_seed, b_seed, c_seed, s_seed, h_seed, gray_seed, flip_seed = split_seed(seed, 7)
  brightness, contrast, saturation, hue = color_jitter

  def factor(strength, s):
    return tf.random.stateless_uniform(
        [], s, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength
    )

  ops = []
  if brightness > 0:
    f_b = factor(brightness, b_seed)
    ops.append(lambda x: tf.clip_by_value(x * f_b, 0.0, 1.0))
  if contrast > 0:
    f_c = factor(contrast, c_seed)
    ops.append(lambda x: blend(x, tf.reduce_mean(grayscale(x)), f_c))
  if saturation > 0:
    f_s = factor(saturation, s_seed)
    ops.append(lambda x: blend(x, grayscale(x), f_s))
  if hue > 0:
    delta = tf.random.stateless_uniform([], h_seed, minval=-hue, maxval=hue)
    ops.append(lambda x: tf.image.adjust_hue(x, delta))

  if ops:
    order = tf.argsort(tf.random.stateless_uniform([len(ops)], order_seed))
    for step in range(len(ops)):
      image = tf.switch_case(order[step], [lambda op=op, x=image: op(x) for op in ops])

  if grayscale_prob > 0:
    to_gray = tf.random.stateless_uniform([], gray_seed) < grayscale_prob
    image = tf.cond(
        to_gray, lambda x=image: tf.image.grayscale_to_rgb(grayscale(x)), lambda x=image: x
    )
  if flip_prob > 0:
    flip = tf.random.stateless_uniform([], flip_seed) < flip_prob
    image = tf.cond(flip, lambda x=image: tf.reverse(x, axis=[1]), lambda x=image: x)
  return image


def gaussian_blur(image, sigma, radius: int) -> tf.Tensor:
  """(H, W, C) float `image` convolved with a Gaussian of std `sigma` pixels (a scalar tensor),
  truncated to `2 * radius + 1` taps and renormalised; borders reflected (as PIL's filter)."""
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)
  kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
  kernel = kernel / tf.reduce_sum(kernel)
  channels = image.shape[-1]
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
  rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, cols, [1, 1, 1, 1], "VALID")
  return out[0]


def random_gaussian_blur(image, seed, prob: float, sigma_range: Sequence[float]) -> tf.Tensor:
  """`gaussian_blur` with probability `prob`, sigma uniform in `sigma_range` (pixels); the kernel
  reaches 3 sigma of the largest sigma (at most a third of the image side)."""
  if prob <= 0:
    return image
  apply_seed, sigma_seed = split_seed(seed, 2)
  lo, hi = (float(v) for v in sigma_range)
  side = min(int(image.shape[0]), int(image.shape[1]))
  radius = max(1, min(int(math.ceil(3.0 * hi)), (side - 1) // 3))
  sigma = tf.random.stateless_uniform([], sigma_seed, minval=lo, maxval=hi)
  blur = tf.random.stateless_uniform([], apply_seed) < prob
  return tf.cond(blur, lambda: gaussian_blur(image, sigma, radius), lambda: image)


def random_flip(image, seed, axis: int) -> tf.Tensor:
  """Reverses `image` along `axis` (1 horizontal, 0 vertical) with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(flip, tf.reverse(image, axis=[axis]), image)


def random_rot90(image, seed) -> tf.Tensor:
  """Rotates (H, W, C) `image` by 0, 90, 180 or 270 degrees, uniformly."""
  k = tf.random.stateless_uniform([], seed, minval=0, maxval=4, dtype=tf.int32)
  return tf.image.rot90(image, k)


def projective_transform(
    image, transform, *, fill_mode: str = "REFLECT", fill_value=0.0
) -> tf.Tensor:
  """Resamples (H, W, C) float `image` bilinearly through a projective map, same output shape.

  Args:
    image: (H, W, C) float tensor.
    transform: 8 floats [a0, a1, a2, b0, b1, b2, c0, c1] mapping each output pixel (x, y) (pixel
      indices, x to the right, y down) to the input point it samples,
      ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k) with k = c0 x + c1 y + 1.
    fill_mode: how points outside the input read: "REFLECT", "WRAP", "NEAREST" or "CONSTANT".
    fill_value: the value of points outside the input for "CONSTANT".
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.convert_to_tensor(transform, tf.float32)[None],
      output_shape=tf.shape(image)[:2],
      fill_value=fill_value,
      interpolation="BILINEAR",
      fill_mode=fill_mode,
  )
  return out[0]


def rotate(image, angle, *, fill_mode: str = "REFLECT", fill_value=0.0) -> tf.Tensor:
  """Rotates (H, W, C) float by `angle` radians about the centre, by default reflecting at borders.

  A positive angle turns the picture counter-clockwise as displayed (y down), as PIL's
  `Image.rotate`. `fill_mode` and `fill_value` as in `projective_transform`.
  """
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Maps each output pixel (x, y) to the input pixel it samples.
  transform = tf.stack(
      [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
  )
  return projective_transform(image, transform, fill_mode=fill_mode, fill_value=fill_value)


def random_rotation(image, seed, max_degrees: float) -> tf.Tensor:
  """`rotate` by an angle uniform in [-max_degrees, max_degrees]."""
  limit = math.radians(max_degrees)
  return rotate(image, tf.random.stateless_uniform([], seed, -limit, limit))


def normalize(image, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """`(image - mean) / std` per channel, as a multiplication by 1 / std."""
  mean = tf.constant(mean, tf.float32)
  inv_std = tf.constant([1.0 / s for s in std], tf.float32)
  return (image - mean) * inv_std
