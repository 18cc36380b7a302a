"""Labelled images for frozen-feature probes: an index set (the labelled examples) and a query set.

Sources:
  * the embedded synthetic set or ISIC 2017 files (`isic`): a labelled split as the index (the
    training split) and another as the queries (validation or test); classes melanoma,
    seborrheic keratosis, nevus, scored as in the challenge (the mean of the melanoma and
    seborrheic keratosis AUCs);
  * any folder with a labels CSV: lines `file,label` or `file,label,split` (an optional header
    `file,label[,split]`), `file` relative to the folder, any number of classes; `split` is
    `index` (or `train`) or `query` (or `test`). Without a split column, a seeded, stratified
    `query_fraction` of each class are the queries. Images of the folder without a line are not
    used;
  * a folder of class subfolders without a CSV (the ImageFolder layout, `<class>/<file>`): each
    image labelled by its subfolder's name, the queries drawn as above;
  * a tfds dataset with an integer label feature: two of its splits.

Every image is decoded, converted to RGB, downscaled and re-encoded once, through the same
on-disk cache as the training data.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
from absl import logging
import numpy as np

from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.data import images as images_lib
from pirl_jax.data import labelled
from pirl_jax.data import paths
from pirl_jax.data import sources

ISIC_CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")
ISIC_SCORED = ("melanoma", "seborrheic_keratosis")
_INDEX_NAMES = ("index", "train")
_QUERY_NAMES = ("query", "test")
_SPLIT_SALT = 0x9B0BE


class LabelsCsvError(user_errors.UserError, ValueError):
  """A labels CSV that cannot be used; the message names the file and line."""


@dataclasses.dataclass
class LabelledImages:
  """Prepared images with integer labels (`encoded`, `label`: what `EvalInput` reads)."""

  names: list[str]
  encoded: list[bytes]
  label: np.ndarray

  def __len__(self) -> int:
    return len(self.names)


@dataclasses.dataclass
class ProbeSets:
  """What a probe needs.

  Attributes:
    index: the labelled examples the classifiers are fitted on (kNN's neighbours).
    query: the held-out examples they are scored on.
    class_names: one name per label value.
    scored: the classes whose AUCs `auc_mean` averages.
    description: where the images come from, for logs and reports.
  """

  index: LabelledImages
  query: LabelledImages
  class_names: tuple[str, ...]
  scored: tuple[str, ...]
  description: str


def _from_split(split: labelled.LabelledSplit) -> LabelledImages:
  return LabelledImages(
      list(split.image_ids), list(split.encoded), np.asarray(split.label, np.int32)
  )


def read_labels_csv(
    path: str | pathlib.Path, folder: str | pathlib.Path
) -> list[tuple[str, str, str | None]]:
  """The (file, label, split or None) rows of a labels CSV, checked against the image folder.

  Raises:
    LabelsCsvError: naming the CSV and line of an unknown file, a missing label, an unknown
      split, a repeated file, a malformed line, or when fewer than two classes are labelled.
  """
  path = storage.path(path, absolute=False)
  folder = storage.path(folder, absolute=False)
  if not path.is_file():
    raise LabelsCsvError(f"Labels CSV {path} does not exist.")
  available = {
      p.relative_to(folder).as_posix()
      for p in storage.files_under(folder)
      if p.suffix.lower() in sources.IMAGE_SUFFIXES
  }
  rows, seen = [], {}
  try:
    with io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="") as f:
      lines = list(csv.reader(f))
  except UnicodeDecodeError as e:
    raise LabelsCsvError(f"{path} is not UTF-8 text ({e}).") from e
  for number, line in enumerate(lines, start=1):
    cells = [c.strip() for c in line]
    if not any(cells):
      continue
    if number == 1 and cells[:2] == ["file", "label"]:
      continue
    where = f"{path} line {number}"
    if len(cells) not in (2, 3):
      raise LabelsCsvError(
          f"{where}: expected 'file,label' or 'file,label,split', got "
          f"{len(cells)} columns: {line!r}."
      )
    name, label = cells[0], cells[1]
    split = cells[2].lower() if len(cells) == 3 and cells[2] else None
    if pathlib.PurePath(name).is_absolute():
      name = (
          pathlib.Path(name).relative_to(folder).as_posix()
          if pathlib.Path(name).is_relative_to(folder)
          else name
      )
    if name not in available:
      raise LabelsCsvError(
          f"{where}: {cells[0]!r} is not an image in {folder} (jpg/png, "
          "path relative to the folder)."
      )
    if not label:
      raise LabelsCsvError(f"{where}: {name!r} has no label.")
    if split is not None and split not in _INDEX_NAMES + _QUERY_NAMES:
      raise LabelsCsvError(
          f"{where}: split {cells[2]!r} is not one of " f"{', '.join(_INDEX_NAMES + _QUERY_NAMES)}."
      )
    if name in seen:
      raise LabelsCsvError(f"{where}: {name!r} is already labelled on line {seen[name]}.")
    seen[name] = number
    rows.append((name, label, split))
  classes = sorted({label for _, label, _ in rows})
  if len(classes) < 2:
    raise LabelsCsvError(
        f"{path}: {len(rows)} labelled image(s) with "
        f"{'only the label ' + repr(classes[0]) if classes else 'no labels'}; a probe needs "
        "at least two classes."
    )
  unlabelled = len(available) - len(rows)
  if unlabelled:
    logging.info(
        "%d image(s) of %s have no line in %s and are not used by the probe.",
        unlabelled,
        folder,
        path,
    )
  return rows


def class_folder_labels(folder: str | pathlib.Path) -> list[tuple[str, str, None]] | None:
  """(file, subfolder name, None) rows when `folder` is in the ImageFolder layout: every image
  directly inside one of at least two class subfolders. None for any other layout."""
  folder = storage.path(folder, absolute=False)
  names = sorted(
      p.relative_to(folder).as_posix()
      for p in storage.files_under(folder)
      if p.suffix.lower() in sources.IMAGE_SUFFIXES
  )
  parts = [pathlib.PurePosixPath(n).parts for n in names]
  if not names or any(len(p) != 2 for p in parts) or len({p[0] for p in parts}) < 2:
    return None
  return [(name, p[0], None) for name, p in zip(names, parts)]


def has_labels(folder: str, labels_csv: str) -> bool:
  """Whether a probe can label `folder`: a labels CSV, or class subfolders."""
  return bool(labels_csv) or class_folder_labels(folder) is not None


def split_positions(
    labels: np.ndarray, query_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """A seeded, stratified split: per class, round(query_fraction * n) queries (at least one and
  at most n - 1 when the class has two or more images). Returns sorted (index, query) positions."""
  index, query = [], []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = len(members)
    q = int(round(query_fraction * n))
    if n >= 2:
      q = min(max(q, 1), n - 1)
    order = np.random.default_rng([seed, _SPLIT_SALT, int(c)]).permutation(n)
    query.append(members[order[:q]])
    index.append(members[order[q:]])
  return np.sort(np.concatenate(index)), np.sort(np.concatenate(query))


def load_folder(
    folder: str, labels_csv: str, data_cfg, query_fraction: float = 0.5, seed: int = 0
) -> ProbeSets:
  """A folder of images labelled by a CSV, or by class subfolders when `labels_csv` is empty
  (see the module docstring)."""
  folder_path = storage.path(folder, absolute=False)
  if not folder_path.is_dir():
    raise LabelsCsvError(f"Image folder {folder} does not exist.")
  if labels_csv:
    rows = read_labels_csv(labels_csv, folder_path)
  else:
    rows = class_folder_labels(folder_path)
    if rows is None:
      raise LabelsCsvError(
          f"The images in {folder} need labels: a labels CSV with lines 'file,label' (file "
          "relative to the folder), or one subfolder per class with the images in it."
      )
  class_names = tuple(sorted({label for _, label, _ in rows}))
  items = [
      (str(folder_path / name), (lambda p=folder_path / name: p.read_bytes()))
      for name, _, _ in rows
  ]
  prepared = images_lib.prepare_cached(items, data_cfg, f"probe-folder:{folder_path}", "error")
  labels = np.array([class_names.index(label) for _, label, _ in rows], np.int32)
  names = [name for name, _, _ in rows]
  splits = [split for _, _, split in rows]
  if any(s is not None for s in splits):
    if any(s is None for s in splits):
      missing = next(i for i, s in enumerate(splits) if s is None)
      raise LabelsCsvError(
          f"{labels_csv}: some lines have a split column and some do not "
          f"(e.g. {names[missing]!r}); give every line a split or none."
      )
    is_query = np.array([s in _QUERY_NAMES for s in splits])
    index_pos, query_pos = np.flatnonzero(~is_query), np.flatnonzero(is_query)
    if not len(index_pos) or not len(query_pos):
      raise LabelsCsvError(f"{labels_csv}: the split column needs both index and query lines.")
  else:
    index_pos, query_pos = split_positions(labels, query_fraction, seed)

  def subset(positions):
    return LabelledImages(
        [names[i] for i in positions], [prepared.encoded[i] for i in positions], labels[positions]
    )

  scored = class_names[1:] if len(class_names) == 2 else class_names
  return ProbeSets(
      subset(index_pos),
      subset(query_pos),
      class_names,
      scored,
      f"{folder_path} labelled by {labels_csv or 'its class subfolders'}",
  )


def load_tfds(
    name: str, index_split: str, query_split: str, data_cfg, label_feature: str = "label"
) -> ProbeSets:
  """Two splits of a prepared tfds dataset with an integer label feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = paths.user_path(data_cfg.tfds_data_dir) or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    feature = builder.info.features[label_feature]
    class_names = tuple(feature.names)
  except Exception as e:  # tfds raises several types for "not prepared" / "no such feature".
    raise LabelsCsvError(
        f"tfds dataset {name!r} with a class-label feature {label_feature!r} is not available "
        f"in data_dir={data_dir!r}; prepare it first (nothing is downloaded at run time). "
        f"({e})"
    ) from e
  sets = []
  for split in (index_split, query_split):
    ds = tfds.load(
        name,
        split=split,
        data_dir=data_dir,
        shuffle_files=False,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    rows = [
        (f"tfds:{name}/{split}[{i}]", ex["image"], int(ex[label_feature]))
        for i, ex in enumerate(tfds.as_numpy(ds))
    ]
    prepared = images_lib.prepare_cached(
        [(n, (lambda b=b: b)) for n, b, _ in rows], data_cfg, f"probe-tfds:{name}/{split}", "error"
    )
    sets.append(
        LabelledImages(
            [n for n, _, _ in rows],
            list(prepared.encoded),
            np.array([y for _, _, y in rows], np.int32),
        )
    )
  scored = class_names[1:] if len(class_names) == 2 else class_names
  return ProbeSets(
      sets[0], sets[1], class_names, scored, f"tfds {name} ({index_split} / {query_split})"
  )


def load_isic(data_cfg, index_split: str = "train", query_split: str = "test") -> ProbeSets:
  """Two labelled ISIC 2017 splits of the embedded set or of the user's files."""
  index = labelled.load_split(data_cfg, index_split)
  query = labelled.load_split(data_cfg, query_split)
  return ProbeSets(
      _from_split(index),
      _from_split(query),
      ISIC_CLASSES,
      ISIC_SCORED,
      f"{query.source} ({index_split} / {query_split})",
  )


def describe_sets(sets: ProbeSets) -> str:
  def counts(images: LabelledImages) -> str:
    per_class = np.bincount(images.label, minlength=len(sets.class_names))
    return ", ".join(f"{n} {name}" for n, name in zip(per_class, sets.class_names))

  return (
      f"{sets.description}: index {len(sets.index)} images ({counts(sets.index)}), "
      f"queries {len(sets.query)} ({counts(sets.query)})"
  )
