"""MoCo's queue of keys: the K most recent key embeddings, a row-sharded array in the train state.

The queue is an array ``(num_rows, D)``, ``num_rows`` = K padded to a multiple of the device count;
rows ``>= K`` are padding, never scored and never written. Keys of step t go to rows
``(t * B + j) mod K`` (the oldest keys are overwritten first), after the step's loss has scored
the old queue (read before write), as in MoCo.

On a mesh the queue is split by rows over the ``data`` axis, like the memory bank
(`memory_bank`), and no device ever holds more than its own rows. Left to the SPMD partitioner,
``queries @ queue.T`` with batch-sharded queries may all-gather the queue (K x D per step), so the
loss is written with ``jax.shard_map``: every device all-gathers the queries ``(B, D)``, scores
them against its own rows ``(B, K / devices)``, and the log-sum-exp over the queue is assembled
from per-device maxima (an all-reduce of B numbers) and sums of exponentials (a reduce-scatter of
B numbers). Collectives carry ``O(B * D)`` numbers, independent of K; the gradient flows back
through the same collectives. The write all-gathers the batch's keys and each device writes the
rows it owns (`memory_bank.replace_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pirl_jax import memory_bank


def init_queue(rng: jax.Array, size: int, dim: int, num_rows: int | None = None) -> jax.Array:
  """K random unit rows (as MoCo's normalised Gaussian start), padding rows zero."""
  return memory_bank.init_bank(rng, size, dim, num_rows)


def write_indices(step: jax.Array, batch_size: int, size: int) -> jax.Array:
  """The queue rows the keys of `step` replace: ``(step * B + arange(B)) mod K``, int32 (B,)."""
  first = (step.astype(jnp.int32) * batch_size) % size
  return (first + jnp.arange(batch_size, dtype=jnp.int32)) % size


def write(queue: jax.Array, keys: jax.Array, step: jax.Array, size: int, mesh=None) -> jax.Array:
  """The queue with the keys ``(B, D)`` of `step` in place of the oldest B."""
  indices = write_indices(step, keys.shape[0], size)
  return memory_bank.replace_rows(queue, indices, keys, mesh)


def _negative_terms(axis, size: int, rows_per_device: int, temperature: float, precision):
  """(queries, queue rows) -> (log-sum-exp over the queue, mean negative similarity) of the
  local queries, inside shard_map over `axis` (or on plain arrays when `axis` is None)."""

  def fn(query, rows):
    if axis is None:
      queries, first_row = query, 0
    else:
      queries = jax.lax.all_gather(query, axis, tiled=True)
      first_row = jax.lax.axis_index(axis) * rows_per_device
    dots = jnp.einsum("bd,kd->bk", queries, rows.astype(jnp.float32), precision=precision)
    real = (first_row + jnp.arange(rows.shape[0])) < size
    logits = jnp.where(real[None, :], dots / temperature, -jnp.inf)
    # The largest logit of each query over all devices only steadies the exponentials: a
    # constant for the gradient.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=1))
    if axis is not None:
      peak = jax.lax.pmax(peak, axis)
    sum_exp = jnp.sum(jnp.exp(logits - peak[:, None]), axis=1)
    similarity = jax.lax.stop_gradient(jnp.sum(jnp.where(real[None, :], dots, 0.0), axis=1))
    if axis is not None:
      sum_exp = jax.lax.psum_scatter(sum_exp, axis, scatter_dimension=0, tiled=True)
      similarity = jax.lax.psum_scatter(similarity, axis, scatter_dimension=0, tiled=True)
      local = query.shape[0]
      peak = jax.lax.dynamic_slice_in_dim(peak, jax.lax.axis_index(axis) * local, local)
    return peak + jnp.log(sum_exp), similarity / size

  return fn


def moco_loss(
    queries: jax.Array,
    keys: jax.Array,
    queue: jax.Array,
    size: int,
    temperature: float,
    mesh=None,
    precision=jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, dict]:
  """MoCo's InfoNCE: ``-log(exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_j exp(q.n_j / tau)))``,
  mean over the batch, the negatives n_j the K queue rows.

  Args:
    queries: ``(B, D)`` L2-normalised query embeddings (batch-sharded on a mesh).
    keys: ``(B, D)`` L2-normalised keys of the same examples (no gradient flows into them).
    queue: ``(num_rows, D)`` keys of earlier steps, rows ``>= size`` padding (row-sharded).
    size: K.
    temperature: tau.
    mesh: the device mesh; None computes on plain arrays.
    precision: matmul precision (HIGHEST: TF32 would perturb logits of ~1/tau scale).

  Returns:
    (scalar loss, metrics: mean positive and negative similarity).
  """
  queries = queries.astype(jnp.float32)
  keys = jax.lax.stop_gradient(keys.astype(jnp.float32))
  queue = jax.lax.stop_gradient(queue)
  positive = jnp.sum(queries * keys, axis=1) / temperature
  if mesh is None:
    negatives = _negative_terms(None, size, queue.shape[0], temperature, precision)
    lse_negative, negative_similarity = negatives(queries, queue)
  else:
    axis = mesh.axis_names[0]
    negatives = _negative_terms(
        axis, size, queue.shape[0] // mesh.shape[axis], temperature, precision
    )
    lse_negative, negative_similarity = jax.shard_map(
        negatives,
        mesh=mesh,
        in_specs=(P(axis), P(axis, None)),
        out_specs=(P(axis), P(axis)),
        check_vma=False,
    )(queries, queue)
  loss = jnp.mean(jnp.logaddexp(positive, lse_negative) - positive)
  metrics = {
      "positive_similarity": jax.lax.stop_gradient(jnp.mean(positive) * temperature),
      "negative_similarity": jnp.mean(negative_similarity),
  }
  return loss, metrics
