"""Fine-tuning's views of a labelled image, in TensorFlow for tf.data: the augmented training
view (random resized crop, flips, rotations, colour jitter; stateless, keyed by seed, epoch,
index and slot), UDA's strong view (RandAugment + cutout) and the deterministic eval view
(short side resized, centre crop).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from pirl_jax.data import augment
from pirl_jax.data import errors
from pirl_jax.data import randaugment

_UNLABELLED_SALT = 0x0DA0


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
    for name, length in (
        ("crop_scale", 2),
        ("crop_ratio", 2),
        ("color_jitter", 4),
        ("mean", 3),
        ("std", 3),
    ):
      value = getattr(self, name)
      try:
        value = tuple(float(v) for v in value)
      except (TypeError, ValueError):
        value = ()
      if len(value) != length:
        raise errors.ConfigFieldError(
            f"config.augment.{name}={getattr(self, name)!r}: expected {length} numbers."
        )
      object.__setattr__(self, name, value)
    checks = [
        ("image_size", self.image_size >= 1, "must be a positive integer"),
        (
            "crop_scale",
            0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
            "need 0 < min <= max <= 1",
        ),
        ("crop_ratio", 0.0 < self.crop_ratio[0] <= self.crop_ratio[1], "need 0 < min <= max"),
        ("rotation_degrees", 0.0 <= self.rotation_degrees <= 180.0, "must be in [0, 180]"),
        ("eval_crop_fraction", 0.0 < self.eval_crop_fraction <= 1.0, "must be in (0, 1]"),
        (
            "color_jitter",
            not augment.color_jitter_problem(self.color_jitter),
            augment.color_jitter_problem(self.color_jitter),
        ),
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
    raise errors.ConfigFieldError(
        f"Unknown field(s) augment.{', augment.'.join(unknown)}; "
        f"valid: {', '.join(sorted(fields))}."
    )
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
    return cls(
        num_ops=int(uda_cfg.randaugment_num_ops),
        magnitude=float(uda_cfg.randaugment_magnitude),
        prob=float(uda_cfg.randaugment_prob),
        cutout_fraction=float(uda_cfg.cutout_fraction),
    )


def augmented_image(image_bytes, key, cfg: AugmentConfig) -> tf.Tensor:
  """The training augmentation of one image from its stateless `key`, before normalisation.

  Returns:
    float32 (S, S, 3) in [0, 1].
  """
  crop_s, rot90_s, angle_s, hflip_s, vflip_s, color_s = augment.split_seed(key, 6)
  image = augment.random_resized_crop(
      augment.decode(image_bytes), crop_s, cfg.image_size, cfg.crop_scale, cfg.crop_ratio
  )
  if cfg.rot90:
    image = augment.random_rot90(image, rot90_s)
  if cfg.rotation_degrees > 0:
    image = augment.random_rotation(image, angle_s, cfg.rotation_degrees)
  if cfg.hflip:
    image = augment.random_flip(image, hflip_s, axis=1)
  if cfg.vflip:
    image = augment.random_flip(image, vflip_s, axis=0)
  if any(cfg.color_jitter):
    image = augment.color_augment(
        image, color_s, color_jitter=cfg.color_jitter, grayscale_prob=0.0, flip_prob=0.0
    )
  return image


def _normalized(image, cfg: AugmentConfig) -> tf.Tensor:
  image = augment.normalize(image, cfg.mean, cfg.std)
  return tf.ensure_shape(image, [cfg.image_size, cfg.image_size, 3])


def train_example(
    image_bytes, label, index, slot, seed, epoch, cfg: AugmentConfig
) -> dict[str, tf.Tensor]:
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


def unlabelled_example(
    image_bytes, index, slot, seed, epoch, cfg: AugmentConfig, strong: StrongAugmentConfig
) -> dict[str, tf.Tensor]:
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
      clean,
      strong_key,
      num_ops=strong.num_ops,
      magnitude=strong.magnitude,
      prob=strong.prob,
      cutout_fraction=strong.cutout_fraction,
      cutout_fill=cfg.mean,
  )
  return {
      "unlabelled": _normalized(clean, cfg),
      "unlabelled_strong": _normalized(strong_image, cfg),
  }


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
