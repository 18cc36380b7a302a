"""Fine-tuning's tf.data inputs over a labelled split: this process's share of the augmented
training batches from any step (`TrainInput`), of the unlabelled pool's view pairs
(`UnlabelledInput`), and the eval batches of a whole split (`EvalInput`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from pirl_jax.data import augment
from pirl_jax.data import errors
from pirl_jax.data import labelled
from pirl_jax.data import labelled_views as views

_SAMPLING_SALT = 0x5A3B1E


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

  def __init__(
      self,
      split: labelled.LabelledSplit,
      positions: np.ndarray,
      cfg: views.AugmentConfig,
      *,
      seed: int,
      global_batch_size: int,
      balanced: bool = False,
      process_index: int = 0,
      process_count: int = 1,
      num_parallel_calls: int = -1,
      prefetch_batches: int = 2,
  ):
    if global_batch_size % process_count:
      raise errors.ConfigFieldError(
          f"global_batch_size={global_batch_size} is not divisible by "
          f"the process count {process_count}."
      )
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
      weights = labelled.class_weights(self.labels[self.positions])[self.labels[self.positions]]
      order = rng.choice(self.positions, size=total, replace=True, p=weights / weights.sum())
    else:
      rounds = math.ceil(total / self.num_examples)
      order = np.concatenate(
          [self.positions[rng.permutation(self.num_examples)] for _ in range(rounds)]
      )[:total]
    return order.reshape(self.steps_per_epoch, self.global_batch_size)

  def _example_fn(self, epoch: int):
    encoded, labels, cfg, seed = self._encoded, self._label_table, self.cfg, self.seed

    def fn(i, s):
      return views.train_example(
          tf.gather(encoded, i), tf.gather(labels, i), i, s, seed, epoch, cfg
      )

    return fn

  def epoch_dataset(self, epoch: int, first_step: int = 0) -> tf.data.Dataset:
    order = self.epoch_order(epoch)
    slots = np.arange(order.size, dtype=np.int64).reshape(order.shape)
    start = self.process_index * self.local_batch_size
    stop = start + self.local_batch_size
    index = order[first_step:, start:stop].reshape(-1)
    slot = slots[first_step:, start:stop].reshape(-1)
    ds = tf.data.Dataset.from_tensor_slices((index, slot))
    ds = ds.map(
        self._example_fn(epoch), num_parallel_calls=self.num_parallel_calls, deterministic=True
    )
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

  def __init__(
      self,
      pool: labelled.LabelledSplit,
      cfg: views.AugmentConfig,
      strong: views.StrongAugmentConfig,
      *,
      seed: int,
      global_batch_size: int,
      process_index: int = 0,
      process_count: int = 1,
      num_parallel_calls: int = -1,
      prefetch_batches: int = 2,
  ):
    super().__init__(
        pool,
        np.arange(len(pool)),
        cfg,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        num_parallel_calls=num_parallel_calls,
        prefetch_batches=prefetch_batches,
    )
    self.strong = strong

  def _example_fn(self, epoch: int):
    encoded, cfg, strong, seed = self._encoded, self.cfg, self.strong, self.seed

    def fn(i, s):
      return views.unlabelled_example(tf.gather(encoded, i), i, s, seed, epoch, cfg, strong)

    return fn


class EvalInput:
  """Every image of a split once, in order, as padded global batches with a validity mask."""

  def __init__(
      self,
      split: labelled.LabelledSplit,
      cfg: views.AugmentConfig,
      *,
      global_batch_size: int,
      process_index: int = 0,
      process_count: int = 1,
      num_parallel_calls: int = -1,
      tiles: Callable[[tf.Tensor], tf.Tensor] | None = None,
  ):
    """`tiles`: if given, each example also has 'tiles', this function of the decoded image."""
    if global_batch_size % process_count:
      raise errors.ConfigFieldError(
          f"eval_batch_size={global_batch_size} is not divisible by "
          f"the process count {process_count}."
      )
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
      out = {"image": views.eval_image(image_bytes, cfg), "label": y, "mask": m}
      if tiles is not None:
        out["tiles"] = tiles(augment.decode(image_bytes))
      return out

    ds = ds.map(example, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    # Built (and its map traced) once; every evaluation iterates it again.
    self._dataset = ds.batch(self.local_batch_size, drop_remainder=True).prefetch(2)

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global batch: {'image', 'label', 'mask'} (mask 0 = padding)."""
    yield from self._dataset.as_numpy_iterator()
