"""Paths in the data config: `~` in every path field, one cache root, data.path vs data.source."""

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import finetune_isic
from configs import pirl as pirl_configs
import isic_fixtures
from pirl_jax.data import errors
from pirl_jax.data import isic
from pirl_jax.data import labelled
from pirl_jax.data import paths
from pirl_jax.data import sources
from pirl_jax.data import synthetic
import pirl_jax.data.tfds_isic2017  # noqa: F401  (registers 'isic2017')


@pytest.fixture
def home(tmp_path, monkeypatch):
  """A fake home folder: `~` means it, and no cache is set in the environment."""
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv(paths.CACHE_ENV_VAR, raising=False)
  return tmp_path


def _pretrain_data(**overrides):
  config = pirl_configs.get_config("tiny").data
  config.update(min_image_side=8, **overrides)
  return config


def _finetune_data(**overrides):
  config = finetune_isic.get_config("tiny").data
  config.update(min_image_side=8, **overrides)
  return config


def _write_images(folder, n=3):
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


# ------------------------------------------------------------------------------- cache root ----


def test_cache_root_expands_home_in_the_field_the_environment_and_the_default(home, monkeypatch):
  assert paths.cache_root() == home / ".cache" / "pirl_jax"
  assert paths.cache_root("~/mine") == home / "mine"
  monkeypatch.setenv(paths.CACHE_ENV_VAR, "~/from_env")
  assert paths.cache_root() == home / "from_env"
  assert paths.cache_root("~/mine") == home / "mine"  # the config field wins
  assert sources.cache_root("~/mine") == home / "mine"


def test_ensure_synthetic_default_is_where_the_sources_look(home, monkeypatch):
  made = []

  def fake_generate(path, **kwargs):
    path.mkdir(parents=True)
    (path / synthetic.COMPLETE_MARKER).write_text("{}")
    made.append(path)
    return path

  monkeypatch.setattr(synthetic, "generate", fake_generate)
  config = _pretrain_data(synthetic_seed=3, synthetic_num_unlabeled=5)
  from_sources = sources.synthetic_root(config)
  assert str(from_sources).startswith(str(home / ".cache" / "pirl_jax"))
  assert synthetic.ensure_synthetic(seed=3, num_unlabeled=5) == from_sources
  assert made == [from_sources]  # generated once, then reused


# ------------------------------------------------------------------------- ~ in path fields ----


def test_folder_and_isic_sources_expand_home_in_path_and_cache_dir(home):
  _write_images(home / "imgs")
  folder = sources.create_source(
      _pretrain_data(source="folder", path="~/imgs", cache_dir="~/cache")
  )
  assert folder.num_examples == 3
  assert len(list((home / "cache" / "prepared").glob("*.npz"))) == 1
  isic_fixtures.write_tree(home / "isic", "flat")
  train = sources.create_source(_pretrain_data(source="isic", path="~/isic", cache_dir="~/cache"))
  assert train.num_examples == 4
  assert labelled.isic_root(_finetune_data(source="isic", path="~/isic")) == home / "isic"
  assert len(isic.read_split("~/isic", "validation")) == 2


def test_tfds_data_dir_expands_home(home):
  isic_fixtures.write_tree(home / "manual", "zip")
  builder = tfds.builder("isic2017/resized_256", data_dir=str(home / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(home / "manual"))
  )
  source = sources.create_source(
      _pretrain_data(
          source="tfds",
          tfds_name="isic2017/resized_256",
          tfds_split="test",
          tfds_data_dir="~/tfds",
          cache_dir="~/cache",
      )
  )
  assert source.num_examples == 3 and source.data_dir == str(home / "tfds")
  split = labelled.load_split(
      _finetune_data(
          source="tfds",
          tfds_name="isic2017/resized_256",
          tfds_data_dir="~/tfds",
          cache_dir="~/cache",
      ),
      "validation",
  )
  assert len(split) == 2


# ---------------------------------------------------------------------- data.path vs source ----


@pytest.mark.parametrize("source", ["synthetic", "tfds"])
def test_data_path_with_a_source_that_does_not_read_it_is_an_error(tmp_path, source):
  overrides = dict(
      source=source,
      path=str(tmp_path / "my_isic"),
      cache_dir=str(tmp_path / "c"),
      tfds_name="isic2017",
  )
  calls = [
      lambda: sources.create_source(_pretrain_data(**overrides)),
      lambda: labelled.load_split(_finetune_data(**overrides), "train"),
  ]
  if source == "synthetic":
    calls.append(lambda: labelled.isic_root(_finetune_data(**overrides)))
  for call in calls:
    with pytest.raises(errors.ConfigFieldError) as err:
      call()
    message = str(err.value)
    assert "data.path" in message and f"data.source={source!r}" in message
    assert isinstance(err.value, ValueError)
  assert not (tmp_path / "c").exists()  # nothing generated or prepared first


@pytest.mark.parametrize("source", ["isic", "folder"])
def test_sources_that_read_data_path_need_it(tmp_path, source):
  with pytest.raises(errors.ConfigFieldError, match=f"data.source='{source}' needs data.path"):
    sources.create_source(_pretrain_data(source=source, cache_dir=str(tmp_path)))
  if source == "isic":
    with pytest.raises(errors.ConfigFieldError, match="needs data.path"):
      labelled.load_split(_finetune_data(source=source, cache_dir=str(tmp_path)), "train")
