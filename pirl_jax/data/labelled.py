"""The labelled ISIC 2017 Part 3 splits for evaluation: loading them, label subsets, the
unlabelled pool, class weights.

Sources (config field `data.source`): the embedded synthetic set ('synthetic'), the user's ISIC 2017
files under `data.path` ('isic', read with `pirl_jax.data.isic`), or the `isic2017` tfds builder
prepared in `data.tfds_data_dir` ('tfds'). Every image is decoded once, converted to RGB,
downscaled and re-encoded as a clean JPEG held in memory (cached on disk), as for pretraining.
Labels: 0 melanoma, 1 seborrheic keratosis, 2 nevus. Their views are `labelled_views`, their
tf.data inputs `labelled_input`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from typing import Sequence

from absl import logging
import numpy as np

from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.data import errors
from pirl_jax.data import images as images_lib
from pirl_jax.data import isic
from pirl_jax.data import paths
from pirl_jax.data import sources

NUM_CLASSES = 3
SPLITS = ("train", "validation", "test")
# Arbitrary salt: the subset draw must not coincide with any other stream derived from the seed.
_SUBSET_SALT = 0x1ABE1


@dataclasses.dataclass
class LabelledSplit:
  """One split held in memory, in the reader's order (sorted by image id).

  Attributes:
    split: 'train', 'validation' or 'test'.
    image_ids: e.g. 'ISIC_0000000', exactly as in the ground truth.
    melanoma: int32 0/1 per image.
    seborrheic_keratosis: int32 0/1 per image.
    label: int32 per image: 0 melanoma, 1 seborrheic keratosis, 2 nevus.
    encoded: prepared JPEG bytes per image.
    csv_path: the ground-truth CSV the labels were read from; None for tfds, whose labels come
      from the prepared dataset.
    source: a readable name of where the split came from.
    skipped: (name, reason) of training images left out as bad input.
  """

  split: str
  image_ids: list[str]
  melanoma: np.ndarray
  seborrheic_keratosis: np.ndarray
  label: np.ndarray
  encoded: list[bytes]
  csv_path: str | None
  source: str
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.image_ids)


def isic_root(data_cfg) -> pathlib.Path:
  """The folder in the ISIC 2017 layout that `data.source` names ('synthetic' or 'isic')."""
  sources.check_path_field(data_cfg)
  if data_cfg.source == "synthetic":
    return sources.synthetic_root(data_cfg)
  if data_cfg.source == "isic":
    return storage.path(paths.user_path(data_cfg.path), absolute=False)
  raise errors.ConfigFieldError(f"data.source={data_cfg.source!r} has no ISIC folder.")


def _load_isic(data_cfg, split: str, on_bad: str) -> LabelledSplit:
  root = isic_root(data_cfg)
  raw = isic.read_split(str(root), split)
  prepared = images_lib.prepare_cached(raw.items(), data_cfg, f"isic-{split}:{root}", on_bad)
  keep = np.asarray(prepared.kept, dtype=np.int64)
  return LabelledSplit(
      split=split,
      image_ids=[raw.image_ids[i] for i in keep],
      melanoma=raw.melanoma[keep].astype(np.int32),
      seborrheic_keratosis=raw.seborrheic_keratosis[keep].astype(np.int32),
      label=raw.label[keep].astype(np.int32),
      encoded=list(prepared.encoded),
      csv_path=str(raw.csv_path),
      source=f"{data_cfg.source}:{root}",
      skipped=list(prepared.skipped),
  )


def _load_tfds(data_cfg, split: str, on_bad: str) -> LabelledSplit:
  import tensorflow_datasets as tfds
  from pirl_jax.data import tfds_isic2017  # pylint: disable=unused-import  (registers isic2017)

  data_dir = paths.user_path(data_cfg.tfds_data_dir) or None
  try:
    ds = tfds.load(
        data_cfg.tfds_name,
        split=split,
        data_dir=data_dir,
        shuffle_files=False,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # tfds raises several types for "not prepared" / "unknown split".
    raise errors.DataSourceError(
        f"tfds dataset {data_cfg.tfds_name!r} split {split!r} is not available in "
        f"data_dir={data_dir!r} (config fields data.tfds_name / data.tfds_data_dir). Prepare it "
        f"first (see pirl_jax/data/tfds_isic2017.py); nothing is downloaded at run time. ({e})"
    ) from e
  rows = sorted(
      (
          (
              ex["image_id"].decode(),
              ex["image"],
              int(ex["melanoma"]),
              int(ex["seborrheic_keratosis"]),
              int(ex["label"]),
          )
          for ex in tfds.as_numpy(ds)
      ),
      key=lambda r: r[0],
  )
  name = f"tfds:{data_cfg.tfds_name}/{split}"
  items = [(f"{name}:{r[0]}", (lambda b=r[1]: b)) for r in rows]
  prepared = images_lib.prepare_cached(items, data_cfg, name, on_bad)
  keep = np.asarray(prepared.kept, dtype=np.int64)
  rows = [rows[i] for i in keep]
  return LabelledSplit(
      split=split,
      image_ids=[r[0] for r in rows],
      melanoma=np.array([r[2] for r in rows], np.int32),
      seborrheic_keratosis=np.array([r[3] for r in rows], np.int32),
      label=np.array([r[4] for r in rows], np.int32),
      encoded=list(prepared.encoded),
      csv_path=None,
      source=name,
      skipped=list(prepared.skipped),
  )


def load_split(data_cfg, split: str) -> LabelledSplit:
  """Reads, validates and prepares one split named by the `data` config block.

  Bad training images follow `data.on_bad_image`; validation and test images are never skipped,
  because a submission must score every image of the ground truth.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
  on_bad = data_cfg.on_bad_image if split == "train" else "error"
  if data_cfg.source in ("synthetic", "isic"):
    out = _load_isic(data_cfg, split, on_bad)
  elif data_cfg.source == "tfds":
    sources.check_path_field(data_cfg)
    out = _load_tfds(data_cfg, split, on_bad)
  else:
    raise errors.ConfigFieldError(
        f"data.source={data_cfg.source!r} is not one of synthetic, " "isic, tfds."
    )
  if not len(out):
    raise errors.DataSourceError(f"The {split} split of {out.source} has no usable images.")
  logging.info("%s split from %s: %s.", split, out.source, summarize(out))
  return out


def unlabelled_pool(
    data_cfg,
    unlabelled_path: str,
    train: LabelledSplit,
    labelled_positions: np.ndarray,
    held_out: Sequence[LabelledSplit],
) -> LabelledSplit:
  """UDA's unlabelled images: the training images outside the labelled subset, the layout's
  unlabelled folder (the synthetic set's `ISIC-2017_Unlabeled_Data`, when present), and the
  images under `unlabelled_path` (config field `uda.unlabelled_path`).

  Validation and test images never enter it: an extra image whose prepared bytes or decoded
  picture equal those of a validation or test image (in any encoding: `_check_not_held_out`), or
  whose name holds the ISIC id of one, is an error that names it.

  Returns:
    The pool as a split named 'unlabelled' (labels -1), in a stable order.
  """
  rest = np.setdiff1d(np.arange(len(train)), np.asarray(labelled_positions, np.int64))
  names = [f"train/{train.image_ids[i]}" for i in rest]
  encoded = [train.encoded[i] for i in rest]
  items, stable_names = [], []

  def add_folder(folder, label: str) -> None:
    found = sources.folder_items(str(folder))
    items.extend(found)
    # Relative to the folder, so that moving the data is not a change of the dataset.
    stable_names.extend(f"{label}/{name[len(str(folder)):].lstrip('/')}" for name, _ in found)

  if data_cfg.source in ("synthetic", "isic"):
    from pirl_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    folder = isic_root(data_cfg) / synthetic.UNLABELED_DIR
    if folder.is_dir():
      add_folder(folder, synthetic.UNLABELED_DIR)
  if unlabelled_path:
    folder = storage.path(paths.user_path(unlabelled_path), absolute=False)
    if not folder.is_dir():
      raise errors.MissingDataError(
          f"Unlabelled image folder does not exist: {folder} (config field uda.unlabelled_path)."
      )
    before = len(items)
    add_folder(folder, "unlabelled_path")
    if len(items) == before:
      raise errors.DataSourceError(
          f"No jpg/png images under {folder} (config field uda.unlabelled_path)."
      )
  skipped = []
  if items:
    prepared = images_lib.prepare_cached(
        items, data_cfg, f"unlabelled:{unlabelled_path}", data_cfg.on_bad_image
    )
    _check_not_held_out([items[i][0] for i in prepared.kept], prepared.encoded, held_out)
    names += [stable_names[i] for i in prepared.kept]
    encoded += list(prepared.encoded)
    skipped = list(prepared.skipped)
  if not encoded:
    raise errors.DataSourceError(
        "UDA has no unlabelled images: every training image is in the labelled subset "
        "(config.label_fraction=1) and there is no unlabelled folder; set "
        "config.uda.unlabelled_path or a smaller label_fraction."
    )
  n = len(encoded)
  zeros = np.zeros(n, np.int32)
  return LabelledSplit(
      split="unlabelled",
      image_ids=names,
      melanoma=zeros,
      seborrheic_keratosis=zeros,
      label=np.full(n, -1, np.int32),
      encoded=encoded,
      csv_path=None,
      source="unlabelled pool",
      skipped=skipped,
  )


# Root-mean-square difference of two thumbnails (grey levels) below which two images are the same
# picture. The same picture in another encoding, prepared again (downscaled and re-encoded), moved
# by at most 4.1 levels at 48 px and 1.9 at 128 px (20 PNG copies of test images); distinct images
# of the embedded set are at least 10 levels apart.
SAME_PICTURE_RMS = 6.0


def _check_not_held_out(
    names: Sequence[str], encoded: Sequence[bytes], held_out: Sequence[LabelledSplit]
) -> None:
  """Refuses unlabelled images that are held-out images: the same bytes, the same decoded
  picture in another encoding (e.g. a lossless PNG of a test JPEG), or a held-out ISIC id in
  the name."""
  owners, by_digest, by_id, thumbs = [], {}, {}, []
  for split in held_out:
    for image_id, data in zip(split.image_ids, split.encoded):
      by_digest[hashlib.sha1(data).digest()] = (split.split, image_id)
      by_id[image_id] = (split.split, image_id)
      owners.append((split.split, image_id))
      thumbs.append(images_lib.thumbnail(data, f"{split.split}/{image_id}").reshape(-1))
  held = np.stack(thumbs) if thumbs else np.zeros((0, 3 * images_lib.THUMBNAIL_SIDE**2))
  held_sq = (held**2).sum(1)
  found = []
  for name, data in zip(names, encoded):
    hit = by_digest.get(hashlib.sha1(data).digest())
    if hit is None:
      ids = re.findall(r"ISIC_\d{7}", pathlib.PurePath(name).name)
      hit = next((by_id[i] for i in ids if i in by_id), None)
    if hit is None and len(held):
      thumb = images_lib.thumbnail(data, name).reshape(-1)
      mean_sq = (held_sq - 2.0 * held @ thumb + (thumb**2).sum()) / thumb.size
      nearest = int(np.argmin(mean_sq))
      if mean_sq[nearest] < SAME_PICTURE_RMS**2:
        hit = owners[nearest]
    if hit is not None:
      found.append(f"{name} (the {hit[0]} image {hit[1]})")
  if found:
    raise errors.DataSourceError(
        f"{len(found)} unlabelled image(s) are validation or test images; consistency training "
        f"on them would leak the held-out splits into training:{user_errors.listing(found)}\n"
        "Remove them from the unlabelled folder (config field uda.unlabelled_path)."
    )


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A seeded, stratified subset of example positions, sorted.

  Each class keeps `round(fraction * count)` of its examples (at least one), drawn by a
  permutation seeded with (seed, class): the same seed always gives the same subset, and for one
  seed a smaller fraction is contained in a larger one.

  Args:
    labels: int class per example.
    fraction: in (0, 1]; 1 keeps everything.
    seed: the run seed.

  Returns:
    int64 positions into `labels`, ascending.
  """
  if not 0.0 < fraction <= 1.0:
    raise errors.ConfigFieldError(f"config.label_fraction={fraction!r} must be in (0, 1].")
  labels = np.asarray(labels)
  keep = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = min(len(members), max(1, int(round(fraction * len(members)))))
    order = np.random.default_rng([seed, _SUBSET_SALT, int(c)]).permutation(len(members))
    keep.append(members[order[:n]])
  return np.sort(np.concatenate(keep)).astype(np.int64)


def class_weights(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """Inverse-frequency weights N / (C * n_c), so each class carries the same total weight.

  A class absent from `labels` gets weight 0 (it contributes no examples anyway).
  """
  counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
  present = counts > 0
  weights = np.zeros(num_classes, np.float64)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights.astype(np.float32)


def summarize(split: LabelledSplit, positions: Sequence[int] | None = None) -> str:
  """'N images (mel a / SK b / nevus c)' for logs."""
  labels = split.label if positions is None else split.label[np.asarray(positions)]
  mel, sk, nev = np.bincount(labels, minlength=NUM_CLASSES)
  return f"{len(labels)} images (melanoma {mel} / seborrheic keratosis {sk} / nevus {nev})"
