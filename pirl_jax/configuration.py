"""Config validation and derived numbers, in one place.

Every error names the config field and the offending value, and is raised before anything is
compiled.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

_CHOICES = {
    "mode": ("pretrain", "finetune"),
    "data.source": ("synthetic", "isic", "folder", "tfds"),
    "data.on_bad_image": ("error", "skip"),
    "model.head": ("linear", "mlp"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.kind": ("nce", "infonce"),
    "resume": ("auto", "never", "force"),
}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def get_field(config, dotted: str):
  """The value of `config.<dotted>`, e.g. get_field(config, "optim.momentum")."""
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate_pretrain_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks the fields that do not depend on the dataset."""
  for field, choices in _CHOICES.items():
    value = get_field(config, field)
    if value not in choices:
      raise ConfigError(f"config.{field}={value!r} is not one of {', '.join(choices)}.")
  checks = [
      ("global_batch_size", config.global_batch_size > 0, "must be positive"),
      ("global_batch_size", config.global_batch_size % num_devices == 0,
       f"must be divisible by the number of devices ({num_devices})"),
      ("loss.temperature", config.loss.temperature > 0, "must be positive"),
      ("loss.jigsaw_weight", 0.0 <= config.loss.jigsaw_weight <= 1.0, "must be in [0, 1]"),
      ("loss.num_negatives", config.loss.num_negatives >= 1, "must be at least 1"),
      ("loss.nce_z_ema", 0.0 <= config.loss.nce_z_ema < 1.0, "must be in [0, 1)"),
      ("memory_bank.momentum", 0.0 <= config.memory_bank.momentum < 1.0, "must be in [0, 1)"),
      ("optim.base_learning_rate", config.optim.base_learning_rate > 0, "must be positive"),
      ("optim.warmup_epochs", config.optim.warmup_epochs >= 0, "must be >= 0"),
      ("num_epochs", config.num_epochs > 0 or config.num_train_steps > 0,
       "must be positive (or set num_train_steps)"),
      ("log_every_steps", config.log_every_steps >= 1, "must be >= 1"),
      ("checkpoint_every_steps", config.checkpoint_every_steps >= 1, "must be >= 1"),
      ("keep_checkpoints", config.keep_checkpoints >= 1, "must be >= 1"),
      ("num_devices", config.get("num_devices", 0) >= 0, "must be >= 0 (0 = all devices)"),
  ]
  for field, ok, why in checks:
    if not ok:
      raise ConfigError(f"config.{field}={get_field(config, field)!r} {why}.")


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
    raise ConfigError(f"config.num_devices={n} must be in [0, {len(devices)}] (0 = all "
                      f"{len(devices)} devices).")
  if process_count > 1 and n != len(devices):
    raise ConfigError(f"config.num_devices={n}: with {process_count} processes every device "
                      f"takes part; use 0 (all {len(devices)}).")
  return list(devices)[:n]


def validate_dataset_size(config: ml_collections.ConfigDict, num_examples: int) -> None:
  """Checks the fields that depend on the number of pretraining images."""
  if num_examples < config.global_batch_size:
    raise ConfigError(
        f"The dataset has {num_examples} images, fewer than "
        f"config.global_batch_size={config.global_batch_size}.")
  limit = num_examples - 1 if config.loss.exclude_positive else num_examples
  if config.loss.num_negatives > limit:
    raise ConfigError(
        f"config.loss.num_negatives={config.loss.num_negatives} must be < the dataset size "
        f"N={num_examples} (at most {limit} negatives with "
        f"loss.exclude_positive={config.loss.exclude_positive}).")


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
    raise ConfigError(f"config.optim.warmup_epochs={config.optim.warmup_epochs} covers "
                      f"{warmup} steps, not fewer than the {total} training steps.")
  lr = config.optim.base_learning_rate * config.global_batch_size / 256
  return Schedule(steps_per_epoch, total, warmup, lr)
