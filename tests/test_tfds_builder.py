"""Tests for the `isic2017` tfds builder on a fake ISIC tree."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import finetune_isic
import isic_fixtures
from pirl_jax.data import isic
from pirl_jax.data import labelled
import pirl_jax.data.tfds_isic2017  # noqa: F401  (registers 'isic2017')


def _sizes(image_id: str) -> tuple[int, int]:
  """Two images larger than 256 on the short side, the rest tiny."""
  return {"ISIC_0000001": (400, 300), "ISIC_0000022": (270, 330)}.get(image_id, (24, 16))


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  return isic_fixtures.write_tree(tmp_path_factory.mktemp("manual"), "zip", size=_sizes)


def _load(name, data_dir, manual_dir):
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  splits, info = tfds.load(
      name,
      data_dir=str(data_dir),
      with_info=True,
      download_and_prepare_kwargs={"download_config": config},
  )
  return {split: list(tfds.as_numpy(ds)) for split, ds in splits.items()}, info


def test_full_config_counts_ids_labels_and_images(tmp_path, manual_dir):
  examples, info = _load("isic2017", tmp_path, manual_dir)
  assert info.full_name == "isic2017/full/1.0.0"
  assert info.features["label"].names == ["melanoma", "seborrheic_keratosis", "nevus"]
  assert {split: len(exs) for split, exs in examples.items()} == {
      "train": 4,
      "validation": 2,
      "test": 3,
  }
  for split, rows in isic_fixtures.ROWS.items():
    got = sorted(
        (
            ex["image_id"].decode(),
            int(ex["melanoma"]),
            int(ex["seborrheic_keratosis"]),
            int(ex["label"]),
        )
        for ex in examples[split]
    )
    want = sorted((image_id, mel, sk, 0 if mel else 1 if sk else 2) for image_id, mel, sk in rows)
    assert got == want, split
  by_id = {ex["image_id"].decode(): ex["image"] for ex in examples["train"]}
  assert by_id["ISIC_0000001"].shape == (300, 400, 3) and by_id["ISIC_0000001"].dtype == np.uint8
  # The full config keeps the original JPEG bytes (no lossy re-encode).
  raw = tfds.builder("isic2017", data_dir=str(tmp_path)).as_dataset(
      split="validation", decoders={"image": tfds.decode.SkipDecoding()}
  )
  assert {ex["image_id"].decode(): ex["image"] for ex in tfds.as_numpy(raw)} == {
      image_id: isic_fixtures.jpeg_bytes(image_id) for image_id in ("ISIC_0000010", "ISIC_0000011")
  }


def test_resized_config_downscales_short_side(tmp_path, manual_dir):
  examples, _ = _load("isic2017/resized_256", tmp_path, manual_dir)
  shapes = {
      ex["image_id"].decode(): ex["image"].shape for split in examples.values() for ex in split
  }
  assert shapes["ISIC_0000001"] == (256, 341, 3)  # 400x300 -> 341x256
  assert shapes["ISIC_0000022"] == (313, 256, 3)  # 270x330 -> 256x313
  assert shapes["ISIC_0000010"] == (16, 24, 3)  # smaller than 256: unchanged
  assert len(shapes) == 9


def test_missing_test_archive_builds_the_other_splits_and_names_the_missing_one(tmp_path):
  manual = isic_fixtures.write_tree(tmp_path / "manual", "zip")
  archive = manual / f"{isic.SPLITS['test'][0]}.zip"
  archive.unlink()  # the test CSV is there, its images are not
  data_dir = str(tmp_path / "tfds")
  builder = tfds.builder("isic2017", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert sorted(builder.info.splits) == ["train", "validation"]
  train = list(tfds.as_numpy(tfds.load("isic2017", split="train", data_dir=data_dir)))
  assert len(train) == 4
  # Asked for later (a new builder, reading what was recorded when preparing):
  with pytest.raises(isic.MissingSplitError) as err:
    tfds.load("isic2017", split="test", data_dir=data_dir)
  assert err.value.split == "test" and "no test split" in str(err.value)
  assert str(archive) in str(err.value) and str(archive) in err.value.looked_for
  config = finetune_isic.get_config("tiny").data
  config.update(
      source="tfds",
      tfds_name="isic2017",
      tfds_data_dir=data_dir,
      cache_dir=str(tmp_path / "cache"),
      min_image_side=8,
  )
  assert len(labelled.load_split(config, "validation")) == 2
  with pytest.raises(ValueError, match=f"no test split.*{archive}"):
    labelled.load_split(config, "test")
