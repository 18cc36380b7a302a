"""Every data-layer error caused by the user's data or config is a UserError with its old base."""

import ml_collections
import numpy as np
import pytest

from configs import finetune_isic
from configs import pirl as pirl_configs
import isic_fixtures
from pirl_jax import user_errors
from pirl_jax.data import images
from pirl_jax.data import isic
from pirl_jax.data import jigsaw
from pirl_jax.data import labelled
from pirl_jax.data import labelled_views
from pirl_jax.data import pipeline
from pirl_jax.data import sources
from pirl_jax.user_errors import UserError


def _pretrain_data(tmp_path, **overrides):
  config = pirl_configs.get_config("tiny").data
  config.update(cache_dir=str(tmp_path / "cache"), min_image_side=8, **overrides)
  return config


def _finetune_data(tmp_path, **overrides):
  config = finetune_isic.get_config("tiny").data
  config.update(cache_dir=str(tmp_path / "cache"), min_image_side=8, **overrides)
  return config


def _bad_csv(tmp_path):
  root = isic_fixtures.write_tree(tmp_path / "isic", "flat")
  (root / isic.SPLITS["train"][1]).write_text("image_id,melanoma\nISIC_0000000,0\n")
  isic.read_split(root, "train")


def _missing_split(tmp_path):
  root = isic_fixtures.write_tree(tmp_path / "isic", "flat")
  (root / isic.SPLITS["test"][1]).unlink()
  isic.read_split(root, "test")


def _unknown_view_field(tmp_path):
  views = ml_collections.ConfigDict(pirl_configs.get_config("tiny").data.views.to_dict())
  views.tile_sise = 3
  pipeline.view_config(views)


def _empty_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  sources.create_source(_pretrain_data(tmp_path, source="folder", path=str(tmp_path / "empty")))


def _too_few_images(tmp_path):
  source = sources.InMemorySource("two", [b"a", b"b"], ["a", "b"])
  pipeline.PretrainInput(source, jigsaw.ViewConfig(), seed=0, global_batch_size=4)


CASES = {
    "bad image": (
        lambda tmp_path: images.prepare_image(b"", "x.jpg", min_side=1, max_side=None),
        ValueError,
    ),
    "bad CSV": (_bad_csv, ValueError),
    "missing ISIC root": (
        lambda tmp_path: isic.read_split(tmp_path / "nowhere", "train"),
        ValueError,
    ),
    "missing split": (_missing_split, ValueError),
    "missing folder": (
        lambda tmp_path: sources.create_source(
            _pretrain_data(tmp_path, source="folder", path=str(tmp_path / "nowhere"))
        ),
        FileNotFoundError,
    ),
    "folder without images": (_empty_folder, ValueError),
    "data.path with synthetic": (
        lambda tmp_path: sources.create_source(
            _pretrain_data(tmp_path, source="synthetic", path=str(tmp_path))
        ),
        ValueError,
    ),
    "unknown source": (
        lambda tmp_path: sources.create_source(_pretrain_data(tmp_path, source="imagenet")),
        ValueError,
    ),
    "unknown view field": (_unknown_view_field, ValueError),
    "bad view field": (lambda tmp_path: jigsaw.ViewConfig(grid=0), ValueError),
    "unknown augment field": (
        lambda tmp_path: labelled_views.augment_config({"hfilp": True}),
        ValueError,
    ),
    "bad label fraction": (
        lambda tmp_path: labelled.stratified_subset(np.zeros(4, int), 0.0, 0),
        ValueError,
    ),
    "bad on_bad_image": (
        lambda tmp_path: images.prepare_all([], min_side=1, max_side=None, on_bad="ignore"),
        ValueError,
    ),
    "fewer images than a batch": (_too_few_images, ValueError),
    "missing tfds dataset (pretraining)": (
        lambda tmp_path: sources.create_source(
            _pretrain_data(
                tmp_path, source="tfds", tfds_name="isic2017", tfds_data_dir=str(tmp_path / "no")
            )
        ),
        ValueError,
    ),
    "missing tfds dataset (fine-tuning)": (
        lambda tmp_path: labelled.load_split(
            _finetune_data(
                tmp_path, source="tfds", tfds_name="isic2017", tfds_data_dir=str(tmp_path / "no")
            ),
            "train",
        ),
        ValueError,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_user_errors_and_keep_their_builtin_base(tmp_path, case):
  make_error, builtin = CASES[case]
  with pytest.raises(UserError) as err:
    make_error(tmp_path)
  assert isinstance(err.value, builtin)
  assert str(err.value)


def test_listing_shows_the_first_ten_items_and_counts_the_rest():
  assert user_errors.listing(["a", "b"]) == "\n  a\n  b"
  shown = user_errors.listing([f"item{i}" for i in range(13)])
  assert shown.splitlines()[1:] == [f"  item{i}" for i in range(10)] + ["  ... and 3 more"]
