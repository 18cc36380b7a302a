"""The labelled ISIC 2017 Part 3 data for evaluation: splits, label subsets, tf.data pipelines.

Sources (config field `data.source`): the embedded synthetic set ('synthetic'), the user's ISIC 2017
files under `data.path` ('isic', read with `pirl_jax.data.isic`), or the `isic2017` tfds builder
prepared in `data.tfds_data_dir` ('tfds'). Every image is decoded once, converted to RGB,
downscaled and re-encoded as a clean JPEG held in memory (cached on disk), as for pretraining.

Training examples are augmented (`augment`) with a random resized crop, flips, rotations and
colour jitter, all drawn from stateless ops keyed by (seed, epoch, index, slot), so a run is
reproducible on any number of processes. Evaluation resizes the short side and takes the centre
crop, deterministically. Labels: 0 melanoma, 1 seborrheic keratosis, 2 nevus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import re
from typing import Callable, Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.data import augment
from pirl_jax.data import errors
from pirl_jax.data import images as images_lib
from pirl_jax.data import isic
from pirl_jax.data import paths
from pirl_jax.data import randaugment
from pirl_jax.data import sources

NUM_CLASSES = 3
SPLITS = ("train", "validation", "test")
# Arbitrary salt: the subset draw must not coincide with any other stream derived from the seed.
_SUBSET_SALT = 0x1ABE1
_SAMPLING_SALT = 0x5A3B1E
_UNLABELLED_SALT = 0x0DA0


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


def _prepare(items, data_cfg, on_bad: str, what: str) -> images_lib.PreparedImages:
  key = hashlib.sha1(repr((what, [n for n, _ in items], data_cfg.min_image_side,
                           data_cfg.max_image_side)).encode()).hexdigest()[:16]
  return images_lib.prepare_all(
      items, min_side=data_cfg.min_image_side, max_side=data_cfg.max_image_side, on_bad=on_bad,
      cache_path=paths.cache_root(data_cfg.cache_dir) / "prepared" / f"{key}.npz")


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
  prepared = _prepare(raw.items(), data_cfg, on_bad, f"isic-{split}:{root}")
  keep = np.asarray(prepared.kept, dtype=np.int64)
  return LabelledSplit(
      split=split, image_ids=[raw.image_ids[i] for i in keep],
      melanoma=raw.melanoma[keep].astype(np.int32),
      seborrheic_keratosis=raw.seborrheic_keratosis[keep].astype(np.int32),
      label=raw.label[keep].astype(np.int32), encoded=list(prepared.encoded),
      csv_path=str(raw.csv_path), source=f"{data_cfg.source}:{root}",
      skipped=list(prepared.skipped))


def _load_tfds(data_cfg, split: str, on_bad: str) -> LabelledSplit:
  import tensorflow_datasets as tfds
  from pirl_jax.data import tfds_isic2017  # pylint: disable=unused-import  (registers isic2017)
  data_dir = paths.user_path(data_cfg.tfds_data_dir) or None
  try:
    ds = tfds.load(data_cfg.tfds_name, split=split, data_dir=data_dir, shuffle_files=False,
                   download=False, decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # tfds raises several types for "not prepared" / "unknown split".
    raise errors.DataSourceError(
        f"tfds dataset {data_cfg.tfds_name!r} split {split!r} is not available in "
        f"data_dir={data_dir!r} (config fields data.tfds_name / data.tfds_data_dir). Prepare it "
        f"first (see pirl_jax/data/tfds_isic2017.py); nothing is downloaded at run time. ({e})"
    ) from e
  rows = sorted(((ex["image_id"].decode(), ex["image"], int(ex["melanoma"]),
                  int(ex["seborrheic_keratosis"]), int(ex["label"]))
                 for ex in tfds.as_numpy(ds)), key=lambda r: r[0])
  name = f"tfds:{data_cfg.tfds_name}/{split}"
  items = [(f"{name}:{r[0]}", (lambda b=r[1]: b)) for r in rows]
  prepared = _prepare(items, data_cfg, on_bad, name)
  keep = np.asarray(prepared.kept, dtype=np.int64)
  rows = [rows[i] for i in keep]
  return LabelledSplit(
      split=split, image_ids=[r[0] for r in rows],
      melanoma=np.array([r[2] for r in rows], np.int32),
      seborrheic_keratosis=np.array([r[3] for r in rows], np.int32),
      label=np.array([r[4] for r in rows], np.int32), encoded=list(prepared.encoded),
      csv_path=None, source=name, skipped=list(prepared.skipped))


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
    raise errors.ConfigFieldError(f"data.source={data_cfg.source!r} is not one of synthetic, "
                                  "isic, tfds.")
  if not len(out):
    raise errors.DataSourceError(f"The {split} split of {out.source} has no usable images.")
  logging.info("%s split from %s: %s.", split, out.source, summarize(out))
  return out


def unlabelled_pool(data_cfg, unlabelled_path: str, train: LabelledSplit,
                    labelled_positions: np.ndarray,
                    held_out: Sequence[LabelledSplit]) -> LabelledSplit:
  """UDA's unlabelled images: the training images outside the labelled subset, the layout's
  unlabelled folder (the synthetic set's `ISIC-2017_Unlabeled_Data`, when present), and the
  images under `unlabelled_path` (config field `uda.unlabelled_path`).

  Validation and test images never enter it: an extra image whose prepared bytes equal those of
  a validation or test image, or whose name holds the ISIC id of one, is an error that names it.

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
          f"Unlabelled image folder does not exist: {folder} (config field uda.unlabelled_path).")
    before = len(items)
    add_folder(folder, "unlabelled_path")
    if len(items) == before:
      raise errors.DataSourceError(
          f"No jpg/png images under {folder} (config field uda.unlabelled_path).")
  skipped = []
  if items:
    prepared = _prepare(items, data_cfg, data_cfg.on_bad_image,
                        f"unlabelled:{unlabelled_path}")
    _check_not_held_out([items[i][0] for i in prepared.kept], prepared.encoded, held_out)
    names += [stable_names[i] for i in prepared.kept]
    encoded += list(prepared.encoded)
    skipped = list(prepared.skipped)
  if not encoded:
    raise errors.DataSourceError(
        "UDA has no unlabelled images: every training image is in the labelled subset "
        "(config.label_fraction=1) and there is no unlabelled folder; set "
        "config.uda.unlabelled_path or a smaller label_fraction.")
  n = len(encoded)
  zeros = np.zeros(n, np.int32)
  return LabelledSplit(split="unlabelled", image_ids=names, melanoma=zeros,
                       seborrheic_keratosis=zeros, label=np.full(n, -1, np.int32),
                       encoded=encoded, csv_path=None, source="unlabelled pool",
                       skipped=skipped)


def _check_not_held_out(names: Sequence[str], encoded: Sequence[bytes],
                        held_out: Sequence[LabelledSplit]) -> None:
  by_digest, by_id = {}, {}
  for split in held_out:
    for image_id, data in zip(split.image_ids, split.encoded):
      by_digest[hashlib.sha1(data).digest()] = (split.split, image_id)
      by_id[image_id] = (split.split, image_id)
  found = []
  for name, data in zip(names, encoded):
    hit = by_digest.get(hashlib.sha1(data).digest())
    if hit is None:
      ids = re.findall(r"ISIC_\d{7}", pathlib.PurePath(name).name)
      hit = next((by_id[i] for i in ids if i in by_id), None)
    if hit is not None:
      found.append(f"{name} (the {hit[0]} image {hit[1]})")
  if found:
    raise errors.DataSourceError(
        f"{len(found)} unlabelled image(s) are validation or test images; consistency training "
        f"on them would leak the held-out splits into training:{user_errors.listing(found)}\n"
        "Remove them from the unlabelled folder (config field uda.unlabelled_path).")


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


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Train-time augmentation and the eval-time resize/crop (config block `augment`).

  Attributes:
    image_size: side S of the network input.
    crop_scale: (min, max) area fraction of the random resized crop.
    crop_ratio: (min, max) aspect ratio of the crop.
    hflip: random horizontal flips.
    vflip: random vertical flips.
    rot90: random rotations by multiples of 90 degrees.
    rotation_degrees: an extra rotation uniform in [-r, r] (reflect padding); 0 disables it.
    color_jitter: (brightness, contrast, saturation, hue) as torchvision's ColorJitter.
    eval_crop_fraction: eval resizes the short side to S / fraction and takes the centre S x S.
    mean: per-channel mean subtracted (the pretraining normalisation).
    std: per-channel standard deviation divided by.
  """
  image_size: int = 224
  crop_scale: tuple[float, float] = (0.25, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = True
  vflip: bool = True
  rot90: bool = True
  rotation_degrees: float = 0.0
  color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.02)
  eval_crop_fraction: float = 0.875
  mean: tuple[float, float, float] = augment.IMAGENET_MEAN
  std: tuple[float, float, float] = augment.IMAGENET_STD

  def __post_init__(self):
    for name, length in (("crop_scale", 2), ("crop_ratio", 2), ("color_jitter", 4), ("mean", 3),
                         ("std", 3)):
      value = getattr(self, name)
      try:
        value = tuple(float(v) for v in value)
      except (TypeError, ValueError):
        value = ()
      if len(value) != length:
        raise errors.ConfigFieldError(
            f"config.augment.{name}={getattr(self, name)!r}: expected {length} numbers.")
      object.__setattr__(self, name, value)
    checks = [
        ("image_size", self.image_size >= 1, "must be a positive integer"),
        ("crop_scale", 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
         "need 0 < min <= max <= 1"),
        ("crop_ratio", 0.0 < self.crop_ratio[0] <= self.crop_ratio[1], "need 0 < min <= max"),
        ("rotation_degrees", 0.0 <= self.rotation_degrees <= 180.0, "must be in [0, 180]"),
        ("eval_crop_fraction", 0.0 < self.eval_crop_fraction <= 1.0, "must be in (0, 1]"),
        ("color_jitter", not augment.color_jitter_problem(self.color_jitter),
         augment.color_jitter_problem(self.color_jitter)),
        ("std", min(self.std) > 0.0, "all values must be > 0"),
    ]
    for name, ok, why in checks:
      if not ok:
        raise errors.ConfigFieldError(f"config.augment.{name}={getattr(self, name)!r}: {why}.")


def augment_config(augment_cfg, image_size: int | None = None) -> AugmentConfig:
  """AugmentConfig from the `augment` config block (unknown fields are an error)."""
  fields = {f.name for f in dataclasses.fields(AugmentConfig)}
  values = augment_cfg.to_dict() if hasattr(augment_cfg, "to_dict") else dict(augment_cfg)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise errors.ConfigFieldError(f"Unknown field(s) augment.{', augment.'.join(unknown)}; "
                                  f"valid: {', '.join(sorted(fields))}.")
  if image_size is not None:
    values["image_size"] = image_size
  return AugmentConfig(**values)


@dataclasses.dataclass(frozen=True)
class StrongAugmentConfig:
  """UDA's strong augmentation (config block `uda`): RandAugment, then cutout.

  Attributes:
    num_ops: N, operations drawn per image (`uda.randaugment_num_ops`).
    magnitude: M in [0, 10], or -1 for a level drawn from 1..9 per operation
      (`uda.randaugment_magnitude`).
    prob: the probability each drawn operation is applied (`uda.randaugment_prob`).
    cutout_fraction: side of the cutout square as a fraction of the image side
      (`uda.cutout_fraction`; 0 = none).
  """
  num_ops: int = 2
  magnitude: float = -1.0
  prob: float = 0.5
  cutout_fraction: float = 0.5

  @classmethod
  def from_config(cls, uda_cfg) -> "StrongAugmentConfig":
    return cls(num_ops=int(uda_cfg.randaugment_num_ops),
               magnitude=float(uda_cfg.randaugment_magnitude),
               prob=float(uda_cfg.randaugment_prob),
               cutout_fraction=float(uda_cfg.cutout_fraction))


def augmented_image(image_bytes, key, cfg: AugmentConfig) -> tf.Tensor:
  """The training augmentation of one image from its stateless `key`, before normalisation.

  Returns:
    float32 (S, S, 3) in [0, 1].
  """
  crop_s, rot90_s, angle_s, hflip_s, vflip_s, color_s = augment.split_seed(key, 6)
  image = augment.random_resized_crop(augment.decode(image_bytes), crop_s, cfg.image_size,
                                      cfg.crop_scale, cfg.crop_ratio)
  if cfg.rot90:
    image = augment.random_rot90(image, rot90_s)
  if cfg.rotation_degrees > 0:
    image = augment.random_rotation(image, angle_s, cfg.rotation_degrees)
  if cfg.hflip:
    image = augment.random_flip(image, hflip_s, axis=1)
  if cfg.vflip:
    image = augment.random_flip(image, vflip_s, axis=0)
  if any(cfg.color_jitter):
    image = augment.color_augment(image, color_s, color_jitter=cfg.color_jitter,
                                  grayscale_prob=0.0, flip_prob=0.0)
  return image


def _normalized(image, cfg: AugmentConfig) -> tf.Tensor:
  image = augment.normalize(image, cfg.mean, cfg.std)
  return tf.ensure_shape(image, [cfg.image_size, cfg.image_size, 3])


def train_example(image_bytes, label, index, slot, seed, epoch,
                  cfg: AugmentConfig) -> dict[str, tf.Tensor]:
  """One augmented training example, for `tf.data.Dataset.map`.

  Args:
    image_bytes: scalar string tensor, a JPEG.
    label: int class.
    index: the example's stable position in the training split.
    slot: its position in the epoch's order (distinguishes repeats of one image in an epoch).
    seed: the run seed.
    epoch: the epoch.
    cfg: augmentation settings.

  Returns:
    {'image': float32 (S, S, 3) normalised, 'label': int32, 'index': int32}.
  """
  key = augment.example_seed(seed, epoch, index)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(slot, tf.int64))
  image = _normalized(augmented_image(image_bytes, key, cfg), cfg)
  return {"image": image, "label": tf.cast(label, tf.int32), "index": tf.cast(index, tf.int32)}


def unlabelled_example(image_bytes, index, slot, seed, epoch, cfg: AugmentConfig,
                       strong: StrongAugmentConfig) -> dict[str, tf.Tensor]:
  """The clean and the strong view of one unlabelled image, for UDA.

  The clean view is the training augmentation (`augmented_image`); the strong view is that same
  image (same crop, flips, rotation and colours) after RandAugment and cutout, so that the two
  differ only by the strong augmentation. Keyed by (seed, epoch, index, slot) under a salt of its
  own: an unlabelled image never shares its randomness with a labelled example.

  Returns:
    {'unlabelled': float32 (S, S, 3), 'unlabelled_strong': float32 (S, S, 3)}, normalised.
  """
  key = augment.example_seed(seed, epoch, index)
  key = tf.random.experimental.stateless_fold_in(key, tf.constant(_UNLABELLED_SALT, tf.int64))
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(slot, tf.int64))
  view_key, strong_key = augment.split_seed(key, 2)
  clean = augmented_image(image_bytes, view_key, cfg)
  strong_image = randaugment.strong_augment(
      clean, strong_key, num_ops=strong.num_ops, magnitude=strong.magnitude, prob=strong.prob,
      cutout_fraction=strong.cutout_fraction, cutout_fill=cfg.mean)
  return {"unlabelled": _normalized(clean, cfg),
          "unlabelled_strong": _normalized(strong_image, cfg)}


def eval_image(image_bytes, cfg: AugmentConfig) -> tf.Tensor:
  """The deterministic eval view: short side resized to S / eval_crop_fraction, centre S x S crop.

  Returns:
    float32 (S, S, 3), normalised.
  """
  image = augment.decode(image_bytes)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  size = cfg.image_size
  short = tf.cast(tf.round(size / cfg.eval_crop_fraction), tf.float32)
  scale = short / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new_hw, method="bilinear", antialias=True) * (1.0 / 255.0)
  top = (new_hw[0] - size) // 2
  left = (new_hw[1] - size) // 2
  image = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
  return tf.ensure_shape(augment.normalize(image, cfg.mean, cfg.std), [size, size, 3])


def _num_parallel(value: int):
  return tf.data.AUTOTUNE if value < 0 else value


class TrainInput:
  """This process's share of the augmented training batches, from any step.

  The global order is a pure function of (seed, epoch): an epoch has ceil(N / B) steps and
  visits every example once in a seeded permutation (topped up from a second permutation to fill
  the last batch), or, with `balanced=True`, draws examples with replacement with probability
  inversely proportional to their class frequency. Process p keeps its contiguous slice of each
  global batch.
  """

  def __init__(self, split: LabelledSplit, positions: np.ndarray, cfg: AugmentConfig, *,
               seed: int, global_batch_size: int, balanced: bool = False,
               process_index: int = 0, process_count: int = 1, num_parallel_calls: int = -1,
               prefetch_batches: int = 2):
    if global_batch_size % process_count:
      raise errors.ConfigFieldError(f"global_batch_size={global_batch_size} is not divisible by "
                                    f"the process count {process_count}.")
    self.positions = np.asarray(positions, np.int64)
    if not len(self.positions):
      raise errors.DataSourceError("The training subset is empty.")
    self.labels = split.label
    self.cfg = cfg
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.balanced = balanced
    self.process_index = process_index
    self.num_parallel_calls = _num_parallel(num_parallel_calls)
    self.prefetch_batches = prefetch_batches
    self.num_examples = len(self.positions)
    self.steps_per_epoch = max(1, math.ceil(self.num_examples / global_batch_size))
    self._encoded = tf.constant(split.encoded, dtype=tf.string)
    self._label_table = tf.constant(split.label, dtype=tf.int32)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Training-split positions of the global batches of `epoch`, shape (steps, global_batch)."""
    rng = np.random.default_rng([self.seed, _SAMPLING_SALT, epoch])
    total = self.steps_per_epoch * self.global_batch_size
    if self.balanced:
      weights = class_weights(self.labels[self.positions])[self.labels[self.positions]]
      order = rng.choice(self.positions, size=total, replace=True, p=weights / weights.sum())
    else:
      rounds = math.ceil(total / self.num_examples)
      order = np.concatenate([self.positions[rng.permutation(self.num_examples)]
                              for _ in range(rounds)])[:total]
    return order.reshape(self.steps_per_epoch, self.global_batch_size)

  def _example_fn(self, epoch: int):
    encoded, labels, cfg, seed = self._encoded, self._label_table, self.cfg, self.seed

    def fn(i, s):
      return train_example(tf.gather(encoded, i), tf.gather(labels, i), i, s, seed, epoch, cfg)
    return fn

  def epoch_dataset(self, epoch: int, first_step: int = 0) -> tf.data.Dataset:
    order = self.epoch_order(epoch)
    slots = np.arange(order.size, dtype=np.int64).reshape(order.shape)
    start = self.process_index * self.local_batch_size
    stop = start + self.local_batch_size
    index = order[first_step:, start:stop].reshape(-1)
    slot = slots[first_step:, start:stop].reshape(-1)
    ds = tf.data.Dataset.from_tensor_slices((index, slot))
    ds = ds.map(self._example_fn(epoch), num_parallel_calls=self.num_parallel_calls,
                deterministic=True)
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    return ds.prefetch(self.prefetch_batches)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches for global steps start_step, start_step + 1, ... (endless)."""
    epoch, first = divmod(start_step, self.steps_per_epoch)
    while True:
      yield from self.epoch_dataset(epoch, first).as_numpy_iterator()
      epoch, first = epoch + 1, 0


class UnlabelledInput(TrainInput):
  """This process's share of UDA's unlabelled batches (clean and strong views), from any step.

  The order follows `TrainInput`'s rule over the pool (every image once per epoch of the pool,
  a seeded permutation), under the run seed, so it is a pure function of (seed, step) as well.
  """

  def __init__(self, pool: LabelledSplit, cfg: AugmentConfig, strong: StrongAugmentConfig, *,
               seed: int, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, num_parallel_calls: int = -1, prefetch_batches: int = 2):
    super().__init__(pool, np.arange(len(pool)), cfg, seed=seed,
                     global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count, num_parallel_calls=num_parallel_calls,
                     prefetch_batches=prefetch_batches)
    self.strong = strong

  def _example_fn(self, epoch: int):
    encoded, cfg, strong, seed = self._encoded, self.cfg, self.strong, self.seed

    def fn(i, s):
      return unlabelled_example(tf.gather(encoded, i), i, s, seed, epoch, cfg, strong)
    return fn


class EvalInput:
  """Every image of a split once, in order, as padded global batches with a validity mask."""

  def __init__(self, split: LabelledSplit, cfg: AugmentConfig, *, global_batch_size: int,
               process_index: int = 0, process_count: int = 1, num_parallel_calls: int = -1,
               tiles: Callable[[tf.Tensor], tf.Tensor] | None = None):
    """`tiles`: if given, each example also has 'tiles', this function of the decoded image."""
    if global_batch_size % process_count:
      raise errors.ConfigFieldError(f"eval_batch_size={global_batch_size} is not divisible by "
                                    f"the process count {process_count}.")
    self.split = split
    self.cfg = cfg
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.num_parallel_calls = _num_parallel(num_parallel_calls)
    self.num_examples = len(split)
    self.num_batches = math.ceil(self.num_examples / global_batch_size)
    n, b = self.num_examples, global_batch_size
    padded = self.num_batches * b
    index = np.concatenate([np.arange(n), np.zeros(padded - n, np.int64)]).reshape(-1, b)
    mask = (np.arange(padded) < n).astype(np.float32).reshape(-1, b)
    start = process_index * self.local_batch_size
    stop = start + self.local_batch_size
    index, mask = index[:, start:stop].reshape(-1), mask[:, start:stop].reshape(-1)
    encoded = tf.constant(split.encoded, dtype=tf.string)
    labels = split.label.astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((index, labels[index], mask))
    def example(i, y, m):
      image_bytes = tf.gather(encoded, i)
      out = {"image": eval_image(image_bytes, cfg), "label": y, "mask": m}
      if tiles is not None:
        out["tiles"] = tiles(augment.decode(image_bytes))
      return out
    ds = ds.map(example, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    # Built (and its map traced) once; every evaluation iterates it again.
    self._dataset = ds.batch(self.local_batch_size, drop_remainder=True).prefetch(2)

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global batch: {'image', 'label', 'mask'} (mask 0 = padding)."""
    yield from self._dataset.as_numpy_iterator()


def summarize(split: LabelledSplit, positions: Sequence[int] | None = None) -> str:
  """'N images (mel a / SK b / nevus c)' for logs."""
  labels = split.label if positions is None else split.label[np.asarray(positions)]
  mel, sk, nev = np.bincount(labels, minlength=NUM_CLASSES)
  return f"{len(labels)} images (melanoma {mel} / seborrheic keratosis {sk} / nevus {nev})"
