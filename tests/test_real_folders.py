"""benchmarks/real_folders.py: the folders of real images the defaults are measured on."""

import csv

import numpy as np
import pytest
from PIL import Image

from benchmarks import real_folders
from pirl_jax.data import probe_data


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_digits_folder_has_every_digit_and_labels_the_probes_read(tmp_path):
  root = tmp_path / "digits"
  assert real_folders.write_digits(root) == 1797
  rows = _rows(root / "labels.csv")
  assert len(rows) == 1797 and {r["label"] for r in rows} == {str(d) for d in range(10)}
  image = np.asarray(Image.open(root / rows[0]["file"]))
  assert image.shape == (32, 32, 3)
  few = _rows(root / "labels_10.csv")
  index = [r for r in few if r["split"] == "index"]
  assert sorted(np.unique([r["label"] for r in index], return_counts=True)[1]) == [10] * 10
  # The few-label CSV keeps exactly the full CSV's queries and takes its index from the index rows.
  assert {r["file"] for r in few if r["split"] == "query"} == {
      r["file"] for r in rows if r["split"] == "query"
  }
  assert {r["file"] for r in index} <= {r["file"] for r in rows if r["split"] == "index"}
  assert len(probe_data.read_labels_csv(str(root / "labels_10.csv"), str(root))) == len(few)


def test_texture_folder_holds_half_of_each_class_as_queries(tmp_path):
  pytest.importorskip(
      "skimage",
      reason="the texture folder is cut from scikit-image's sample "
      "photographs; scikit-image is a development tool, not a dependency",
  )
  root = tmp_path / "textures"
  assert real_folders.write_textures(root, per_class=4) == 24
  rows = _rows(root / "labels.csv")
  assert [r["split"] for r in rows[:4]] == ["index", "index", "query", "query"]
  assert np.asarray(Image.open(root / rows[0]["file"])).shape == (128, 128, 3)
