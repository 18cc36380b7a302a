"""The PIRL memory bank: one L2-normalised 128-d row per dataset example, as a plain array.

The bank is an array ``(num_rows, D)`` carried in the train state; the caller shards it by rows and pads
``num_rows`` to a multiple of the shard count (``padded_size``). Rows ``>= num_examples`` are padding:
zero, never sampled as negatives, never written (dataset indices are always ``< num_examples``).

All functions are pure ``jnp``: nothing here is differentiated through (rows are read with
``stop_gradient`` and written from stop-gradient'ed embeddings), and the caller scores both loss terms
against the old bank before calling ``update`` (read before write).
"""

import jax
import jax.numpy as jnp

from pirl_jax.losses import l2_normalize


def padded_size(num_examples: int, num_shards: int) -> int:
  """Smallest multiple of ``num_shards`` that is ``>= num_examples``.

  Args:
    num_examples: N, the dataset size.
    num_shards: Number of row shards (devices on the data axis).
  """
  if num_examples < 1 or num_shards < 1:
    raise ValueError(f'num_examples and num_shards must be >= 1, got {num_examples}, {num_shards}')
  return -(-num_examples // num_shards) * num_shards


def init_bank(rng: jax.Array, num_examples: int, dim: int = 128,
              num_rows: int | None = None) -> jax.Array:
  """Initial bank: rows uniform in [-1, 1)^dim then L2-normalised; padding rows zero.

  A symmetric range matters: uniform [0, 1) rows would all lie in one orthant and start out highly
  similar to each other.

  Args:
    rng: PRNG key.
    num_examples: N; rows ``[0, N)`` are real.
    dim: Embedding size D.
    num_rows: Total rows (``>= N``, e.g. ``padded_size(N, shards)``); defaults to N.

  Returns:
    ``(num_rows, dim)`` float32 bank.
  """
  num_rows = num_examples if num_rows is None else num_rows
  if num_rows < num_examples:
    raise ValueError(f'num_rows ({num_rows}) must be >= num_examples ({num_examples})')
  rows = jax.random.uniform(rng, (num_rows, dim), jnp.float32, minval=-1.0, maxval=1.0)
  rows = l2_normalize(rows)
  real = (jnp.arange(num_rows) < num_examples)[:, None]
  return jnp.where(real, rows, 0.0)


def validate_num_negatives(num_negatives: int, num_examples: int,
                           exclude_positive: bool = True) -> None:
  """Checks that K negatives can be drawn from N examples.

  With ``exclude_positive`` the pool is the N - 1 other examples, so ``K <= N - 1`` (i.e. K < N);
  otherwise the whole bank, ``K <= N``.

  Raises:
    ValueError: Naming ``loss.num_negatives`` and both values.
  """
  if num_negatives < 1:
    raise ValueError(f'loss.num_negatives must be >= 1, got {num_negatives}')
  limit = num_examples - 1 if exclude_positive else num_examples
  if num_negatives > limit:
    what = 'the other N-1 examples (the positive is excluded)' if exclude_positive else 'N examples'
    raise ValueError(
        f'loss.num_negatives={num_negatives} is too large for a dataset of num_examples={num_examples}: '
        f'negatives are drawn from {what}, so it must be <= {limit}')


def sample_negatives(rng: jax.Array, positives: jax.Array, num_negatives: int, num_examples: int,
                     exclude_positive: bool = True) -> jax.Array:
  """Draws K negative row indices per query, uniformly and with replacement from ``[0, N)``.

  With ``exclude_positive`` each draw is uniform over the N - 1 rows other than the query's positive:
  draw from ``[0, N - 1)`` and shift values ``>= positive`` up by one. Padding rows (``>= N``) are
  never drawn.

  Args:
    rng: PRNG key (use a fresh one per term and step).
    positives: ``(B,)`` int dataset indices of the queries.
    num_negatives: K.
    num_examples: N.
    exclude_positive: Exclude each query's own index (paper) or not (VISSL).

  Returns:
    ``(B, K)`` int32 indices.
  """
  positives = positives.astype(jnp.int32)
  shape = (positives.shape[0], num_negatives)
  if not exclude_positive:
    return jax.random.randint(rng, shape, 0, num_examples, dtype=jnp.int32)
  neg = jax.random.randint(rng, shape, 0, num_examples - 1, dtype=jnp.int32)
  return neg + (neg >= positives[:, None]).astype(jnp.int32)


def gather(bank: jax.Array, indices: jax.Array) -> jax.Array:
  """Rows ``bank[indices]`` (any index shape), stop-gradient'ed."""
  return jax.lax.stop_gradient(jnp.take(bank, indices, axis=0))


def update(bank: jax.Array, indices: jax.Array, embeddings: jax.Array,
           momentum: float = 0.5) -> jax.Array:
  """Writes embeddings into their rows: ``m_i <- normalise(momentum * m_i + (1 - momentum) * f_i)``.

  Only the image embedding f_hat is written (at stable dataset indices), after both loss terms have
  been scored against the old rows.

  Args:
    bank: ``(num_rows, D)`` bank.
    indices: ``(B,)`` dataset indices, unique within the (global) batch.
    embeddings: ``(B, D)`` L2-normalised image embeddings f_hat; stop-gradient'ed here.
    momentum: Weight of the old row (0.5 in the paper).

  Returns:
    The new bank (same shape and dtype).
  """
  indices = indices.astype(jnp.int32)
  old = jnp.take(bank, indices, axis=0)
  new = momentum * old + (1.0 - momentum) * jax.lax.stop_gradient(embeddings).astype(bank.dtype)
  new = l2_normalize(new).astype(bank.dtype)
  return jax.lax.stop_gradient(bank.at[indices].set(new, unique_indices=True))
