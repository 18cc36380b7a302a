"""Unlabelled sources and the pretraining input pipeline: indices, determinism, process shares."""

import io
import itertools

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import pirl as pirl_configs
from pirl_jax.data import pipeline
from pirl_jax.data import sources


def _data_config(tmp_path, **overrides):
  config = pirl_configs.get_config("tiny").data
  config.cache_dir = str(tmp_path / "cache")
  for k, v in overrides.items():
    config[k] = v
  return config


def _write_image(path, size=(60, 50), mode="RGB", fmt="JPEG", seed=0):
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).convert(mode).save(path, fmt)


def test_folder_source_is_recursive_sorted_and_ignores_non_images(tmp_path):
  root = tmp_path / "imgs"
  _write_image(root / "b.jpg", seed=1)
  _write_image(root / "a" / "z.png", fmt="PNG", seed=2)
  _write_image(root / "a" / "ISIC_0000001_superpixels.png", fmt="PNG", seed=3)
  (root / "notes.txt").write_text("not an image")
  (root / "meta.csv").write_text("image_id\n")
  source = sources.create_source(_data_config(tmp_path, source="folder", path=str(root)))
  assert [n.split("imgs/")[-1] for n in source.image_names] == ["a/z.png", "b.jpg"]
  assert source.num_examples == 2
  for encoded in source.encoded:
    assert Image.open(io.BytesIO(encoded)).mode == "RGB"


def test_folder_source_missing_path_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    sources.create_source(
        _data_config(tmp_path, source="folder", path=str(tmp_path / "does-not-exist"))
    )


def test_folder_source_bad_image_skip_is_counted(tmp_path):
  root = tmp_path / "imgs"
  _write_image(root / "good.jpg")
  (root / "empty.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match="empty.jpg"):
    sources.create_source(_data_config(tmp_path, source="folder", path=str(root)))
  source = sources.create_source(
      _data_config(tmp_path, source="folder", path=str(root), on_bad_image="skip")
  )
  assert source.num_examples == 1
  assert [name.endswith("empty.jpg") for name, _ in source.skipped] == [True]


def test_isic_source_uses_train_split_in_id_order(tmp_path, small_isic_root):
  source = sources.create_source(_data_config(tmp_path, source="isic", path=str(small_isic_root)))
  assert source.num_examples == 120
  assert source.image_names == sorted(source.image_names)


def _pipeline(source, process_index=0, process_count=1, batch=8, seed=3):
  views = pipeline.view_config(pirl_configs.get_config("tiny").data.views)
  return pipeline.PretrainInput(
      source,
      views,
      seed=seed,
      global_batch_size=batch,
      process_index=process_index,
      process_count=process_count,
  )


@pytest.fixture(scope="module")
def small_source(tmp_path_factory, small_isic_root):
  tmp_path = tmp_path_factory.mktemp("src")
  return sources.create_source(_data_config(tmp_path, source="isic", path=str(small_isic_root)))


def test_batches_shapes_and_epoch_covers_each_index_once(small_source):
  data = _pipeline(small_source, batch=8)
  assert data.steps_per_epoch == 15
  batches = list(itertools.islice(data.iterate(0), 15))
  first = batches[0]
  assert first["image"].shape == (8, 32, 32, 3) and first["image"].dtype == np.float32
  assert first["tiles"].shape == (8, 9, 10, 10, 3) and first["tiles"].dtype == np.float32
  seen = np.concatenate([b["index"] for b in batches])
  assert sorted(seen.tolist()) == list(range(120))


def test_same_seed_same_batches_and_resume_mid_epoch_matches(small_source):
  data = _pipeline(small_source)
  run_a = list(itertools.islice(data.iterate(0), 18))  # crosses into epoch 1
  run_b = list(itertools.islice(_pipeline(small_source).iterate(0), 18))
  resumed = list(itertools.islice(_pipeline(small_source).iterate(13), 5))
  for a, b in zip(run_a, run_b):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, r in zip(run_a[13:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], r[key])
  # The next epoch is a different order with different augmentation.
  assert not np.array_equal(run_a[0]["index"], run_a[15]["index"])
  other_seed = next(_pipeline(small_source, seed=4).iterate(0))
  assert not np.array_equal(other_seed["index"], run_a[0]["index"])


def test_process_shares_concatenate_to_the_global_batch(small_source):
  whole = list(itertools.islice(_pipeline(small_source, batch=8).iterate(2), 3))
  shares = [
      list(itertools.islice(_pipeline(small_source, p, 2, batch=8).iterate(2), 3)) for p in range(2)
  ]
  for step in range(3):
    for key in ("index", "image", "tiles"):
      np.testing.assert_array_equal(
          whole[step][key], np.concatenate([shares[0][step][key], shares[1][step][key]])
      )


def test_view_config_rejects_unknown_field():
  views = ml_collections.ConfigDict(pirl_configs.get_config("tiny").data.views.to_dict())
  views.tile_sise = 3
  with pytest.raises(ValueError, match="data.views.tile_sise"):
    pipeline.view_config(views)


def test_tfds_source_streams_encoded_images_with_stable_indices(tmp_path, small_isic_root):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import pirl_jax.data.tfds_isic2017  # pylint: disable=g-import-not-at-top,unused-import

  data_dir = tmp_path / "tfds"
  builder = tfds.builder("isic2017/resized_256", data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(small_isic_root))
  )
  config = _data_config(
      tmp_path,
      source="tfds",
      tfds_name="isic2017/resized_256",
      tfds_split="validation",
      tfds_data_dir=str(data_dir),
  )
  source = sources.create_source(config)
  assert source.num_examples == 30
  seen = []
  for p in range(2):
    for image, index in source.as_dataset(p, 2).as_numpy_iterator():
      assert isinstance(image, bytes) and image[:2] == b"\xff\xd8"  # still encoded JPEG
      seen.append(int(index))
  assert sorted(seen) == list(range(30))
  batch = next(_pipeline(source, batch=4).iterate(0))
  assert batch["tiles"].shape == (4, 9, 10, 10, 3)
  # Each process shuffles its own shard of the split (unlike in-memory sources, whose global
  # batches do not depend on the process count).
  for p in range(2):
    epoch = list(itertools.islice(_pipeline(source, p, 2, batch=4).iterate(0), 7))
    indices = np.concatenate([b["index"] for b in epoch])
    assert len(indices) == 14 and np.all(indices % 2 == p)
  with pytest.raises(ValueError, match="not available"):
    sources.create_source(
        _data_config(
            tmp_path,
            source="tfds",
            tfds_name="isic2017",
            tfds_split="train",
            tfds_data_dir=str(tmp_path / "no"),
        )
    )
