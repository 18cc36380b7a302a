"""Config validation and derived numbers, in one place.

Every error names the config field and the offending value, and is raised before any data is
prepared or anything compiled. Checks that need the device count or the dataset size are
separate functions, called as soon as those are known.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections

from pirl_jax import methods
from pirl_jax import user_errors

_PRETRAIN_CHOICES = {
    "mode": ("pretrain", "finetune"),
    "method": methods.METHODS,
    "data.source": ("synthetic", "isic", "folder", "tfds"),
    "data.on_bad_image": ("error", "skip"),
    "model.head": ("linear", "mlp"),
    "model.dtype": ("float32", "bfloat16"),
    "model.bn_running_stats": ("images", "tiles_and_images"),
    "model.batch_norm": ("global", "per_device"),
    "loss.kind": ("nce", "infonce"),
    "loss.nce_z_from": ("both", "jigsaw"),
    "optim.name": ("sgd", "lars"),
    "resume": ("auto", "never", "force"),
}
_FINETUNE_CHOICES = {
    "mode": ("finetune",),
    "protocol": ("finetune", "linear"),
    "init.kind": ("", "scratch", "pirl", "checkpoint", "weights"),
    "data.source": ("synthetic", "isic", "tfds"),
    "data.on_bad_image": ("error", "skip"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.class_balance": ("weighted", "sampling", "none"),
    "resume": ("auto", "never", "force"),
    "uda.tsa": ("none", "linear", "log", "exp"),
}


class ConfigError(user_errors.UserError, ValueError):
  """A config value that cannot work; the message names the field."""


def get_field(config, dotted: str):
  """The value of `config.<dotted>`, e.g. get_field(config, "optim.momentum")."""
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def field_names(config, prefix: str = "") -> list[str]:
  """Every dotted field of `config` ('loss.num_negatives', ...)."""
  names = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      names += field_names(value, name + ".")
    else:
      names.append(name)
  return names


def unknown_field_message(config, dotted: str) -> str:
  """'config.<dotted> is not a field of this config' with the closest field names."""
  names = field_names(config)
  close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.6)
  if not close:  # a typo in the last part only: compare the leaves
    leaf = dotted.rsplit(".", 1)[-1]
    leaves = {n.rsplit(".", 1)[-1]: n for n in names}
    close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6)]
  hint = (
      f" Did you mean {' or '.join('config.' + c for c in close)}?"
      if close
      else " Its fields are listed, one comment each, in the config file."
  )
  return f"config.{dotted} is not a field of this config.{hint}"


def _check_choices(config, choices: dict) -> None:
  for field, allowed in choices.items():
    try:
      value = get_field(config, field)
    except (KeyError, AttributeError):
      continue
    if value not in allowed:
      raise ConfigError(
          f"config.{field}={value!r} is not one of " f"{', '.join(repr(c) for c in allowed)}."
      )


def _run_checks(config, checks) -> None:
  for field, ok, why in checks:
    if not ok:
      raise ConfigError(f"config.{field}={get_field(config, field)!r} {why}.")


def _finite(x) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def _data_checks(data) -> list:
  return [
      ("data.min_image_side", data.min_image_side >= 1, "must be a positive number of pixels"),
      ("data.max_image_side", data.max_image_side >= 1, "must be a positive number of pixels"),
      (
          "data.max_image_side",
          data.max_image_side >= data.min_image_side,
          f"must be >= data.min_image_side={data.min_image_side}",
      ),
      (
          "data.num_parallel_calls",
          data.num_parallel_calls == -1 or data.num_parallel_calls >= 1,
          "must be -1 (tf.data.AUTOTUNE) or a positive number of threads",
      ),
      ("data.prefetch_batches", data.prefetch_batches >= 0, "must be >= 0"),
  ]


def _common_checks(config) -> list:
  return [
      ("seed", isinstance(config.seed, int) and config.seed >= 0, "must be an integer >= 0"),
      ("global_batch_size", config.global_batch_size > 0, "must be positive"),
      (
          "num_epochs",
          config.num_epochs > 0 or config.num_train_steps > 0,
          "must be positive (or set num_train_steps)",
      ),
      ("log_every_steps", config.log_every_steps >= 1, "must be >= 1"),
      ("num_devices", config.get("num_devices", 0) >= 0, "must be >= 0 (0 = all devices)"),
  ]


def _probe_checks(probe) -> list:
  return [
      ("probe.knn_k", probe.knn_k >= 1, "must be >= 1"),
      (
          "probe.knn_temperature",
          _finite(probe.knn_temperature) and probe.knn_temperature > 0,
          "must be a positive number",
      ),
      (
          "probe.linear_regularization",
          _finite(probe.linear_regularization) and probe.linear_regularization > 0,
          "must be a positive number",
      ),
      ("probe.batch_size", probe.batch_size >= 1, "must be >= 1"),
      (
          "probe.image_size",
          probe.image_size >= 0,
          "must be a size in pixels, or 0 for data.views.image_size",
      ),
      (
          "probe.eval_crop_fraction",
          _finite(probe.eval_crop_fraction) and 0.0 < probe.eval_crop_fraction <= 1.0,
          "must be in (0, 1] (1: the whole image, resized)",
      ),
      ("probe.query_fraction", 0.0 < probe.query_fraction < 1.0, "must be in (0, 1)"),
  ]


def _check_data_path(data) -> None:
  from pirl_jax.data import sources  # pylint: disable=g-import-not-at-top

  sources.check_path_field(data)


def validate_pretrain_config(config: ml_collections.ConfigDict) -> None:
  """Checks every pretraining field that needs neither the data nor the devices."""
  from pirl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pirl_jax.models import resnet  # pylint: disable=g-import-not-at-top

  _check_choices(config, _PRETRAIN_CHOICES)
  if config.model.trunk.lower() not in resnet.TRUNKS:
    raise ConfigError(
        f"config.model.trunk={config.model.trunk!r} is not one of "
        f"{', '.join(sorted(resnet.TRUNKS))}."
    )
  optim, loss = config.optim, config.loss
  _run_checks(
      config,
      _common_checks(config)
      + _data_checks(config.data)
      + [
          (
              "model.width_multiplier",
              _finite(config.model.width_multiplier)
              and config.model.width_multiplier > 0
              and round(resnet.ResNet.num_filters * config.model.width_multiplier) >= 1,
              f"must be a finite number with {resnet.ResNet.num_filters} * it >= 1 (the stem's width in "
              "channels)",
          ),
          ("model.embed_dim", config.model.embed_dim >= 1, "must be >= 1"),
          (
              "loss.temperature",
              _finite(loss.temperature) and loss.temperature > 0,
              "must be a positive number",
          ),
          ("loss.jigsaw_weight", 0.0 <= loss.jigsaw_weight <= 1.0, "must be in [0, 1]"),
          ("loss.num_negatives", loss.num_negatives >= 1, "must be at least 1"),
          ("loss.nce_z_ema", 0.0 <= loss.nce_z_ema < 1.0, "must be in [0, 1)"),
          ("loss.nce_eps", _finite(loss.nce_eps) and loss.nce_eps >= 0.0, "must be a number >= 0"),
          (
              "loss.nce_z_from",
              methods.transformed_view(config.method) is not None or loss.nce_z_from == "both",
              f"needs the transformed view's term, which config.method={config.method!r} does not "
              "have: use 'both'",
          ),
          (
              "model.bn_running_stats",
              config.method == "pirl" or config.model.bn_running_stats == "images",
              f"'tiles_and_images' applies to config.method='pirl' only (the method here is "
              f"{config.method!r}): use 'images'",
          ),
          (
              "data.views.grid",
              config.method not in methods.NEEDS_3X3_GRID or config.data.views.grid == 3,
              f"config.method={config.method!r} is defined on a 3x3 grid of tiles: use 3",
          ),
          (
              "jigsaw_permutations",
              2 <= config.jigsaw_permutations <= math.factorial(9),
              "must be in [2, 9! = 362880]",
          ),
          ("memory_bank.momentum", 0.0 <= config.memory_bank.momentum < 1.0, "must be in [0, 1)"),
          (
              "memory_bank.score_chunk_size",
              config.memory_bank.score_chunk_size >= 1,
              "must be >= 1",
          ),
          (
              "optim.base_learning_rate",
              _finite(optim.base_learning_rate) and optim.base_learning_rate > 0,
              "must be a positive number",
          ),
          ("optim.momentum", 0.0 <= optim.momentum < 1.0, "must be in [0, 1)"),
          (
              "optim.weight_decay",
              _finite(optim.weight_decay) and optim.weight_decay >= 0,
              "must be a number >= 0",
          ),
          (
              "optim.warmup_epochs",
              _finite(optim.warmup_epochs) and optim.warmup_epochs >= 0,
              "must be a number >= 0",
          ),
          (
              "optim.final_learning_rate_fraction",
              0.0 <= optim.final_learning_rate_fraction <= 1.0,
              "must be in [0, 1]",
          ),
          (
              "optim.lars_trust_coefficient",
              _finite(optim.lars_trust_coefficient) and optim.lars_trust_coefficient > 0,
              "must be a positive number",
          ),
          ("checkpoint_every_steps", config.checkpoint_every_steps >= 1, "must be >= 1"),
          ("keep_checkpoints", config.keep_checkpoints >= 1, "must be >= 1"),
          ("eval_every_steps", config.eval_every_steps >= 0, "must be >= 0 (0: at the end only)"),
          ("ema_decay", 0.0 <= config.ema_decay < 1.0, "must be in [0, 1) (0: no EMA)"),
          (
              "ema_decay",
              not methods.uses_key_queue(config.method) or config.ema_decay == 0.0,
              "moco_v2's EMA is its key encoder, set by config.moco.momentum: leave it 0",
          ),
          ("moco.momentum", 0.0 <= config.moco.momentum < 1.0, "must be in [0, 1)"),
          (
              "moco.temperature",
              _finite(config.moco.temperature) and config.moco.temperature > 0,
              "must be a positive number",
          ),
          (
              "moco.queue_size",
              not methods.uses_key_queue(config.method)
              or config.moco.queue_size >= config.global_batch_size,
              f"must be >= global_batch_size={config.global_batch_size} (each step enqueues "
              "a batch of keys)",
          ),
          (
              "simclr.temperature",
              _finite(config.simclr.temperature) and config.simclr.temperature > 0,
              "must be a positive number",
          ),
      ]
      + _probe_checks(config.probe),
  )
  try:
    pipeline.view_config(config.data.views)
  except ValueError as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("data.views.") else str(e)) from None
  _check_data_path(config.data)


def validate_finetune_config(config: ml_collections.ConfigDict) -> None:
  """Checks every fine-tuning field that needs neither the data nor the devices."""
  from pirl_jax.data import labelled_views  # pylint: disable=g-import-not-at-top

  _check_choices(config, _FINETUNE_CHOICES)
  optim = config.optim
  _run_checks(
      config,
      _common_checks(config)
      + _data_checks(config.data)
      + [
          ("label_fraction", 0.0 < config.label_fraction <= 1.0, "must be in (0, 1]"),
          ("eval_batch_size", config.eval_batch_size > 0, "must be positive"),
          (
              "optim.learning_rate",
              _finite(optim.learning_rate) and optim.learning_rate > 0,
              "must be a positive number",
          ),
          ("optim.momentum", 0.0 <= optim.momentum < 1.0, "must be in [0, 1)"),
          (
              "optim.weight_decay",
              _finite(optim.weight_decay) and optim.weight_decay >= 0,
              "must be a number >= 0",
          ),
          (
              "optim.lr_decay_at",
              all(0.0 < f < 1.0 for f in optim.lr_decay_at),
              "must be fractions of training in (0, 1)",
          ),
          (
              "optim.lr_decay_factor",
              _finite(optim.lr_decay_factor) and optim.lr_decay_factor > 0,
              "must be a positive number",
          ),
          ("min_train_steps", config.min_train_steps >= 0, "must be >= 0"),
          (
              "eval_every_epochs",
              config.eval_every_epochs > 0 or config.eval_every_steps > 0,
              "must be positive (or set eval_every_steps)",
          ),
          ("checkpoint_every_steps", config.checkpoint_every_steps >= 1, "must be >= 1"),
      ],
  )
  try:
    labelled_views.augment_config(config.augment)
  except ValueError as e:
    raise ConfigError(str(e) if str(e).startswith("config.") else f"config.{e}") from None
  if config.init.kind == "scratch" and config.init.checkpoint:
    raise ConfigError(
        f"config.init.kind='scratch' contradicts config.init.checkpoint="
        f"{config.init.checkpoint!r}; leave one of them empty."
    )
  if config.init.kind in ("pirl", "checkpoint", "weights") and not config.init.checkpoint:
    raise ConfigError(
        f"config.init.kind={config.init.kind!r} needs config.init.checkpoint (a PIRL "
        "pretraining workdir, a checkpoint folder or a .safetensors/.pth weights file)."
    )
  _check_data_path(config.data)
  if "uda" in config:
    _check_uda(config)


def _check_uda(config) -> None:
  from pirl_jax.data import randaugment  # pylint: disable=g-import-not-at-top

  uda = config.uda
  ratio = uda.unlabelled_ratio
  _run_checks(
      config,
      [
          ("uda.weight", _finite(uda.weight) and uda.weight >= 0, "must be a number >= 0"),
          (
              "uda.unlabelled_ratio",
              isinstance(ratio, int) and ratio >= 1,
              "must be an integer >= 1 (unlabelled images per labelled image in a batch)",
          ),
          (
              "uda.confidence_threshold",
              0.0 <= uda.confidence_threshold < 1.0,
              "must be in [0, 1) (0 = every unlabelled image counts)",
          ),
          (
              "uda.temperature",
              _finite(uda.temperature) and uda.temperature > 0,
              "must be > 0 (1 = no sharpening)",
          ),
      ],
  )
  problem = randaugment.config_problem(
      uda.randaugment_num_ops, uda.randaugment_magnitude, uda.randaugment_prob, uda.cutout_fraction
  )
  if problem:
    raise ConfigError(f"config.uda: {problem}")


def check_device_count(config, num_devices: int, fields=("global_batch_size",)) -> None:
  """Batch sizes must split evenly over the devices."""
  for field in fields:
    if get_field(config, field) % num_devices:
      raise ConfigError(
          f"config.{field}={get_field(config, field)!r} must be divisible by the "
          f"number of devices ({num_devices})."
      )


def select_devices(config: ml_collections.ConfigDict, devices: list, process_count: int) -> list:
  """The devices to train on: all of `devices`, or the first `config.num_devices` of them.

  Args:
    config: the run's config (its optional `num_devices`: 0 = all).
    devices: every device of every process, `jax.devices()`.
    process_count: `jax.process_count()`; a subset is only possible with one process.
  """
  n = config.get("num_devices", 0)
  if n == 0:
    return list(devices)
  if n < 0 or n > len(devices):
    raise ConfigError(
        f"config.num_devices={n} must be in [0, {len(devices)}] (0 = all "
        f"{len(devices)} devices)."
    )
  if process_count > 1 and n != len(devices):
    raise ConfigError(
        f"config.num_devices={n}: with {process_count} processes every device "
        f"takes part; use 0 (all {len(devices)})."
    )
  return list(devices)[:n]


def validate_dataset_size(config: ml_collections.ConfigDict, num_examples: int) -> None:
  """Checks the fields that depend on the number of pretraining images."""
  if num_examples < config.global_batch_size:
    raise ConfigError(
        f"The dataset has {num_examples} images, fewer than "
        f"config.global_batch_size={config.global_batch_size}."
    )
  limit = num_examples - 1 if config.loss.exclude_positive else num_examples
  if methods.uses_key_queue(config.method) and (
      config.moco.queue_size > num_examples - config.global_batch_size
  ):
    raise ConfigError(
        f"config.moco.queue_size={config.moco.queue_size} must be <= the dataset size "
        f"N={num_examples} - global_batch_size={config.global_batch_size} = "
        f"{num_examples - config.global_batch_size}: a longer queue holds keys of a query's own "
        "image from the epoch before, as negatives."
    )
  if methods.uses_bank(config.method) and config.loss.num_negatives > limit:
    raise ConfigError(
        f"config.loss.num_negatives={config.loss.num_negatives} must be < the dataset size "
        f"N={num_examples} (at most {limit} negatives with "
        f"loss.exclude_positive={config.loss.exclude_positive})."
    )


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations resolved from the config and the dataset size."""

  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  learning_rate: float  # base_learning_rate * global_batch_size / 256


def resolve_schedule(config: ml_collections.ConfigDict, num_examples: int) -> Schedule:
  steps_per_epoch = num_examples // config.global_batch_size
  if config.num_train_steps > 0:
    total = int(config.num_train_steps)
  else:
    total = max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))
  warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  if warmup >= total:
    raise ConfigError(
        f"config.optim.warmup_epochs={config.optim.warmup_epochs} covers "
        f"{warmup} steps, not fewer than the {total} training steps."
    )
  lr = config.optim.base_learning_rate * config.global_batch_size / 256
  return Schedule(steps_per_epoch, total, warmup, lr)
