"""The two PIRL views of an image, as pure TensorFlow functions for `tf.data`.

Built from the stateless augmentations of `augment`, so the views of an example depend only on
`(seed, epoch, index)` and never on thread scheduling.

* Image view: RandomResizedCrop -> colour jitter -> random grayscale -> horizontal flip ->
  mean/std normalisation.
* Jigsaw view: RandomResizedCrop to `jigsaw_crop_size` -> `grid x grid` cells of
  `jigsaw_crop_size // grid` px -> one `tile_size` tile per cell at an independent random offset
  -> independent photometric augmentation and normalisation per tile -> the tiles shuffled by a
  uniformly random permutation.

Typical use::

  cfg = ViewConfig()
  ds = tf.data.Dataset.from_tensor_slices((jpeg_bytes, indices))
  ds = ds.map(lambda b, i: make_views(b, i, seed=0, epoch=epoch, cfg=cfg),
              num_parallel_calls=tf.data.AUTOTUNE)
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from pirl_jax import methods
from pirl_jax.data import augment
from pirl_jax.data import errors


def _field_error(name: str, value, requirement: str) -> errors.ConfigFieldError:
  return errors.ConfigFieldError(f"data.views.{name}={value!r}: {requirement}")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Sizes and augmentation strengths of the two PIRL views.

  Defaults are the paper / VISSL values. Field names match the config keys `data.views.<name>`.

  Attributes:
    image_size: side S of the square image view.
    image_crop_scale: (min, max) area fraction of the image view crop.
    crop_ratio: (min, max) aspect ratio (width / height) of both crops.
    jigsaw_crop_size: side of the square crop the jigsaw grid is cut from.
    jigsaw_crop_scale: (min, max) area fraction of the jigsaw crop.
    grid: tiles per side; the view has `grid**2` tiles.
    tile_size: side T of each tile; at most `jigsaw_crop_size // grid`.
    color_jitter: (brightness, contrast, saturation, hue) strengths, as in torchvision's
      `ColorJitter`; hue is at most 0.5. 0 disables one.
    grayscale_prob: probability of converting a view (or tile) to grey.
    flip_prob: probability of a horizontal flip of a view (or tile).
    tile_photometric: apply colour jitter, grayscale and flip to each tile.
    image_photometric: apply colour jitter, grayscale and flip to the image.
    blur_prob: probability of a Gaussian blur of each image view of the two-view methods
      (moco_v2, simclr; their papers' 0.5); the other methods' views are not blurred.
    blur_sigma: (min, max) standard deviation of that blur in pixels of a 224 px view (the
      papers' 0.1-2.0), scaled with `image_size`.
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
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  mean: tuple[float, float, float] = augment.IMAGENET_MEAN
  std: tuple[float, float, float] = augment.IMAGENET_STD

  def __post_init__(self):
    # Config systems hand over lists; store tuples so the config stays hashable.
    for name, length in (
        ("image_crop_scale", 2),
        ("crop_ratio", 2),
        ("jigsaw_crop_scale", 2),
        ("color_jitter", 4),
        ("blur_sigma", 2),
        ("mean", 3),
        ("std", 3),
    ):
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
      raise _field_error("jigsaw_crop_size", self.jigsaw_crop_size, f"must be >= grid={self.grid}")
    if self.tile_size > self.cell_size:
      raise _field_error(
          "tile_size",
          self.tile_size,
          f"must be <= jigsaw_crop_size // grid = {self.jigsaw_crop_size} // "
          f"{self.grid} = {self.cell_size} (tiles are never resized up)",
      )
    problem = augment.color_jitter_problem(self.color_jitter)
    if problem:
      raise _field_error("color_jitter", self.color_jitter, problem)
    lo, hi = self.blur_sigma
    if not 0.0 < lo <= hi:
      raise _field_error("blur_sigma", (lo, hi), "need 0 < min <= max")
    for name in ("grayscale_prob", "flip_prob", "blur_prob"):
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


def _photometric(image, seed, cfg: ViewConfig):
  return augment.color_augment(
      image,
      seed,
      color_jitter=cfg.color_jitter,
      grayscale_prob=cfg.grayscale_prob,
      flip_prob=cfg.flip_prob,
  )


def _normalize(image, cfg: ViewConfig):
  return augment.normalize(image, cfg.mean, cfg.std)


def image_view(image_uint8, seed, cfg: ViewConfig, blur: bool = False) -> tf.Tensor:
  """The image view v_I.

  Args:
    image_uint8: (H, W, 3) uint8 image.
    seed: stateless seed, shape (2,).
    cfg: view configuration.
    blur: after the colours, a Gaussian blur with probability `cfg.blur_prob` (the two-view
      methods).

  Returns:
    float32 (S, S, 3), S = cfg.image_size, normalised with cfg.mean/cfg.std.
  """
  crop_seed, photo_seed = augment.split_seed(seed, 2)
  image = augment.random_resized_crop(
      image_uint8, crop_seed, cfg.image_size, cfg.image_crop_scale, cfg.crop_ratio
  )
  if cfg.image_photometric:
    image = _photometric(image, photo_seed, cfg)
  if blur:
    scale = cfg.image_size / 224.0
    sigma = (cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale)
    blur_seed = tf.random.experimental.stateless_fold_in(photo_seed, 1)
    image = augment.random_gaussian_blur(image, blur_seed, cfg.blur_prob, sigma)
  return _normalize(image, cfg)


def _jigsaw_seeds(seed):
  """(crop, offsets, permutation, photometric) seeds; shared by jigsaw_crop/view."""
  return augment.split_seed(seed, 4)


def jigsaw_crop(image_uint8, seed, cfg: ViewConfig) -> tf.Tensor:
  """The crop the jigsaw view of `seed` cuts its tiles from.

  Exposed so that tests (and visualisations) can locate each tile in its cell.

  Args:
    image_uint8: (H, W, 3) uint8 image.
    seed: the same seed passed to `jigsaw_view`.
    cfg: view configuration.

  Returns:
    float32 (C, C, 3) in [0, 1], C = cfg.jigsaw_crop_size, before any photometric augmentation or
    normalisation.
  """
  crop_seed = _jigsaw_seeds(seed)[0]
  return augment.random_resized_crop(
      image_uint8, crop_seed, cfg.jigsaw_crop_size, cfg.jigsaw_crop_scale, cfg.crop_ratio
  )


def _grid_tiles(image_uint8, seed, cfg: ViewConfig, cells=None) -> tf.Tensor:
  """The tiles of the grid cells (all, row-major, or those listed in `cells`), not normalised.

  Each tile is cut at an independent random offset inside its cell and, with
  `cfg.tile_photometric`, augmented with the cell's own seed, so a cell's tile does not depend on
  which other cells are taken.
  """
  _, offset_seed, _, photo_seed = _jigsaw_seeds(seed)
  crop = jigsaw_crop(image_uint8, seed, cfg)
  n, cell, t = cfg.num_tiles, cfg.cell_size, cfg.tile_size

  # Per-tile offsets in [0, cell - t], drawn independently for y and x.
  offsets = tf.random.stateless_uniform(
      [n, 2], offset_seed, minval=0, maxval=cell - t + 1, dtype=tf.int32
  )
  all_cells = tf.range(n, dtype=tf.int32)
  top = (all_cells // cfg.grid) * cell + offsets[:, 0]
  left = (all_cells % cfg.grid) * cell + offsets[:, 1]
  span = tf.range(t, dtype=tf.int32)
  rows = tf.gather(crop, top[:, None] + span[None, :])  # (n, t, C, 3)
  tiles = tf.gather(rows, left[:, None] + span[None, :], axis=2, batch_dims=1)

  tile_seeds = tf.random.experimental.stateless_split(photo_seed, n)
  count = n
  if cells is not None:
    tiles, tile_seeds = tf.gather(tiles, cells), tf.gather(tile_seeds, cells)
    count = len(cells) if isinstance(cells, (tuple, list)) else int(cells.shape[0])
  if cfg.tile_photometric:
    tiles = tf.stack([_photometric(tiles[k], tile_seeds[k], cfg) for k in range(count)])
  return tiles


def _shuffle_tiles(tiles, perm, cfg: ViewConfig) -> tf.Tensor:
  n, t = cfg.num_tiles, cfg.tile_size
  return tf.ensure_shape(_normalize(tf.gather(tiles, perm), cfg), [n, t, t, 3])


def jigsaw_view(image_uint8, seed, cfg: ViewConfig, return_permutation: bool = False):
  """The jigsaw view v_It: grid**2 shuffled, independently augmented tiles.

  Args:
    image_uint8: (H, W, 3) uint8 image.
    seed: stateless seed, shape (2,).
    cfg: view configuration.
    return_permutation: also return the permutation.

  Returns:
    tiles, float32 (grid**2, T, T, 3), T = cfg.tile_size, normalised; and if
    `return_permutation`, perm int32 (grid**2,): output tile k was cut from cell perm[k] of the
    crop, cells numbered in row-major order.
  """
  perm_seed = _jigsaw_seeds(seed)[2]
  tiles = _grid_tiles(image_uint8, seed, cfg)
  # argsort of i.i.d. uniforms is a uniformly random permutation of all n! orders.
  perm = tf.argsort(tf.random.stateless_uniform([cfg.num_tiles], perm_seed))
  tiles = _shuffle_tiles(tiles, perm, cfg)
  if return_permutation:
    return tiles, perm
  return tiles


def eval_tiles(image_uint8, cfg: ViewConfig) -> tf.Tensor:
  """The deterministic eval view of the tiles: the image's short side resized to the jigsaw
  crop size, the centre crop, and the centre `tile_size` square of each grid cell, row-major.

  Returns:
    float32 (grid**2, T, T, 3), normalised as the jigsaw view.
  """
  size, cell, t = cfg.jigsaw_crop_size, cfg.cell_size, cfg.tile_size
  shape = tf.cast(tf.shape(image_uint8)[:2], tf.float32)
  new_hw = tf.maximum(tf.cast(tf.round(shape * (size / tf.reduce_min(shape))), tf.int32), size)
  image = tf.image.resize(image_uint8, new_hw, method="bilinear", antialias=True) * (1.0 / 255.0)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  crop = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
  margin = (cell - t) // 2
  tiles = [
      crop[r * cell + margin : r * cell + margin + t, c * cell + margin : c * cell + margin + t]
      for r in range(cfg.grid)
      for c in range(cfg.grid)
  ]
  return tf.ensure_shape(_normalize(tf.stack(tiles), cfg), [cfg.num_tiles, t, t, 3])


def jigsaw_class_view(image_uint8, seed, cfg: ViewConfig, permutations) -> tuple:
  """The covariant jigsaw pretext's input: the same tiles, shuffled by one of a fixed set.

  Args:
    image_uint8: (H, W, 3) uint8 image.
    seed: stateless seed, shape (2,).
    cfg: view configuration (a 3x3 grid).
    permutations: int32 (P, 9) tensor, the classes (`permutations.permutation_set`).

  Returns:
    (tiles float32 (9, T, T, 3) normalised, label int32 scalar in [0, P)): output tile k was cut
    from cell permutations[label][k].
  """
  perm_seed = _jigsaw_seeds(seed)[2]
  label = tf.random.stateless_uniform(
      [], perm_seed, minval=0, maxval=tf.shape(permutations)[0], dtype=tf.int32
  )
  tiles = _shuffle_tiles(_grid_tiles(image_uint8, seed, cfg), permutations[label], cfg)
  return tiles, label


def relative_patch_view(image_uint8, seed, cfg: ViewConfig) -> tuple:
  """Relative patch location's input: the centre tile and one of its 8 neighbours.

  The tiles come from the 3x3 grid of the jigsaw crop, so the gap between two tiles is
  `cell_size - tile_size` on average and each tile is jittered by its offset in its cell.

  Returns:
    (patches float32 (2, T, T, 3) normalised: centre, neighbour; label int32 scalar in [0, 8):
    the neighbour is cell methods.RELATIVE_POSITION_CELLS[label]).
  """
  perm_seed = _jigsaw_seeds(seed)[2]
  label = tf.random.stateless_uniform([], perm_seed, minval=0, maxval=8, dtype=tf.int32)
  neighbour = tf.gather(tf.constant(methods.RELATIVE_POSITION_CELLS, tf.int32), label)
  cells = tf.stack([tf.constant(4, tf.int32), neighbour])
  patches = _normalize(_grid_tiles(image_uint8, seed, cfg, cells), cfg)
  return tf.ensure_shape(patches, [2, cfg.tile_size, cfg.tile_size, 3]), label


def rotated_view(image_uint8, seed, cfg: ViewConfig, return_rotation: bool = False):
  """PIRL-rotation's transformed view: an image view (own crop and colours) rotated by k * 90
  degrees counter-clockwise, k uniform in {0, 1, 2, 3}."""
  view_seed, rotation_seed = augment.split_seed(seed, 2)
  k = tf.random.stateless_uniform(
      [], rotation_seed, minval=0, maxval=methods.NUM_ROTATIONS, dtype=tf.int32
  )
  view = tf.image.rot90(image_view(image_uint8, view_seed, cfg), k)
  view = tf.ensure_shape(view, [cfg.image_size, cfg.image_size, 3])
  return (view, k) if return_rotation else view


def make_views(
    image_bytes, index, seed, epoch, cfg: ViewConfig, method: str = "pirl", permutations=None
) -> dict[str, tf.Tensor]:
  """The views `method` trains on, of one encoded image, for `tf.data.Dataset.map`.

  The image is decoded once; each view takes its own crop of the original image with an
  independent seed derived from `(seed, epoch, index)`. The image view is the same for every
  method that has one.

  Args:
    image_bytes: scalar string tensor, a JPEG.
    index: stable dataset index of the example (the memory-bank row).
    seed: global run seed.
    epoch: epoch number (a different epoch gives different views).
    cfg: view configuration.
    method: one of `methods.METHODS`.
    permutations: int32 (P, 9), the jigsaw classes; needed by method 'jigsaw' only.

  Returns:
    'index' int32 scalar and, by method: 'image' float32 (S, S, 3) (pirl, pirl_rotation, npid,
    rotation, and blurred: moco_v2, simclr); 'image_2' float32 (S, S, 3), a second blurred
    image view with its own crop and colours (moco_v2's key, simclr's second view); 'tiles' float32 (grid**2, T, T, 3) (pirl, jigsaw); 'rotated' float32 (S, S, 3)
    (pirl_rotation); 'patches' float32 (2, T, T, 3) (relative_patch); 'label' int32 scalar
    (jigsaw, relative_patch).
  """
  if method not in methods.METHODS:
    raise ValueError(f"Unknown method {method!r}; valid: {', '.join(methods.METHODS)}.")
  image = augment.decode(image_bytes)
  image_seed, transform_seed = augment.split_seed(augment.example_seed(seed, epoch, index), 2)
  views = {"index": tf.cast(index, tf.int32)}
  if method in ("pirl", "pirl_rotation", "npid", "rotation"):
    views["image"] = image_view(image, image_seed, cfg)
  if method in methods.TWO_VIEW_METHODS:
    views["image"] = image_view(image, image_seed, cfg, blur=True)
    views["image_2"] = image_view(image, transform_seed, cfg, blur=True)
  if method == "pirl":
    views["tiles"] = jigsaw_view(image, transform_seed, cfg)
  elif method == "pirl_rotation":
    views["rotated"] = rotated_view(image, transform_seed, cfg)
  elif method == "jigsaw":
    if permutations is None:
      raise ValueError("method='jigsaw' needs the permutation set.")
    views["tiles"], views["label"] = jigsaw_class_view(image, transform_seed, cfg, permutations)
  elif method == "relative_patch":
    views["patches"], views["label"] = relative_patch_view(image, transform_seed, cfg)
  return views
