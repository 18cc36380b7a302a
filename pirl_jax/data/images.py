"""Decoding and validation of image files with PIL.

Every image enters the project through this module: it is fully decoded (so truncated files are
caught here, not mid-training), converted to 8-bit RGB, checked for a minimum size, downscaled and
re-encoded as a clean JPEG that the tf.data pipeline can decode without surprises.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image

from pirl_jax.data import errors
from pirl_jax.user_errors import UserError

JPEG_QUALITY = 95
_CACHE_FORMAT = "pirl_jax.prepared_images.v1"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What PIL raises, depending on the format plugin, for corrupt or truncated data.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


class BadImageError(UserError, ValueError):
  """An image file that cannot be used; the message always names the file.

  Attributes:
    name: the file (a path, or `archive.zip:member`).
    reason: what is wrong with it.
  """

  def __init__(self, name: str, reason: str):
    super().__init__(name, reason)
    self.name = name
    self.reason = reason

  def __str__(self) -> str:
    return f"{self.name}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class PreparedImages:
  """Result of `prepare_all`.

  Attributes:
    encoded: the prepared JPEG bytes of every kept image, in input order.
    kept: int64 positions in the input sequence of the images in `encoded`.
    skipped: `(name, reason)` for every image left out (only with `on_bad='skip'`).
  """

  encoded: list[bytes]
  kept: np.ndarray
  skipped: list[tuple[str, str]]


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """The (width, height) whose short side is `short_side`, aspect ratio kept."""
  short = min(width, height)
  return (max(1, round(width * short_side / short)), max(1, round(height * short_side / short)))


def _open(
    data: bytes, name: str, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
  """Fully decodes `data`; returns the loaded image and its stored (width, height).

  With `max_side`, a large JPEG is decoded directly at 1/2, 1/4 or 1/8 scale (never below the
  final size): much faster than decoding several megapixels only to downscale them.
  """
  if not data:
    raise BadImageError(name, "empty file (0 bytes)")
  try:
    img = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:
    raise BadImageError(name, f"not a recognised image format ({len(data)} bytes)") from None
  except _DECODE_ERRORS as e:
    raise BadImageError(name, f"cannot open image: {e}") from e
  size = img.size
  try:
    if max_side is not None and min(size) > max_side:
      img.draft(None, _scaled_size(*size, max_side))  # a no-op for formats other than JPEG
    img.load()
  except _DECODE_ERRORS as e:
    raise BadImageError(name, f"truncated or corrupt {img.format} image: {e}") from e
  return img, size


def _to_rgb_array(img: Image.Image) -> np.ndarray:
  """Converts any PIL mode to uint8 (H, W, 3); alpha is dropped, not composited."""
  if img.mode in _SIXTEEN_BIT_MODES:
    # PIL's own conversion clips 16-bit samples at 255; rescale the full range instead.
    grey = np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if img.mode in ("P", "PA"):
    img = img.convert("RGBA")  # honours palette transparency without a PIL warning
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, dtype=np.uint8)


def load_rgb(data: bytes, name: str) -> np.ndarray:
  """Decodes an image file completely into 8-bit RGB.

  Grayscale, palette, CMYK, RGBA and 16-bit images are converted; alpha is dropped.

  Args:
    data: the encoded file contents.
    name: the file's path (or `archive.zip:member`), used in error messages.

  Returns:
    uint8 array of shape (H, W, 3).

  Raises:
    BadImageError: for an empty, non-image, truncated or otherwise corrupt file.
  """
  img, _ = _open(data, name)
  return _to_rgb_array(img)


def prepare_image(data: bytes, name: str, *, min_side: int, max_side: int | None) -> bytes:
  """Validates one image and re-encodes it as a clean 8-bit RGB JPEG.

  Args:
    data: the encoded file contents.
    name: the file's path (or `archive.zip:member`), used in error messages.
    min_side: the smallest acceptable short side in pixels (config `data.min_image_side`).
    max_side: the short side is downscaled to this if larger (never upscaled). None keeps the
      size, and then an intact 8-bit RGB JPEG is returned unchanged (no lossy re-encode).

  Returns:
    JPEG bytes (quality 95) of an 8-bit RGB image.

  Raises:
    BadImageError: as `load_rgb`, or if the short side is below `min_side`.
  """
  img, (width, height) = _open(data, name, max_side)
  if min(width, height) < min_side:
    raise BadImageError(
        name,
        f"image is {width}x{height} pixels; its short side {min(width, height)} is below "
        f"min_side={min_side} (config data.min_image_side)",
    )
  if max_side is None and img.format == "JPEG" and img.mode == "RGB":
    return data
  rgb = Image.fromarray(_to_rgb_array(img))
  if max_side is not None and min(width, height) > max_side:
    rgb = rgb.resize(_scaled_size(width, height, max_side), Image.Resampling.BILINEAR)
  out = io.BytesIO()
  rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


THUMBNAIL_SIDE = 16


def thumbnail(data: bytes, name: str = "image") -> np.ndarray:
  """The image's pixels averaged down to THUMBNAIL_SIDE x THUMBNAIL_SIDE RGB (float32, 0-255).

  Two encodings of the same picture, each prepared (downscaled, re-encoded), give thumbnails a
  few grey levels apart; different photographs differ by ten or more.
  """
  img, _ = _open(data, name)
  rgb = Image.fromarray(_to_rgb_array(img))
  small = rgb.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
  return np.asarray(small, np.float32)


def _read(name: str, loader: Callable[[], bytes]) -> bytes:
  try:
    return loader()
  except (OSError, zipfile.BadZipFile) as e:
    raise BadImageError(name, f"cannot read file: {e}") from e


def _map_in_order(fn, items: list) -> list:
  """`[fn(x) for x in items]` on a thread pool (PIL and hashlib release the GIL); fails fast."""
  with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
    futures = [pool.submit(fn, item) for item in items]
    try:
      return [f.result() for f in futures]
    except BaseException:
      for f in futures:
        f.cancel()
      raise


def _cache_key(items: list, min_side: int, max_side: int, on_bad: str) -> str:
  """A digest of the settings and of every input's name and content."""

  def digest(item):
    name, loader = item
    try:
      content = hashlib.blake2b(loader(), digest_size=16).hexdigest()
    except (OSError, zipfile.BadZipFile) as e:
      content = f"unreadable: {e}"
    return f"{name}\0{content}\n"

  key = hashlib.sha256(repr((_CACHE_FORMAT, min_side, max_side, on_bad)).encode())
  for line in _map_in_order(digest, items):
    key.update(line.encode())
  return key.hexdigest()


def _load_cache(path: Path, key: str) -> PreparedImages | None:
  """The cached result at `path` if its key is `key`; None (to rebuild) if stale or unreadable.

  Raises:
    DataSourceError: `path` is a folder (it cannot be rebuilt without deleting what is in it).
  """
  if path.is_dir():
    raise errors.DataSourceError(
        f"The prepared-image cache file {path} is a folder. Move it away, or set another cache "
        "folder (config field data.cache_dir, or the PIRL_JAX_CACHE environment variable)."
    )
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["key"]) != key:
        logging.info("Prepared-image cache %s is stale; rebuilding it.", path)
        return None
      blob, offsets, kept = f["blob"], f["offsets"], f["kept"]
      if (
          offsets.ndim != 1
          or len(offsets) != len(kept) + 1
          or offsets[0] != 0
          or offsets[-1] != len(blob)
          or np.any(np.diff(offsets) < 0)
      ):
        raise ValueError("inconsistent image offsets")
      encoded = [blob[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
      skipped = list(zip(f["skipped_names"].tolist(), f["skipped_reasons"].tolist()))
      return PreparedImages(encoded, kept.astype(np.int64), skipped)
  # np.load raises many types for a damaged file (EOFError for an empty one, BadZipFile,
  # tokenize.TokenError, NotImplementedError, ...); any of them means: rebuild.
  except Exception as e:  # pylint: disable=broad-except
    logging.warning(
        "Ignoring unreadable prepared-image cache %s (%s: %s); rebuilding it.",
        path,
        type(e).__name__,
        e,
    )
    return None


def _save_cache(path: Path, key: str, prepared: PreparedImages) -> None:
  """Writes the cache atomically: a crash or a concurrent reader never sees half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  offsets = np.zeros(len(prepared.encoded) + 1, dtype=np.int64)
  np.cumsum([len(b) for b in prepared.encoded], dtype=np.int64, out=offsets[1:])
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(
          f,
          key=np.array(key),
          offsets=offsets,
          kept=prepared.kept,
          blob=np.frombuffer(b"".join(prepared.encoded), dtype=np.uint8),
          skipped_names=np.array([n for n, _ in prepared.skipped], dtype=str),
          skipped_reasons=np.array([r for _, r in prepared.skipped], dtype=str),
      )
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def prepare_cached(
    items: Sequence[tuple[str, Callable[[], bytes]]], data_cfg, what: str, on_bad: str
) -> PreparedImages:
  """`prepare_all` with the data config's sizes, cached under the data cache's `prepared/`.

  The cache file is named by `what` (the source and split), the item names and the sizes; its
  content is keyed by every item's bytes too (`prepare_all`), so a changed image is rebuilt.
  """
  from pirl_jax.data import paths  # pylint: disable=g-import-not-at-top

  key = hashlib.sha1(
      repr((what, [n for n, _ in items], data_cfg.min_image_side, data_cfg.max_image_side)).encode()
  ).hexdigest()[:16]
  return prepare_all(
      items,
      min_side=data_cfg.min_image_side,
      max_side=data_cfg.max_image_side,
      on_bad=on_bad,
      cache_path=paths.cache_root(data_cfg.cache_dir) / "prepared" / f"{key}.npz",
  )


def _log_skipped(skipped: list[tuple[str, str]], total: int) -> None:
  if skipped:
    logging.warning(
        "Skipped %d of %d images that could not be used: %s",
        len(skipped),
        total,
        "; ".join(f"{name}: {reason}" for name, reason in skipped),
    )


def prepare_all(
    items: Sequence[tuple[str, Callable[[], bytes]]],
    *,
    min_side: int,
    max_side: int | None,
    on_bad: str = "error",
    cache_path: str | os.PathLike | None = None,
) -> PreparedImages:
  """Prepares many images with `prepare_image`, optionally through an on-disk cache.

  Args:
    items: `(name, loader)` pairs; `loader()` returns the file's bytes.
    min_side: see `prepare_image`.
    max_side: see `prepare_image`.
    on_bad: 'error' raises on the first bad image (in input order); 'skip' leaves bad images out,
      records them in `skipped` and logs their count and names at the end.
    cache_path: if given, a file holding the result. It is reused when its key (names and
      content hashes of all inputs, `min_side`, `max_side`, `on_bad`) matches, else (re)written.

  Returns:
    PreparedImages.

  Raises:
    BadImageError: with `on_bad='error'`, for the first bad or unreadable image.
    errors.ConfigFieldError: for an unknown `on_bad` (config field data.on_bad_image).
  """
  if on_bad not in ("error", "skip"):
    raise errors.ConfigFieldError(f"data.on_bad_image={on_bad!r}: must be 'error' or 'skip'")
  items = list(items)
  if cache_path is not None:
    cache_path = Path(cache_path)
    key = _cache_key(items, min_side, max_side, on_bad)
    cached = _load_cache(cache_path, key)
    if cached is not None:
      logging.info("Loaded %d prepared images from cache %s.", len(cached.encoded), cache_path)
      _log_skipped(cached.skipped, len(items))
      return cached

  def prepare(item):
    name, loader = item
    try:
      return prepare_image(_read(name, loader), name, min_side=min_side, max_side=max_side), None
    except BadImageError as e:
      if on_bad == "error":
        raise
      return None, e.reason

  results = _map_in_order(prepare, items)
  prepared = PreparedImages(
      encoded=[jpeg for jpeg, _ in results if jpeg is not None],
      kept=np.array([i for i, (jpeg, _) in enumerate(results) if jpeg is not None], dtype=np.int64),
      skipped=[
          (items[i][0], reason) for i, (_, reason) in enumerate(results) if reason is not None
      ],
  )
  _log_skipped(prepared.skipped, len(items))
  if cache_path is not None:
    _save_cache(cache_path, key, prepared)
    logging.info("Wrote %d prepared images to cache %s.", len(prepared.encoded), cache_path)
  return prepared
