"""Tests for pirl_jax.data.images: decoding, conversion, bad inputs, preparation and its cache."""

import io
import logging
import pickle
import re

import numpy as np
import pytest
from PIL import Image, ImageFile

from pirl_jax.data import errors
from pirl_jax.data import images
from pirl_jax.user_errors import UserError


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  img.save(out, format=fmt, **kwargs)
  return out.getvalue()


def _gradient(width: int, height: int) -> np.ndarray:
  yy, xx = np.mgrid[0:height, 0:width]
  return np.stack(
      [xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), np.full_like(xx, 90)], axis=-1
  ).astype(np.uint8)


def _rgb_jpeg(width=40, height=30) -> bytes:
  return _encode(Image.fromarray(_gradient(width, height)), "JPEG", quality=95)


def _decode(data: bytes) -> Image.Image:
  img = Image.open(io.BytesIO(data))
  img.load()
  return img


def test_load_rgb_decodes_rgb_jpeg():
  rgb = images.load_rgb(_rgb_jpeg(40, 30), "good.jpg")
  assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
  np.testing.assert_allclose(rgb.astype(float), _gradient(40, 30), atol=12)


def test_truncated_jpeg():
  data = _rgb_jpeg(64, 64)
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  with pytest.raises(images.BadImageError, match=r"^/data/ISIC_0000001\.jpg: truncated") as err:
    images.load_rgb(data[: len(data) // 2], "/data/ISIC_0000001.jpg")
  assert err.value.name == "/data/ISIC_0000001.jpg"


def test_zero_byte_file():
  with pytest.raises(images.BadImageError, match=r"^empty\.jpg: empty file \(0 bytes\)$"):
    images.load_rgb(b"", "empty.jpg")


def test_non_image_with_jpg_name():
  with pytest.raises(
      images.BadImageError, match=r"^a\.zip:ISIC_0000002\.jpg: not a recognised image"
  ):
    images.load_rgb(b"<html>404 Not Found</html>", "a.zip:ISIC_0000002.jpg")


def test_grayscale_is_converted_to_rgb():
  grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))  # 8 x 25
  rgb = images.load_rgb(_encode(Image.fromarray(grey), "PNG"), "grey.png")
  assert rgb.shape == (8, 25, 3) and rgb.dtype == np.uint8
  for channel in range(3):
    np.testing.assert_array_equal(rgb[:, :, channel], grey)


def test_cmyk_is_converted_to_rgb():
  cmyk = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red in CMYK
  rgb = images.load_rgb(_encode(cmyk, "JPEG", quality=95), "cmyk.jpg")
  assert rgb.shape == (12, 16, 3) and rgb.dtype == np.uint8
  np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), [255, 0, 0], atol=8)


def test_rgba_alpha_is_dropped():
  rgba = np.zeros((10, 12, 4), dtype=np.uint8)
  rgba[...] = (10, 200, 30, 0)  # fully transparent: dropping alpha keeps the colour
  rgba[:5, :, 3] = 255
  rgb = images.load_rgb(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), "rgba.png")
  assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb, np.broadcast_to([10, 200, 30], (10, 12, 3)))


def test_16_bit_png_is_scaled_to_8_bit():
  deep = (np.arange(16, dtype=np.uint16) * 4369).reshape(2, 8)  # 0 .. 65535 in 15 steps
  data = _encode(Image.fromarray(deep), "PNG")
  assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
  rgb = images.load_rgb(data, "deep.png")
  assert rgb.shape == (2, 8, 3) and rgb.dtype == np.uint8
  expected = np.arange(16).reshape(2, 8) * 17  # 4369 / 257 = 17: full range, not clipped at 255
  for channel in range(3):
    np.testing.assert_array_equal(rgb[:, :, channel], expected)


def test_image_smaller_than_min_side():
  with pytest.raises(images.BadImageError) as err:
    images.prepare_image(_rgb_jpeg(40, 20), "small.jpg", min_side=32, max_side=64)
  message = str(err.value)
  assert message.startswith("small.jpg: ")
  assert "40x20" in message and "min_side=32" in message and "data.min_image_side" in message


def test_missing_path_is_named(tmp_path):
  missing = tmp_path / "ISIC_0000404.jpg"
  items = [(str(missing), missing.read_bytes)]
  with pytest.raises(images.BadImageError) as err:
    images.prepare_all(items, min_side=1, max_side=64)
  assert str(err.value).startswith(f"{missing}: cannot read file")
  skipped = images.prepare_all(items, min_side=1, max_side=64, on_bad="skip")
  assert skipped.encoded == [] and skipped.kept.tolist() == []
  assert skipped.skipped[0][0] == str(missing) and "No such file" in skipped.skipped[0][1]


def test_prepare_image_downscales_short_side_only():
  # 800x600 exercises the JPEG draft (reduced-scale) decode: 600 / 64 > 8.
  small = _decode(images.prepare_image(_rgb_jpeg(800, 600), "big.jpg", min_side=1, max_side=64))
  assert small.format == "JPEG" and small.mode == "RGB" and small.size == (85, 64)
  want = np.asarray(Image.fromarray(_gradient(800, 600)).resize((85, 64), Image.BILINEAR))
  np.testing.assert_allclose(np.asarray(small, dtype=float), want, atol=16)
  tall = _decode(images.prepare_image(_rgb_jpeg(30, 90), "tall.jpg", min_side=1, max_side=20))
  assert tall.size == (20, 60)
  kept = _decode(images.prepare_image(_rgb_jpeg(30, 90), "kept.jpg", min_side=1, max_side=64))
  assert kept.size == (30, 90)  # never upscaled


def test_prepare_image_without_max_side_keeps_clean_jpegs():
  jpeg = _rgb_jpeg(50, 40)
  assert images.prepare_image(jpeg, "a.jpg", min_side=1, max_side=None) is jpeg
  png = _encode(Image.fromarray(_gradient(50, 40)), "PNG")
  out = _decode(images.prepare_image(png, "a.png", min_side=1, max_side=None))
  assert out.format == "JPEG" and out.mode == "RGB" and out.size == (50, 40)


def test_prepare_all_skip_keeps_order_and_logs_bad_names(caplog):
  items = [
      ("good0.jpg", lambda: _rgb_jpeg(40, 30)),
      ("empty.jpg", lambda: b""),
      ("good2.jpg", lambda: _rgb_jpeg(30, 40)),
      ("tiny.jpg", lambda: _rgb_jpeg(8, 8)),
  ]
  with pytest.raises(images.BadImageError, match="^empty.jpg"):
    images.prepare_all(items, min_side=16, max_side=20)
  with caplog.at_level(logging.WARNING):
    result = images.prepare_all(items, min_side=16, max_side=20, on_bad="skip")
  assert result.kept.tolist() == [0, 2]
  assert [_decode(b).size for b in result.encoded] == [(27, 20), (20, 27)]
  assert [name for name, _ in result.skipped] == ["empty.jpg", "tiny.jpg"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("Skipped 2 of 4" in w and "empty.jpg" in w and "tiny.jpg" in w for w in warnings)


def test_prepare_all_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
  files = {f"img{i}.jpg": _rgb_jpeg(40 + i, 30) for i in range(3)}
  items = [(name, lambda name=name: files[name]) for name in files]
  cache = tmp_path / "cache" / "prepared.npz"
  first = images.prepare_all(items, min_side=1, max_side=24, cache_path=cache)
  assert cache.exists() and [p.name for p in cache.parent.iterdir()] == ["prepared.npz"]

  real_prepare = images.prepare_image
  calls = []

  def counting_prepare(*args, **kwargs):
    calls.append(args[1])
    return real_prepare(*args, **kwargs)

  monkeypatch.setattr(images, "prepare_image", counting_prepare)
  again = images.prepare_all(items, min_side=1, max_side=24, cache_path=cache)
  assert calls == []  # served from the cache
  assert again.encoded == first.encoded and again.kept.tolist() == [0, 1, 2]

  images.prepare_all(items, min_side=1, max_side=20, cache_path=cache)
  assert len(calls) == 3  # another max_side: rebuilt
  files["img1.jpg"] = _rgb_jpeg(60, 30)
  changed = images.prepare_all(items, min_side=1, max_side=20, cache_path=cache)
  assert len(calls) == 6  # changed content: rebuilt
  assert _decode(changed.encoded[1]).size == (40, 20)


def test_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
  files = {f"img{i}.jpg": _rgb_jpeg(40 + i, 30) for i in range(3)}
  items = [(name, lambda name=name: files[name]) for name in files]
  cache = tmp_path / "prepared" / "0123.npz"
  first = images.prepare_all(items, min_side=1, max_side=24, cache_path=cache)
  intact = cache.read_bytes()
  real_prepare = images.prepare_image
  calls = []

  def counting_prepare(*args, **kwargs):
    calls.append(args[1])
    return real_prepare(*args, **kwargs)

  monkeypatch.setattr(images, "prepare_image", counting_prepare)
  for damaged in (b"", intact[: len(intact) // 2]):
    cache.write_bytes(damaged)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      again = images.prepare_all(items, min_side=1, max_side=24, cache_path=cache)
    assert again.encoded == first.encoded and again.kept.tolist() == first.kept.tolist()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(cache) in w for w in warnings), warnings
    # Rebuilt and rewritten: the next run is served from the cache again.
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      cached = images.prepare_all(items, min_side=1, max_side=24, cache_path=cache)
    assert calls == [] and cached.encoded == first.encoded
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_bad_image_error_pickles():
  err = pickle.loads(pickle.dumps(images.BadImageError("x.jpg", "broken")))
  assert isinstance(err, ValueError) and str(err) == "x.jpg: broken"
  assert isinstance(err, UserError)


def test_a_folder_where_the_cache_file_goes_is_one_error_naming_it(tmp_path):
  items = [("img0.jpg", lambda: _rgb_jpeg(40, 30))]
  cache = tmp_path / "prepared" / "0123.npz"
  (cache / "something").mkdir(parents=True)
  with pytest.raises(
      errors.DataSourceError,
      match=rf"cache file {re.escape(str(cache))} is a folder.*data.cache_dir",
  ):
    images.prepare_all(items, min_side=1, max_side=24, cache_path=cache)
  assert (cache / "something").is_dir()  # nothing in it deleted
