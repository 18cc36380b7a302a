"""A straightforward per-image PIL/NumPy implementation of the two PIRL views.

The baseline for the `pipeline` benchmark: the same transform as `pirl_jax.data.jigsaw.make_views`
(torchvision-style RandomResizedCrop, colour jitter in random order, random grayscale, horizontal
flip, normalisation; jigsaw crop, 3x3 cells with a random tile crop each, per-tile photometric
augmentation and a random permutation), written the way a PyTorch `Dataset.__getitem__` does it:
one image at a time, PIL for resizing and colour, NumPy for the rest. Not bit-identical to the
tf.data pipeline (other random streams, PIL's resampling); the same work.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

from pirl_jax.data import jigsaw


def _rrc_params(rng: np.random.Generator, width: int, height: int, scale, ratio):
  """torchvision RandomResizedCrop.get_params: (left, top, w, h)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, rng, size: int, scale, ratio) -> Image.Image:
  left, top, w, h = _rrc_params(rng, img.width, img.height, scale, ratio)
  return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def _adjust_hue(img: Image.Image, delta: float) -> Image.Image:
  h, s, v = img.convert("HSV").split()
  h_np = np.asarray(h, dtype=np.uint8)
  h_np = (h_np.astype(np.int16) + int(round(delta * 255))) % 256
  h = Image.fromarray(h_np.astype(np.uint8), "L")
  return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_augment(img: Image.Image, rng, cfg: jigsaw.ViewConfig) -> Image.Image:
  """ColorJitter (random order), RandomGrayscale, RandomHorizontalFlip, as torchvision."""
  brightness, contrast, saturation, hue = cfg.color_jitter
  ops = []
  if brightness > 0:
    f = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    ops.append(lambda x, f=f: ImageEnhance.Brightness(x).enhance(f))
  if contrast > 0:
    f = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    ops.append(lambda x, f=f: ImageEnhance.Contrast(x).enhance(f))
  if saturation > 0:
    f = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    ops.append(lambda x, f=f: ImageEnhance.Color(x).enhance(f))
  if hue > 0:
    d = rng.uniform(-hue, hue)
    ops.append(lambda x, d=d: _adjust_hue(x, d))
  for i in rng.permutation(len(ops)):
    img = ops[i](img)
  if rng.uniform() < cfg.grayscale_prob:
    img = img.convert("L").convert("RGB")
  if rng.uniform() < cfg.flip_prob:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return img


def _normalize(img: Image.Image, cfg: jigsaw.ViewConfig) -> np.ndarray:
  x = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def image_view(img: Image.Image, rng, cfg: jigsaw.ViewConfig) -> np.ndarray:
  out = random_resized_crop(img, rng, cfg.image_size, cfg.image_crop_scale, cfg.crop_ratio)
  if cfg.image_photometric:
    out = color_augment(out, rng, cfg)
  return _normalize(out, cfg)


def jigsaw_view(img: Image.Image, rng, cfg: jigsaw.ViewConfig) -> np.ndarray:
  crop = random_resized_crop(img, rng, cfg.jigsaw_crop_size, cfg.jigsaw_crop_scale, cfg.crop_ratio)
  cell, t, n = cfg.cell_size, cfg.tile_size, cfg.num_tiles
  tiles = []
  for k in range(n):
    row, col = divmod(k, cfg.grid)
    dy, dx = rng.integers(0, cell - t + 1, size=2)
    top, left = row * cell + int(dy), col * cell + int(dx)
    tile = crop.crop((left, top, left + t, top + t))
    if cfg.tile_photometric:
      tile = color_augment(tile, rng, cfg)
    tiles.append(_normalize(tile, cfg))
  perm = rng.permutation(n)
  return np.stack([tiles[i] for i in perm])


def make_views(image_bytes: bytes, index: int, rng, cfg: jigsaw.ViewConfig) -> dict:
  """Both views of one encoded image (decoded once), as `jigsaw.make_views` returns them."""
  img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
  return {
      "image": image_view(img, rng, cfg),
      "tiles": jigsaw_view(img, rng, cfg),
      "index": np.int32(index),
  }


def batches(encoded: list[bytes], cfg: jigsaw.ViewConfig, batch_size: int, seed: int = 0):
  """Endless batches over a random order of `encoded`, one image at a time."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(encoded))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      views = [make_views(encoded[i], i, rng, cfg) for i in order[start : start + batch_size]]
      yield {k: np.stack([v[k] for v in views]) for k in views[0]}
