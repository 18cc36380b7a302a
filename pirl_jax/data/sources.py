"""Unlabelled image sources for pretraining.

Every source yields (encoded image, stable dataset index). The index is the memory-bank row of the
image, so it must not change between epochs, restarts or device counts.

Two kinds:
  * `InMemorySource` (an image folder, the ISIC 2017 train split, the embedded synthetic set):
    every image is decoded once, converted to RGB, downscaled and re-encoded as a clean JPEG held
    in memory (cached on disk). Random access by index, so data order is a pure function of
    (seed, epoch), the same for any process count, and any step can be resumed exactly.
  * `TfdsSource` (imagenet2012, stl10 unlabelled, ...): streamed from a prepared tfds `data_dir`,
    indexed by position in the deterministic (unshuffled) split order. Each process streams its
    own shard of that order, so the pipeline shuffles within a process's shard: the data order
    depends on the process count.

`data.path` (read by the 'isic' and 'folder' sources), `data.tfds_data_dir` and `data.cache_dir`
may start with `~`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Callable, Sequence

from pirl_jax import storage
from pirl_jax.data import errors
from pirl_jax.data import images as images_lib
from pirl_jax.data import paths

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class InMemorySource:
  """Prepared JPEG bytes, indexed 0..N-1 in a stable order."""

  name: str
  encoded: list[bytes]
  image_names: list[str]
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  @property
  def num_examples(self) -> int:
    return len(self.encoded)


@dataclasses.dataclass
class TfdsSource:
  """A tfds split streamed with encoded images (decoding happens in the view pipeline)."""

  name: str
  split: str
  data_dir: str | None
  num_examples: int

  def as_dataset(self, process_index: int, process_count: int):
    """This process's share of (image_bytes, index) in the split's stable order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = tfds.load(
        self.name,
        split=self.split,
        data_dir=self.data_dir,
        shuffle_files=False,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    ds = ds.enumerate().shard(process_count, process_index)
    return ds.map(lambda i, ex: (ex["image"], tf.cast(i, tf.int32)))


cache_root = paths.cache_root

# The sources that read data.path, and what it must hold for each.
_PATH_SOURCES = {
    "isic": "the folder with the ISIC 2017 files (zips, or the folders they unpack to, and the "
    "Part 3 ground-truth CSVs)",
    "folder": "a folder of jpg/png images",
}


def check_path_field(data_cfg) -> None:
  """Checks that `data.path` is given exactly when `data.source` reads it.

  A path given to a source that does not read it would be silently ignored, and the results
  reported as if they came from the user's data.

  Raises:
    ConfigFieldError: naming data.source and data.path.
  """
  if data_cfg.source in _PATH_SOURCES:
    if not data_cfg.path:
      raise errors.ConfigFieldError(
          f"data.source={data_cfg.source!r} needs data.path, " f"{_PATH_SOURCES[data_cfg.source]}."
      )
  elif data_cfg.path:
    raise errors.ConfigFieldError(
        f"data.path={data_cfg.path!r} is set but data.source={data_cfg.source!r} does not read "
        f"it (only {' and '.join(repr(s) for s in _PATH_SOURCES)} do): set data.source='isic' "
        "for ISIC 2017 files, 'folder' for a folder of images, or clear data.path."
    )


def _prepare(
    name: str,
    items: Sequence[tuple[str, Callable[[], bytes]]],
    data_cfg,
) -> InMemorySource:
  if not items:
    raise errors.DataSourceError(f"Data source {name!r} has no images.")
  prepared = images_lib.prepare_cached(items, data_cfg, name, data_cfg.on_bad_image)
  names = [items[i][0] for i in prepared.kept]
  if not prepared.encoded:
    raise errors.DataSourceError(
        f"Data source {name!r}: all {len(items)} images were skipped as bad input."
    )
  return InMemorySource(
      name=name, encoded=list(prepared.encoded), image_names=names, skipped=list(prepared.skipped)
  )


def _file_loader(path: pathlib.Path) -> Callable[[], bytes]:
  return lambda: path.read_bytes()


def folder_items(root: str) -> list[tuple[str, Callable[[], bytes]]]:
  """All jpg/png files under `root` (`~` expanded), recursively, sorted by relative path."""
  root_path = storage.path(paths.user_path(root), absolute=False)
  if not root_path.is_dir():
    raise errors.MissingDataError(
        f"Image folder does not exist: {root_path} (config field data.path)"
    )
  files = sorted(
      p
      for p in storage.files_under(root_path)
      if p.suffix.lower() in IMAGE_SUFFIXES and not re.search(r"_superpixels\.png$", p.name)
  )
  return [(str(p), _file_loader(p)) for p in files]


def isic_items(root: str, split: str = "train") -> list[tuple[str, Callable[[], bytes]]]:
  """The images of one ISIC 2017 split (labels ignored), in the reader's stable order.

  `root` may start with `~`.
  """
  from pirl_jax.data import isic

  return isic.read_split(paths.user_path(root), split).items()


def synthetic_root(data_cfg) -> pathlib.Path:
  """The embedded synthetic set, generated once into the cache (logged) and reused."""
  from pirl_jax.data import synthetic

  cache = paths.cache_root(data_cfg.cache_dir) / synthetic.CACHE_SUBDIR
  return synthetic.ensure_synthetic(
      cache, seed=data_cfg.synthetic_seed, num_unlabeled=data_cfg.synthetic_num_unlabeled
  )


def create_source(data_cfg) -> InMemorySource | TfdsSource:
  """Builds the pretraining source named by `data_cfg.source`."""
  kind = data_cfg.source
  if kind not in ("synthetic", "isic", "folder", "tfds"):
    raise errors.ConfigFieldError(
        f"Unknown data.source {kind!r}; choose synthetic, isic, folder or tfds."
    )
  check_path_field(data_cfg)
  if kind == "synthetic":
    from pirl_jax.data import synthetic

    root = synthetic_root(data_cfg)
    items = isic_items(str(root), "train")
    unlabeled = root / synthetic.UNLABELED_DIR
    if data_cfg.include_unlabeled and unlabeled.is_dir():
      items += folder_items(str(unlabeled))
    return _prepare(f"synthetic:{root}", items, data_cfg)
  path = paths.user_path(data_cfg.path)
  if kind == "isic":
    return _prepare(f"isic:{path}", isic_items(path, "train"), data_cfg)
  if kind == "folder":
    return _prepare(f"folder:{path}", folder_items(path), data_cfg)
  if not data_cfg.tfds_name:
    raise errors.ConfigFieldError(
        "data.source='tfds' needs data.tfds_name (e.g. imagenet2012, stl10)."
    )
  import tensorflow_datasets as tfds

  data_dir = paths.user_path(data_cfg.tfds_data_dir) or None
  try:
    builder = tfds.builder(data_cfg.tfds_name, data_dir=data_dir)
    num = builder.info.splits[data_cfg.tfds_split].num_examples
  except Exception as e:  # tfds raises several types for "not prepared"/"unknown split".
    raise errors.DataSourceError(
        f"tfds dataset {data_cfg.tfds_name!r} split {data_cfg.tfds_split!r} is not available in "
        f"data_dir={data_dir!r} (config fields data.tfds_name / data.tfds_split / "
        f"data.tfds_data_dir). Prepare it first; nothing is downloaded at run time. ({e})"
    ) from e
  return TfdsSource(data_cfg.tfds_name, data_cfg.tfds_split, data_dir, int(num))
