"""The pretraining input pipeline: source -> the method's views -> per-process batches.

The views' randomness is keyed by (seed, epoch, index), so an example's views never depend on the
process count or on thread scheduling. The data order depends on the source:

* In-memory sources: a pure function of (seed, step). Epoch e visits the examples in the
  permutation drawn from (seed, e), step s of the epoch takes rows [s*B, (s+1)*B) of it, and
  process p keeps its contiguous slice of those rows. Restarting at any step reproduces the same
  global batches, on any number of processes.
* Streamed tfds sources: cannot be permuted globally. Each process reads its own shard of the
  split (every process_count-th example) and shuffles it with a seeded buffer per epoch, so the
  batches are reproducible for a fixed process count but change when it changes.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf

from pirl_jax.data import errors
from pirl_jax.data import jigsaw
from pirl_jax.data import permutations
from pirl_jax.data import sources


def view_config(views_cfg) -> jigsaw.ViewConfig:
  """The jigsaw.ViewConfig for the `data.views` config block."""
  fields = {f.name for f in dataclasses.fields(jigsaw.ViewConfig)}
  values = views_cfg.to_dict() if hasattr(views_cfg, "to_dict") else dict(views_cfg)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise errors.ConfigFieldError(
        f"Unknown field(s) data.views.{', data.views.'.join(unknown)}; "
        f"valid: {', '.join(sorted(fields))}."
    )
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return jigsaw.ViewConfig(**values)


class PretrainInput:
  """Iterates this process's share of the global batches, from any start step."""

  def __init__(
      self,
      source,
      views: jigsaw.ViewConfig,
      *,
      seed: int,
      global_batch_size: int,
      process_index: int = 0,
      process_count: int = 1,
      num_parallel_calls: int = -1,
      prefetch_batches: int = 2,
      method: str = "pirl",
      jigsaw_permutations: int = 1000,
  ):
    if global_batch_size % process_count:
      raise errors.ConfigFieldError(
          f"global_batch_size={global_batch_size} is not divisible by "
          f"the process count {process_count}."
      )
    self.source = source
    self.views = views
    self.method = method
    # The jigsaw classes, as one host constant the map gathers from.
    self._permutations = (
        tf.constant(permutations.permutation_set(jigsaw_permutations))
        if method == "jigsaw"
        else None
    )
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.process_count = process_count
    self.num_parallel_calls = tf.data.AUTOTUNE if num_parallel_calls < 0 else num_parallel_calls
    self.prefetch_batches = prefetch_batches
    self.num_examples = source.num_examples
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch < 1:
      raise errors.DataSourceError(
          f"The dataset has {self.num_examples} images, fewer than "
          f"global_batch_size={global_batch_size}."
      )
    if isinstance(source, sources.InMemorySource):
      # One host tensor of all encoded images; the map gathers by index.
      self._encoded = tf.constant(source.encoded, dtype=tf.string)

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """Dataset indices of this process's examples in epoch `epoch`, shape (steps, local_batch)."""
    order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    order = order[: self.steps_per_epoch * self.global_batch_size]
    order = order.reshape(self.steps_per_epoch, self.global_batch_size)
    start = self.process_index * self.local_batch_size
    return order[:, start : start + self.local_batch_size].astype(np.int32)

  def _views_fn(self, epoch: int):
    views, seed, method, perms = self.views, self.seed, self.method, self._permutations

    def fn(image_bytes, index):
      return jigsaw.make_views(image_bytes, index, seed, epoch, views, method, perms)

    return fn

  def epoch_dataset(self, epoch: int, first_step: int = 0) -> tf.data.Dataset:
    """Batches of epoch `epoch`, starting at its step `first_step`."""
    if isinstance(self.source, sources.InMemorySource):
      indices = self.epoch_indices(epoch)[first_step:].reshape(-1)
      encoded = self._encoded
      ds = tf.data.Dataset.from_tensor_slices(indices)
      ds = ds.map(lambda i: (tf.gather(encoded, i), i))
    else:
      # Streaming sources cannot be permuted globally: a seeded shuffle buffer per epoch, over
      # this process's shard only.
      ds = self.source.as_dataset(self.process_index, self.process_count)
      ds = ds.shuffle(10_000, seed=self.seed * 100_003 + epoch, reshuffle_each_iteration=False)
      ds = ds.take(self.steps_per_epoch * self.local_batch_size)
      ds = ds.skip(first_step * self.local_batch_size)
    ds = ds.map(
        self._views_fn(epoch), num_parallel_calls=self.num_parallel_calls, deterministic=True
    )
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    return ds.prefetch(self.prefetch_batches)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches for global steps start_step, start_step + 1, ... (endless)."""
    epoch, first = divmod(start_step, self.steps_per_epoch)
    while True:
      for batch in self.epoch_dataset(epoch, first).as_numpy_iterator():
        yield batch
      epoch, first = epoch + 1, 0
