"""Tests for pirl_jax.data.isic: layouts, labels, order and every validation error."""

import logging
import pickle
import re
import zipfile

import numpy as np
import pytest

import isic_fixtures
from pirl_jax.data import isic
from pirl_jax.user_errors import UserError

TRAIN_CSV = "ISIC-2017_Training_Part3_GroundTruth.csv"
TRAIN_STEM = "ISIC-2017_Training_Data"


@pytest.fixture
def flat_root(tmp_path):
  return isic_fixtures.write_tree(tmp_path / "isic", "flat")


def _write_train_csv(root, text, encoding="utf-8"):
  (root / TRAIN_CSV).write_bytes(text.encode(encoding))


def test_flat_nested_and_zip_layouts_read_identically(tmp_path):
  splits = {
      layout: isic.read_isic2017(isic_fixtures.write_tree(tmp_path / layout, layout))
      for layout in ("flat", "nested", "zip")
  }
  reference = splits["flat"]
  assert reference["train"].image_ids == [
      "ISIC_0000000",
      "ISIC_0000001",
      "ISIC_0000002",
      "ISIC_0000003",
  ]
  np.testing.assert_array_equal(reference["train"].melanoma, [0, 0, 0, 1])
  np.testing.assert_array_equal(reference["train"].seborrheic_keratosis, [0, 1, 0, 0])
  np.testing.assert_array_equal(reference["train"].label, [2, 1, 2, 0])
  assert reference["train"].label.dtype == np.int32
  assert reference["train"].read_bytes(3) == isic_fixtures.jpeg_bytes("ISIC_0000003")
  for layout in ("nested", "zip"):
    for split in isic.SPLITS:
      ours, ref = splits[layout][split], reference[split]
      assert ours.image_ids == ref.image_ids, (layout, split)
      np.testing.assert_array_equal(ours.melanoma, ref.melanoma)
      np.testing.assert_array_equal(ours.seborrheic_keratosis, ref.seborrheic_keratosis)
      np.testing.assert_array_equal(ours.label, ref.label)
      assert [ours.read_bytes(i) for i in range(len(ours))] == [
          ref.read_bytes(i) for i in range(len(ref))
      ], (layout, split)
  assert (
      splits["nested"]["train"].refs[0].path.endswith(f"{TRAIN_STEM}/{TRAIN_STEM}/ISIC_0000000.jpg")
  )
  assert splits["zip"]["train"].refs[0] == isic.ImageRef(
      str(tmp_path / "zip" / f"{TRAIN_STEM}.zip"), f"{TRAIN_STEM}/ISIC_0000000.jpg"
  )


def test_all_splits_counts_and_labels(flat_root):
  splits = isic.read_isic2017(flat_root)
  assert {name: len(s) for name, s in splits.items()} == {"train": 4, "validation": 2, "test": 3}
  np.testing.assert_array_equal(splits["validation"].label, [2, 0])
  np.testing.assert_array_equal(splits["test"].label, [1, 2, 0])
  assert splits["test"].csv_path == flat_root / "ISIC-2017_Test_v2_Part3_GroundTruth.csv"


def test_items_name_images_and_load_them(tmp_path):
  split = isic.read_split(isic_fixtures.write_tree(tmp_path, "zip"), "validation")
  (name, loader), _ = split.items()
  assert name.endswith("ISIC-2017_Validation_Data.zip:ISIC-2017_Validation_Data/ISIC_0000010.jpg")
  assert loader() == isic_fixtures.jpeg_bytes("ISIC_0000010")


def test_split_survives_pickling(tmp_path):
  split = isic.read_split(isic_fixtures.write_tree(tmp_path, "zip"), "train")
  clone = pickle.loads(pickle.dumps(split))
  assert clone.image_ids == split.image_ids
  assert clone.read_bytes(2) == split.read_bytes(2) == isic_fixtures.jpeg_bytes("ISIC_0000002")


def test_error_csv_row_without_image(flat_root):
  (flat_root / TRAIN_STEM / "ISIC_0000002.jpg").unlink()
  with pytest.raises(isic.IsicFormatError) as err:
    isic.read_split(flat_root, "train")
  message = str(err.value)
  assert str(flat_root / TRAIN_CSV) in message
  # Rows: 0000003 line 2, 0000001 line 3, 0000000 line 4, 0000002 line 5.
  assert "ISIC_0000002 (line 5)" in message
  assert str(flat_root / TRAIN_STEM) in message


def test_image_without_csv_row_warns_or_fails_when_strict(flat_root, caplog):
  extra = flat_root / TRAIN_STEM / "ISIC_0000099.jpg"
  extra.write_bytes(isic_fixtures.jpeg_bytes("ISIC_0000099"))
  with caplog.at_level(logging.WARNING):
    split = isic.read_split(flat_root, "train")
  assert "ISIC_0000099" not in split.image_ids and len(split) == 4
  assert any(
      "ISIC_0000099" in r.getMessage() and TRAIN_CSV in r.getMessage() for r in caplog.records
  )
  with pytest.raises(isic.IsicFormatError, match=r"ISIC_0000099") as err:
    isic.read_split(flat_root, "train", strict=True)
  assert str(flat_root / TRAIN_CSV) in str(err.value)


def test_error_duplicate_id(flat_root):
  _write_train_csv(
      flat_root,
      "image_id,melanoma,seborrheic_keratosis\n"
      "ISIC_0000000,0,0\nISIC_0000001,0,1\nISIC_0000000,0,0\n",
  )
  with pytest.raises(isic.IsicFormatError) as err:
    isic.read_split(flat_root, "train")
  message = str(err.value)
  assert str(flat_root / TRAIN_CSV) in message
  assert "line 4" in message and "line 2" in message and "ISIC_0000000" in message


def test_error_missing_columns(flat_root):
  _write_train_csv(flat_root, "image_id,melanoma\nISIC_0000000,0\n")
  with pytest.raises(isic.IsicFormatError) as err:
    isic.read_split(flat_root, "train")
  assert str(flat_root / TRAIN_CSV) in str(err.value)
  assert re.search(r"missing column\(s\) seborrheic_keratosis\b", str(err.value))


def test_error_label_outside_0_1(flat_root):
  _write_train_csv(
      flat_root,
      "image_id,melanoma,seborrheic_keratosis\n" "ISIC_0000000,0.0,0.0\nISIC_0000001,2.0,0.0\n",
  )
  with pytest.raises(isic.IsicFormatError) as err:
    isic.read_split(flat_root, "train")
  message = str(err.value)
  assert f"{flat_root / TRAIN_CSV} line 3" in message
  assert "melanoma" in message and "'2.0'" in message


def test_error_both_labels_set(flat_root):
  _write_train_csv(flat_root, "image_id,melanoma,seborrheic_keratosis\n" "ISIC_0000000,1,1\n")
  with pytest.raises(isic.IsicFormatError, match="both melanoma and seborrheic_keratosis") as err:
    isic.read_split(flat_root, "train")
  assert f"{flat_root / TRAIN_CSV} line 2" in str(err.value)


def test_error_empty_split(flat_root):
  _write_train_csv(flat_root, "image_id,melanoma,seborrheic_keratosis\n")
  with pytest.raises(isic.IsicFormatError, match="empty train split") as err:
    isic.read_split(flat_root, "train")
  assert str(flat_root / TRAIN_CSV) in str(err.value)


def test_error_csv_not_utf8(flat_root):
  _write_train_csv(
      flat_root,
      "image_id,melanoma,seborrheic_keratosis\n" "ISIC_0000000,0,0 # Bénin\n",
      encoding="latin-1",
  )
  with pytest.raises(isic.IsicFormatError, match="not valid UTF-8") as err:
    isic.read_split(flat_root, "train")
  assert str(flat_root / TRAIN_CSV) in str(err.value)


def test_error_root_does_not_exist(tmp_path):
  missing = tmp_path / "no_such_isic"
  with pytest.raises(isic.IsicFormatError, match="does not exist") as err:
    isic.read_isic2017(missing)
  assert str(missing) in str(err.value)


def test_error_missing_csv(flat_root):
  (flat_root / TRAIN_CSV).unlink()
  with pytest.raises(isic.IsicFormatError, match="not found") as err:
    isic.read_split(flat_root, "train")
  assert str(flat_root / TRAIN_CSV) in str(err.value)


def test_error_missing_image_folder(tmp_path):
  root = isic_fixtures.write_tree(tmp_path, "zip")
  (root / f"{TRAIN_STEM}.zip").unlink()
  with pytest.raises(isic.IsicFormatError) as err:
    isic.read_split(root, "train")
  message = str(err.value)
  assert str(root / TRAIN_STEM) in message and str(root / f"{TRAIN_STEM}.zip") in message


def test_only_isic_jpgs_in_zip_are_images(tmp_path):
  root = isic_fixtures.write_tree(tmp_path, "zip")
  with zipfile.ZipFile(root / f"{TRAIN_STEM}.zip", "a") as zf:
    zf.writestr(f"__MACOSX/{TRAIN_STEM}/._ISIC_0000000.jpg", b"resource fork")
    zf.writestr(f"{TRAIN_STEM}/ISIC_00000001.jpg", b"eight digits: not an ISIC image")
  split = isic.read_split(root, "train", strict=True)
  assert len(split) == 4
  assert split.read_bytes(0) == isic_fixtures.jpeg_bytes("ISIC_0000000")


@pytest.mark.parametrize("missing", ["csv", "images"])
def test_missing_split_names_the_split_and_the_files_looked_for(tmp_path, missing):
  root = isic_fixtures.write_tree(tmp_path, "zip")
  stem, csv_name = isic.SPLITS["test"]
  gone = root / (csv_name if missing == "csv" else f"{stem}.zip")
  gone.unlink()
  assert len(isic.read_split(root, "train")) == 4  # the other splits are unaffected
  with pytest.raises(isic.MissingSplitError) as err:
    isic.read_split(root, "test")
  assert err.value.split == "test" and "test split" in str(err.value)
  assert str(gone) in str(err.value) and str(gone) in err.value.looked_for
  assert isinstance(err.value, isic.IsicFormatError) and isinstance(err.value, UserError)
  again = pickle.loads(pickle.dumps(err.value))
  assert str(again) == str(err.value) and again.looked_for == err.value.looked_for
