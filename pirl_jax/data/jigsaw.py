"""The two PIRL views of an image, as pure TensorFlow functions for `tf.data`.

Every function here runs in graph mode inside `tf.data.Dataset.map` (any
`num_parallel_calls`) and draws all of its randomness from stateless ops keyed
by an explicit seed, so the views of an example depend only on
`(seed, epoch, index)` and never on thread scheduling.

* Image view: RandomResizedCrop -> colour jitter -> random grayscale ->
  horizontal flip -> mean/std normalisation.
* Jigsaw view: RandomResizedCrop to `jigsaw_crop_size` -> `grid x grid` cells of
  `jigsaw_crop_size // grid` px -> one `tile_size` tile per cell at an independent
  random offset -> independent photometric augmentation and normalisation per
  tile -> the tiles shuffled by a uniformly random permutation.

Photometric augmentation follows torchvision's `ColorJitter` (multiplicative
brightness, contrast against the mean grey level, saturation against the grey
image, hue rotation in HSV; the four applied in a random order),
`RandomGrayscale` and `RandomHorizontalFlip`. RandomResizedCrop follows
torchvision's sampling algorithm (10 tries of a uniform area fraction and a
log-uniform aspect ratio, then a centre crop), bilinear resize with antialiasing.

Typical use::

    cfg = ViewConfig()
    ds = tf.data.Dataset.from_tensor_slices((jpeg_bytes, indices))
    ds = ds.map(lambda b, i: make_views(b, i, seed=0, epoch=epoch, cfg=cfg),
                num_parallel_calls=tf.data.AUTOTUNE)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import tensorflow as tf

# Arbitrary constant so that seeds derived here do not coincide with stateless
# seeds `[seed, 0]` the user may build elsewhere from the same global seed.
_SEED_SALT = 0x5049524C  # "PIRL"

_RRC_ATTEMPTS = 10


def _field_error(name: str, value, requirement: str) -> ValueError:
    return ValueError(f"data.views.{name}={value!r}: {requirement}")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Sizes and augmentation strengths of the two PIRL views.

    Defaults are the paper / VISSL values. Field names match the config keys
    `data.views.<name>`.

    Attributes:
        image_size: side S of the square image view.
        image_crop_scale: (min, max) area fraction of the image view crop.
        crop_ratio: (min, max) aspect ratio (width / height) of both crops.
        jigsaw_crop_size: side of the square crop the jigsaw grid is cut from.
        jigsaw_crop_scale: (min, max) area fraction of the jigsaw crop.
        grid: tiles per side; the view has `grid**2` tiles.
        tile_size: side T of each tile; at most `jigsaw_crop_size // grid`.
        color_jitter: (brightness, contrast, saturation, hue) strengths, as in
            torchvision's `ColorJitter`; hue is at most 0.5. 0 disables one.
        grayscale_prob: probability of converting a view (or tile) to grey.
        flip_prob: probability of a horizontal flip of a view (or tile).
        tile_photometric: apply colour jitter, grayscale and flip to each tile.
        image_photometric: apply colour jitter, grayscale and flip to the image.
        mean: per-channel mean subtracted after augmentation (in [0, 1] units).
        std: per-channel standard deviation divided by after augmentation.
    """

    image_size: int = 224
    image_crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jigsaw_crop_size: int = 255
    jigsaw_crop_scale: tuple[float, float] = (0.6, 1.0)
    grid: int = 3
    tile_size: int = 64
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.2)
    grayscale_prob: float = 0.2
    flip_prob: float = 0.5
    tile_photometric: bool = True
    image_photometric: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        # Config systems hand over lists; store tuples so the config stays hashable.
        for name, length in (("image_crop_scale", 2), ("crop_ratio", 2),
                             ("jigsaw_crop_scale", 2), ("color_jitter", 4),
                             ("mean", 3), ("std", 3)):
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise _field_error(name, value, f"expected {length} numbers") from None
            if len(value) != length:
                raise _field_error(name, value, f"expected {length} numbers")
            object.__setattr__(self, name, value)

        for name in ("image_size", "jigsaw_crop_size", "grid", "tile_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _field_error(name, value, "must be a positive integer")
        for name in ("image_crop_scale", "jigsaw_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise _field_error(name, (lo, hi), "need 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise _field_error("crop_ratio", (lo, hi), "need 0 < min <= max")
        if self.jigsaw_crop_size < self.grid:
            raise _field_error("jigsaw_crop_size", self.jigsaw_crop_size,
                               f"must be >= grid={self.grid}")
        if self.tile_size > self.cell_size:
            raise _field_error(
                "tile_size", self.tile_size,
                f"must be <= jigsaw_crop_size // grid = {self.jigsaw_crop_size} // "
                f"{self.grid} = {self.cell_size} (tiles are never resized up)")
        brightness, contrast, saturation, hue = self.color_jitter
        if min(brightness, contrast, saturation) < 0.0:
            raise _field_error("color_jitter", self.color_jitter,
                               "brightness, contrast and saturation must be >= 0")
        if not 0.0 <= hue <= 0.5:
            raise _field_error("color_jitter", self.color_jitter,
                               "hue (4th value) must be in [0, 0.5]")
        for name in ("grayscale_prob", "flip_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise _field_error(name, value, "must be a probability in [0, 1]")
        if min(self.std) <= 0.0:
            raise _field_error("std", self.std, "all values must be > 0")
        for name in ("tile_photometric", "image_photometric"):
            if not isinstance(getattr(self, name), bool):
                raise _field_error(name, getattr(self, name), "must be a bool")

    @property
    def cell_size(self) -> int:
        """Side of one grid cell of the jigsaw crop."""
        return self.jigsaw_crop_size // self.grid

    @property
    def num_tiles(self) -> int:
        """Tiles per jigsaw view (`grid**2`)."""
        return self.grid * self.grid


def example_seed(seed, epoch, index) -> tf.Tensor:
    """Derives the stateless seed of one example.

    Args:
        seed: global run seed (int or scalar integer tensor).
        epoch: epoch number (int or scalar integer tensor).
        index: stable dataset index of the example (int or scalar integer tensor).

    Returns:
        int64 tensor of shape (2,), a seed for `tf.random.stateless_*` ops;
        distinct for distinct `(seed, epoch, index)` with overwhelming probability.
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.constant(_SEED_SALT, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def _split(seed, num: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _random_resized_crop_window(height, width, seed, scale, ratio):
    """torchvision `RandomResizedCrop.get_params` with stateless randomness.

    Not `tf.image.stateless_sample_distorted_bounding_box`: that op draws the
    aspect ratio linearly rather than log-uniformly and falls back to the whole
    image rather than a centre crop of admissible aspect ratio.

    Returns:
        (top, left, crop_height, crop_width) as int32 scalar tensors.
    """
    area_seed, ratio_seed, top_seed, left_seed = _split(seed, 4)
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    area = h_f * w_f
    target_area = area * tf.random.stateless_uniform(
        [_RRC_ATTEMPTS], area_seed, minval=scale[0], maxval=scale[1])
    aspect = tf.exp(tf.random.stateless_uniform(
        [_RRC_ATTEMPTS], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    # tf.round rounds half to even, like Python's round() in torchvision.
    cand_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    cand_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    valid = (cand_w > 0) & (cand_w <= width) & (cand_h > 0) & (cand_h <= height)
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)

    # Fallback: the largest centre crop whose aspect ratio lies within `ratio`.
    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio > ratio[1],
                    tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
    fb_h = tf.where(in_ratio < ratio[0],
                    tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)

    found = tf.reduce_any(valid)
    crop_h = tf.where(found, cand_h[first], fb_h)
    crop_w = tf.where(found, cand_w[first], fb_w)
    top_rand = tf.random.stateless_uniform(
        [], top_seed, minval=0, maxval=height - crop_h + 1, dtype=tf.int32)
    left_rand = tf.random.stateless_uniform(
        [], left_seed, minval=0, maxval=width - crop_w + 1, dtype=tf.int32)
    top = tf.where(found, top_rand, (height - crop_h) // 2)
    left = tf.where(found, left_rand, (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def random_resized_crop(image, seed, size: int, scale: Sequence[float],
                        ratio: Sequence[float]) -> tf.Tensor:
    """RandomResizedCrop of one image (torchvision semantics, stateless).

    Args:
        image: (H, W, 3) uint8 or float tensor.
        seed: stateless seed, shape (2,).
        size: output side.
        scale: (min, max) fraction of the image area covered by the crop.
        ratio: (min, max) aspect ratio (width / height) of the crop.

    Returns:
        float32 (size, size, 3). For uint8 input the values are in [0, 1]; float
        input keeps its range.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    top, left, crop_h, crop_w = _random_resized_crop_window(
        shape[0], shape[1], seed, scale, ratio)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))
    out = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    if image.dtype == tf.uint8:
        out = out * (1.0 / 255.0)
    return tf.ensure_shape(tf.cast(out, tf.float32), [size, size, 3])


def _grayscale(image):
    return tf.image.rgb_to_grayscale(image)  # ITU-R 601 weights, as torchvision


def _blend(image, other, factor):
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def color_augment(image, seed, cfg: ViewConfig) -> tf.Tensor:
    """Colour jitter, random grayscale and horizontal flip of one image.

    The four jitter operations (brightness, contrast, saturation, hue) are
    applied in a random order with factors drawn as in torchvision's
    `ColorJitter`; then grayscale with probability `cfg.grayscale_prob`, then a
    horizontal flip with probability `cfg.flip_prob`.

    Args:
        image: (H, W, 3) float32 in [0, 1].
        seed: stateless seed, shape (2,).
        cfg: view configuration (uses color_jitter, grayscale_prob, flip_prob).

    Returns:
        float32 (H, W, 3) in [0, 1].
    """
    return _color_augment(image, seed, cfg.color_jitter, cfg.grayscale_prob, cfg.flip_prob)


# A tf.function, so that the graph (16 switch branches) is traced once per image
# shape and reused by every tile, instead of re-traced at every call site: this
# cuts the trace time of a `Dataset.map` from seconds to a fraction of a second.
@functools.partial(tf.function, autograph=False)
def _color_augment(image, seed, color_jitter, grayscale_prob, flip_prob):
    image = tf.convert_to_tensor(image, tf.float32)
    seed = tf.convert_to_tensor(seed)
    order_seed, b_seed, c_seed, s_seed, h_seed, gray_seed, flip_seed = _split(seed, 7)
    brightness, contrast, saturation, hue = color_jitter

    def factor(strength, s):
        return tf.random.stateless_uniform(
            [], s, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)

    ops = []
    if brightness > 0:
        f_b = factor(brightness, b_seed)
        ops.append(lambda x: tf.clip_by_value(x * f_b, 0.0, 1.0))
    if contrast > 0:
        f_c = factor(contrast, c_seed)
        ops.append(lambda x: _blend(x, tf.reduce_mean(_grayscale(x)), f_c))
    if saturation > 0:
        f_s = factor(saturation, s_seed)
        ops.append(lambda x: _blend(x, _grayscale(x), f_s))
    if hue > 0:
        delta = tf.random.stateless_uniform([], h_seed, minval=-hue, maxval=hue)
        ops.append(lambda x: tf.image.adjust_hue(x, delta))

    if ops:
        order = tf.argsort(tf.random.stateless_uniform([len(ops)], order_seed))
        for step in range(len(ops)):
            image = tf.switch_case(
                order[step], [lambda op=op, x=image: op(x) for op in ops])

    if grayscale_prob > 0:
        to_gray = tf.random.stateless_uniform([], gray_seed) < grayscale_prob
        image = tf.cond(to_gray, lambda x=image: tf.image.grayscale_to_rgb(_grayscale(x)),
                        lambda x=image: x)
    if flip_prob > 0:
        flip = tf.random.stateless_uniform([], flip_seed) < flip_prob
        image = tf.cond(flip, lambda x=image: tf.reverse(x, axis=[1]), lambda x=image: x)
    return image


def _normalize(image, cfg: ViewConfig):
    mean = tf.constant(cfg.mean, tf.float32)
    inv_std = tf.constant([1.0 / s for s in cfg.std], tf.float32)
    return (image - mean) * inv_std


def image_view(image_uint8, seed, cfg: ViewConfig) -> tf.Tensor:
    """The image view v_I.

    Args:
        image_uint8: (H, W, 3) uint8 image.
        seed: stateless seed, shape (2,).
        cfg: view configuration.

    Returns:
        float32 (S, S, 3), S = cfg.image_size, normalised with cfg.mean/cfg.std.
    """
    crop_seed, photo_seed = _split(seed, 2)
    image = random_resized_crop(image_uint8, crop_seed, cfg.image_size,
                                cfg.image_crop_scale, cfg.crop_ratio)
    if cfg.image_photometric:
        image = color_augment(image, photo_seed, cfg)
    return _normalize(image, cfg)


def _jigsaw_seeds(seed):
    """(crop, offsets, permutation, photometric) seeds; shared by jigsaw_crop/view."""
    return _split(seed, 4)


def jigsaw_crop(image_uint8, seed, cfg: ViewConfig) -> tf.Tensor:
    """The crop the jigsaw view of `seed` cuts its tiles from.

    Exposed so that tests (and visualisations) can locate each tile in its cell.

    Args:
        image_uint8: (H, W, 3) uint8 image.
        seed: the same seed passed to `jigsaw_view`.
        cfg: view configuration.

    Returns:
        float32 (C, C, 3) in [0, 1], C = cfg.jigsaw_crop_size, before any
        photometric augmentation or normalisation.
    """
    crop_seed = _jigsaw_seeds(seed)[0]
    return random_resized_crop(image_uint8, crop_seed, cfg.jigsaw_crop_size,
                               cfg.jigsaw_crop_scale, cfg.crop_ratio)


def jigsaw_view(image_uint8, seed, cfg: ViewConfig, return_permutation: bool = False):
    """The jigsaw view v_It: grid**2 shuffled, independently augmented tiles.

    Args:
        image_uint8: (H, W, 3) uint8 image.
        seed: stateless seed, shape (2,).
        cfg: view configuration.
        return_permutation: also return the permutation.

    Returns:
        tiles, float32 (grid**2, T, T, 3), T = cfg.tile_size, normalised; and if
        `return_permutation`, perm int32 (grid**2,): output tile k was cut from
        cell perm[k] of the crop, cells numbered in row-major order.
    """
    _, offset_seed, perm_seed, photo_seed = _jigsaw_seeds(seed)
    crop = jigsaw_crop(image_uint8, seed, cfg)
    n, cell, t = cfg.num_tiles, cfg.cell_size, cfg.tile_size

    # Per-tile offsets in [0, cell - t], drawn independently for y and x.
    offsets = tf.random.stateless_uniform(
        [n, 2], offset_seed, minval=0, maxval=cell - t + 1, dtype=tf.int32)
    cells = tf.range(n, dtype=tf.int32)
    top = (cells // cfg.grid) * cell + offsets[:, 0]
    left = (cells % cfg.grid) * cell + offsets[:, 1]
    span = tf.range(t, dtype=tf.int32)
    rows = tf.gather(crop, top[:, None] + span[None, :])  # (n, t, C, 3)
    tiles = tf.gather(rows, left[:, None] + span[None, :], axis=2, batch_dims=1)

    if cfg.tile_photometric:
        tile_seeds = _split(photo_seed, n)
        tiles = tf.stack([color_augment(tiles[k], tile_seeds[k], cfg) for k in range(n)])

    # argsort of i.i.d. uniforms is a uniformly random permutation of all n! orders.
    perm = tf.argsort(tf.random.stateless_uniform([n], perm_seed))
    tiles = tf.ensure_shape(_normalize(tf.gather(tiles, perm), cfg), [n, t, t, 3])
    if return_permutation:
        return tiles, perm
    return tiles


def decode(image_bytes) -> tf.Tensor:
    """Decodes a (clean, RGB) JPEG to uint8 (H, W, 3)."""
    return tf.io.decode_jpeg(image_bytes, channels=3)


def make_views(image_bytes, index, seed, epoch, cfg: ViewConfig) -> dict[str, tf.Tensor]:
    """Both PIRL views of one encoded image, for `tf.data.Dataset.map`.

    The image is decoded once; each view takes its own crop of the original
    image with an independent seed derived from `(seed, epoch, index)`.

    Args:
        image_bytes: scalar string tensor, a JPEG.
        index: stable dataset index of the example (the memory-bank row).
        seed: global run seed.
        epoch: epoch number (a different epoch gives different views).
        cfg: view configuration.

    Returns:
        {'image': float32 (S, S, 3), 'tiles': float32 (grid**2, T, T, 3),
         'index': int32 scalar}.
    """
    image = decode(image_bytes)
    image_seed, jigsaw_seed = _split(example_seed(seed, epoch, index), 2)
    return {
        "image": image_view(image, image_seed, cfg),
        "tiles": jigsaw_view(image, jigsaw_seed, cfg),
        "index": tf.cast(index, tf.int32),
    }
