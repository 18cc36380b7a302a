"""The PIRL memory bank: one L2-normalised 128-d row per dataset example, as a plain array.

The bank is an array ``(num_rows, D)`` carried in the train state; the caller shards it by rows and pads
``num_rows`` to a multiple of the shard count (``padded_size``). Rows ``>= num_examples`` are padding:
zero, never sampled as negatives, never written (dataset indices are always ``< num_examples``).

All functions are pure ``jnp``: nothing here is differentiated through (rows are read with
``stop_gradient`` and written from stop-gradient'ed embeddings), and the caller scores both loss terms
against the old bank before calling ``update`` (read before write).

Scoring and writing on a mesh (``score``, ``update`` with ``mesh``): no device ever holds more than
its own rows. Left to the SPMD partitioner, ``jnp.take(bank, indices)`` on a row-sharded bank becomes
an all-gather of the whole bank every step (656 MB per device at ImageNet size), so both are written
with ``jax.shard_map`` over the ``data`` axis instead:

* score: every device all-gathers the (small) queries ``(B, D)`` and row indices ``(B, K+1)``,
  computes the dot products of the entries whose rows it holds (the others are exact zeros),
  ``chunk_size`` columns at a time so that the gathered rows never exceed ``B x chunk x D``, and a
  reduce-scatter (``psum_scatter``) sums the partial scores and hands each device the logits of its
  own queries. Each score comes from exactly one device, so the sum is exact and the result equals
  the one-device computation bit for bit. Collectives carry ``O(B*D + B*K)`` numbers, independent
  of N; the price is that every device runs the (masked) gather for all ``B x (K+1)`` entries.
  The query gradient flows back through the same collectives (the transpose of the all-gather is
  a reduce-scatter).
* update: every device all-gathers the batch's indices and embeddings ``(B,)``, ``(B, D)`` and
  writes the rows it owns (a local scatter; the other writes are dropped).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pirl_jax.losses import l2_normalize


def padded_size(num_examples: int, num_shards: int) -> int:
  """Smallest multiple of ``num_shards`` that is ``>= num_examples``.

  Args:
    num_examples: N, the dataset size.
    num_shards: Number of row shards (devices on the data axis).
  """
  if num_examples < 1 or num_shards < 1:
    raise ValueError(f"num_examples and num_shards must be >= 1, got {num_examples}, {num_shards}")
  return -(-num_examples // num_shards) * num_shards


def init_bank(
    rng: jax.Array, num_examples: int, dim: int = 128, num_rows: int | None = None
) -> jax.Array:
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
    raise ValueError(f"num_rows ({num_rows}) must be >= num_examples ({num_examples})")
  rows = jax.random.uniform(rng, (num_rows, dim), jnp.float32, minval=-1.0, maxval=1.0)
  rows = l2_normalize(rows)
  real = (jnp.arange(num_rows) < num_examples)[:, None]
  return jnp.where(real, rows, 0.0)


def sample_negatives(
    rng: jax.Array,
    positives: jax.Array,
    num_negatives: int,
    num_examples: int,
    exclude_positive: bool = True,
) -> jax.Array:
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


def _column_chunks(total: int, chunk_size: int) -> tuple[int, int]:
  chunk = max(1, min(chunk_size, total))
  return chunk, -(-total // chunk)


def _chunk_columns(idx, first_row, num_rows, c, chunk, total):
  """Chunk c of the columns of `idx`: (start, local row indices, mask of the entries to score).

  The last chunk is shifted left to end at the last column; the columns it shares with the chunk
  before are masked out, so that every entry is scored exactly once.
  """
  start = jnp.minimum(c * chunk, total - chunk)
  local = jax.lax.dynamic_slice_in_dim(idx, start, chunk, axis=1) - first_row
  first_time = (start + jnp.arange(chunk)) >= c * chunk
  mine = (local >= 0) & (local < num_rows) & first_time[None, :]
  return start, jnp.where(mine, local, 0), mine


def _partial_scores(bank_rows, first_row, query, idx, chunk_size, precision):
  """<bank[idx], query> for the entries of `idx` whose rows are in `bank_rows` (the rows from
  `first_row` on), exact zeros elsewhere: (B, K+1), `chunk_size` columns at a time."""
  batch, total = idx.shape
  chunk, num_chunks = _column_chunks(total, chunk_size)
  query = query.astype(jnp.float32)

  def body(c, scores):
    start, local, mine = _chunk_columns(idx, first_row, bank_rows.shape[0], c, chunk, total)
    rows = jnp.take(bank_rows, local, axis=0).astype(jnp.float32)  # (B, chunk, D)
    dots = jnp.einsum("bkd,bd->bk", rows, query, precision=precision)
    current = jax.lax.dynamic_slice_in_dim(scores, start, chunk, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(
        scores, jnp.where(mine, dots, current), start, axis=1
    )

  return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((batch, total), jnp.float32))


def _partial_query_gradient(bank_rows, first_row, idx, d_scores, chunk_size, precision):
  """The gradient of `_partial_scores` with respect to the queries: (B, D)."""
  batch, total = idx.shape
  chunk, num_chunks = _column_chunks(total, chunk_size)

  def body(c, d_query):
    start, local, mine = _chunk_columns(idx, first_row, bank_rows.shape[0], c, chunk, total)
    rows = jnp.take(bank_rows, local, axis=0).astype(jnp.float32)
    d_chunk = jnp.where(mine, jax.lax.dynamic_slice_in_dim(d_scores, start, chunk, axis=1), 0.0)
    return d_query + jnp.einsum("bkd,bk->bd", rows, d_chunk, precision=precision)

  return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((batch, bank_rows.shape[1]), jnp.float32))


def _num_blocks(local_batch: int, most: int = 8) -> int:
  return max(d for d in range(1, most + 1) if local_batch % d == 0)


def _scorer(axis, rows_per_device: int, chunk_size: int, precision):
  """(queries, indices, bank rows) -> logits of the local queries, inside shard_map over `axis`
  (or on plain arrays when `axis` is None), with a hand-written backward pass.

  The local batch is scored in up to 8 blocks, each gathered from every device, scored and
  reduce-scattered in turn: the gathered indices and partial scores are then (B/blocks, K+1)
  instead of (B, K+1) per device. Automatic differentiation would keep every chunk's gathered
  rows (B x (K+1) x D, 4.2 GB per term at ImageNet size) for the backward pass; this backward
  pass keeps only the local inputs and gathers each chunk's rows again.
  """

  def gather(x):
    return x if axis is None else jax.lax.all_gather(x, axis, tiled=True)

  def scatter(x):
    return x if axis is None else jax.lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True)

  def first_row():
    return 0 if axis is None else jax.lax.axis_index(axis) * rows_per_device

  def blocks(x, n):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  def forward(query, idx, bank_rows):
    n = _num_blocks(query.shape[0])

    def one_block(block):
      q, i = block
      return scatter(
          _partial_scores(bank_rows, first_row(), gather(q), gather(i), chunk_size, precision)
      )

    out = jax.lax.map(one_block, (blocks(query, n), blocks(idx, n)))
    return out.reshape((query.shape[0],) + out.shape[2:])

  @jax.custom_vjp
  def scores(query, idx, bank_rows):
    return forward(query, idx, bank_rows)

  def scores_fwd(query, idx, bank_rows):
    return forward(query, idx, bank_rows), (idx, bank_rows)

  def scores_bwd(residuals, d_logits):
    idx, bank_rows = residuals
    n = _num_blocks(idx.shape[0])

    def one_block(block):
      i, d = block
      return scatter(
          _partial_query_gradient(
              bank_rows, first_row(), gather(i), gather(d), chunk_size, precision
          )
      )

    d_query = jax.lax.map(one_block, (blocks(idx, n), blocks(d_logits, n)))
    return d_query.reshape((idx.shape[0],) + d_query.shape[2:]), None, None

  scores.defvjp(scores_fwd, scores_bwd)
  return scores


def score(
    query: jax.Array,
    bank: jax.Array,
    positives: jax.Array,
    negatives: jax.Array,
    temperature: float,
    mesh=None,
    chunk_size: int = 1024,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Scores ``s_j = <m_j, q> / tau`` of each query against its positive row and its negatives.

  Args:
    query: ``(B, D)`` L2-normalised query embeddings (f_hat or g_hat); sharded by batch on a mesh.
    bank: ``(num_rows, D)`` memory bank; row-sharded on a mesh; never differentiated.
    positives: ``(B,)`` int dataset index of each query (the positive row).
    negatives: ``(B, K)`` int row indices of the negatives.
    temperature: tau.
    mesh: the device mesh whose ``data`` axis shards the bank's rows and the batch; None scores
      plain (unsharded) arrays.
    chunk_size: columns (positive + negatives) scored at a time: bounds the gathered rows to
      ``B x chunk_size x D`` per device.
    precision: matmul precision; HIGHEST because TF32 would perturb logits of ~1/tau scale (and
      thereby the NCE normaliser Z) for little speed gain in this memory-bound op.

  Returns:
    ``(B, K + 1)`` float32 logits, column 0 the positive.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  idx = jnp.concatenate([positives[:, None].astype(jnp.int32), negatives.astype(jnp.int32)], axis=1)
  bank = jax.lax.stop_gradient(bank)
  if mesh is None:
    return _scorer(None, bank.shape[0], chunk_size, precision)(query, idx, bank) / temperature
  axis = mesh.axis_names[0]
  scores = _scorer(axis, bank.shape[0] // mesh.shape[axis], chunk_size, precision)
  # check_vma=False: the loops' carries start as constants but hold per-device values, and the
  # backward pass (written by hand) does not need JAX to track that.
  logits = jax.shard_map(
      scores,
      mesh=mesh,
      in_specs=(P(axis), P(axis), P(axis, None)),
      out_specs=P(axis),
      check_vma=False,
  )(query, idx, bank)
  return logits / temperature


def update(
    bank: jax.Array, indices: jax.Array, embeddings: jax.Array, momentum: float = 0.5, mesh=None
) -> jax.Array:
  """Writes embeddings into their rows: ``m_i <- normalise(momentum * m_i + (1 - momentum) * f_i)``.

  Only the image embedding f_hat is written (at stable dataset indices), after both loss terms have
  been scored against the old rows.

  Args:
    bank: ``(num_rows, D)`` bank (row-sharded on `mesh`).
    indices: ``(B,)`` dataset indices, unique within the (global) batch.
    embeddings: ``(B, D)`` L2-normalised image embeddings f_hat; stop-gradient'ed here.
    momentum: Weight of the old row (0.5 in the paper).
    mesh: as for `score`; each device writes only the rows it holds.

  Returns:
    The new bank (same shape, dtype and sharding).
  """

  def combine(old, emb):
    return l2_normalize(momentum * old + (1.0 - momentum) * emb)

  return _write_rows(bank, indices, embeddings, combine, mesh)


def replace_rows(bank: jax.Array, indices: jax.Array, rows: jax.Array, mesh=None) -> jax.Array:
  """``bank[indices] = rows`` (indices unique), each device writing only the rows it holds on
  `mesh` (as `update`); the rows are stop-gradient'ed. MoCo's queue write (`key_queue`)."""
  return _write_rows(bank, indices, rows, lambda old, new: new, mesh)


def _write_rows(bank, indices, embeddings, combine, mesh):
  """``bank[indices] = combine(bank[indices], embeddings)``, row-sharded on `mesh`."""
  indices = indices.astype(jnp.int32)
  embeddings = jax.lax.stop_gradient(embeddings)

  def write(rows, first_row, idx, emb):
    local = idx - first_row
    mine = (local >= 0) & (local < rows.shape[0])
    old = jnp.take(rows, jnp.where(mine, local, 0), axis=0)
    new = combine(old, emb.astype(rows.dtype))
    # Rows held elsewhere get an out-of-range index and are dropped.
    target = jnp.where(mine, local, rows.shape[0])
    return rows.at[target].set(new.astype(rows.dtype), mode="drop", unique_indices=True)

  if mesh is None:
    return jax.lax.stop_gradient(write(bank, 0, indices, embeddings))
  axis = mesh.axis_names[0]
  rows_per_device = bank.shape[0] // mesh.shape[axis]

  def per_device(rows, idx, emb):
    first_row = jax.lax.axis_index(axis) * rows_per_device
    return write(
        rows,
        first_row,
        jax.lax.all_gather(idx, axis, tiled=True),
        jax.lax.all_gather(emb, axis, tiled=True),
    )

  new_bank = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(axis, None), P(axis), P(axis)), out_specs=P(axis, None)
  )(bank, indices, embeddings)
  return jax.lax.stop_gradient(new_bank)
