"""PIRL contrastive losses against a memory bank: scores, NCE (paper / VISSL), InfoNCE, and Z.

All functions are pure ``jnp`` and jit-friendly. Notation: B queries, K negatives per query, D embedding
size, N dataset size, tau temperature.

Typical step (read before write; negatives fresh per term)::

  logits_g = contrastive_scores(g_hat, bank, index, neg_g, tau)
  logits_f = contrastive_scores(f_hat, bank, index, neg_f, tau)
  z = update_z(z, estimate_z([logits_g, logits_f], N), ema)       # NCE only; z is train state
  out = pirl_loss(logits_g, logits_f, kind='nce', z=z, num_examples=N, lam=0.5)
  bank = memory_bank.update(bank, index, f_hat)                    # after scoring

The memory-bank rows (and Z) never receive gradients: the gathered rows and Z are wrapped in
``stop_gradient``.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

LOSS_KINDS = ('nce', 'infonce')


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis`` (as torch.nn.functional.normalize); finite gradient at 0.

  Args:
    x: Array to normalise.
    axis: Axis holding the vectors.
    eps: Lower bound on the norm.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  # rsqrt of the clamped squared norm keeps the gradient finite for all-zero rows (padded bank rows).
  return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps * eps, sq.dtype)))


def contrastive_scores(query: jax.Array, bank: jax.Array, positives: jax.Array,
                       negatives: jax.Array, temperature: float,
                       precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Scores ``s_j = <m_j, q> / tau`` of each query against its positive row and its negatives.

  Args:
    query: ``(B, D)`` L2-normalised query embeddings (f_hat or g_hat).
    bank: ``(num_rows, D)`` memory bank; rows are stop-gradient'ed.
    positives: ``(B,)`` int dataset index of each query (the positive row).
    negatives: ``(B, K)`` int row indices of the negatives.
    temperature: tau.
    precision: Matmul precision; HIGHEST by default because TF32 would perturb logits of ~1/tau scale
      (and thereby the NCE normaliser Z) for little speed gain in this memory-bound op.

  Returns:
    ``(B, K + 1)`` float32 logits, column 0 the positive.
  """
  idx = jnp.concatenate([positives[:, None].astype(negatives.dtype), negatives], axis=1)
  # (B, K+1, D): the dominant per-step memory cost at large K.
  rows = jax.lax.stop_gradient(jnp.take(bank, idx, axis=0))
  logits = jnp.einsum('bkd,bd->bk', rows.astype(jnp.float32), query.astype(jnp.float32),
                      precision=precision)
  return logits / temperature


def contrastive_scores_chunked(query: jax.Array, bank: jax.Array, positives: jax.Array,
                               negatives: jax.Array, temperature: float, chunk_size: int = 4096,
                               precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """``contrastive_scores`` with the bank rows gathered ``chunk_size`` columns at a time.

  The same scores (each one the same D-long dot product), but the gathered rows peak at
  ``B x chunk_size x D`` instead of ``B x (K + 1) x D`` (4.2 GB per term at B=256, K=32000,
  D=128 in float32): the chunks are scored one after another under ``jax.lax.map``.

  Args:
    query, bank, positives, negatives, temperature, precision: as ``contrastive_scores``.
    chunk_size: Columns (positive + negatives) scored per chunk; the last chunk is padded with
      row 0 and the padding's scores dropped.

  Returns:
    ``(B, K + 1)`` float32 logits, column 0 the positive.
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  idx = jnp.concatenate([positives[:, None].astype(negatives.dtype), negatives], axis=1)
  batch, total = idx.shape
  chunk = min(chunk_size, total)
  num_chunks = -(-total // chunk)
  idx = jnp.pad(idx, ((0, 0), (0, num_chunks * chunk - total)))
  idx = idx.reshape(batch, num_chunks, chunk).transpose(1, 0, 2)  # (chunks, B, chunk)
  q = query.astype(jnp.float32)

  def score(chunk_idx):
    rows = jax.lax.stop_gradient(jnp.take(bank, chunk_idx, axis=0))  # (B, chunk, D)
    return jnp.einsum('bkd,bd->bk', rows.astype(jnp.float32), q, precision=precision)

  logits = jax.lax.map(score, idx)  # (chunks, B, chunk)
  logits = logits.transpose(1, 0, 2).reshape(batch, num_chunks * chunk)[:, :total]
  return logits / temperature


def infonce_loss(logits: jax.Array) -> jax.Array:
  """Softmax cross-entropy with target 0 (the positive), mean over the batch.

  Args:
    logits: ``(B, K + 1)`` scores, column 0 the positive.

  Returns:
    Scalar float32 loss.
  """
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])


def nce_loss(logits: jax.Array, z: jax.Array | float, num_examples: int) -> jax.Array:
  """NCE loss of the paper / VISSL ``nce_loss_with_memory`` (negatives summed, batch averaged).

  With ``x_j = exp(s_j) / Z``, ``P_n = 1/N`` and ``K`` negatives:
  ``h_pos = x_0 / (x_0 + K P_n)``, ``h_neg_j = K P_n / (x_j + K P_n)`` and
  ``L = -mean_b[log h_pos + sum_j log h_neg_j]``, evaluated in log space (softplus) so that large
  logits or a small Z cannot overflow.

  Args:
    logits: ``(B, K + 1)`` scores, column 0 the positive.
    z: The normalising constant Z (> 0); treated as a constant (stop-gradient).
    num_examples: N, the dataset size (noise distribution P_n = 1/N).

  Returns:
    Scalar float32 loss.
  """
  logits = logits.astype(jnp.float32)
  num_negatives = logits.shape[1] - 1
  log_x = logits - jnp.log(jax.lax.stop_gradient(jnp.asarray(z, jnp.float32)))
  log_kpn = jnp.log(jnp.float32(num_negatives)) - jnp.log(jnp.float32(num_examples))
  log_h_pos = -jax.nn.softplus(log_kpn - log_x[:, 0])
  log_h_neg = -jax.nn.softplus(log_x[:, 1:] - log_kpn)
  return -jnp.mean(log_h_pos + jnp.sum(log_h_neg, axis=1))


def estimate_z(logits_list: jax.Array | Sequence[jax.Array], num_examples: int) -> jax.Array:
  """Monte-Carlo estimate of the NCE normaliser, ``Z = N * mean(exp(s))``.

  The mean runs over every entry (positive and negatives, all queries) of all given arrays; under jit
  with globally sharded logits this is the mean over all devices.

  Args:
    logits_list: One ``(B, K + 1)`` array or a sequence of them (e.g. both PIRL terms).
    num_examples: N.

  Returns:
    Scalar float32 Z (stop-gradient'ed).
  """
  if isinstance(logits_list, jax.Array) or hasattr(logits_list, 'shape'):
    logits_list = [logits_list]
  if not logits_list:
    raise ValueError('estimate_z needs at least one logits array')
  total = sum(jnp.sum(jnp.exp(l.astype(jnp.float32))) for l in logits_list)
  count = sum(l.size for l in logits_list)
  return jax.lax.stop_gradient(num_examples * total / count)


def update_z(z_old: jax.Array | float, z_batch: jax.Array, ema: float) -> jax.Array:
  """Updates the NCE normaliser state.

  An uninitialised state (``z_old <= 0``, e.g. the initial value -1) takes ``z_batch``; afterwards
  ``Z <- (1 - ema) * Z + ema * z_batch``. ``ema = 0`` therefore freezes Z after the first estimate
  (the paper / VISSL behaviour).

  Args:
    z_old: Current Z state (scalar); <= 0 means not yet estimated.
    z_batch: This step's estimate (``estimate_z``).
    ema: Weight of the new estimate, in [0, 1].

  Returns:
    Scalar float32 Z.
  """
  if not 0.0 <= ema <= 1.0:
    raise ValueError(f'ema must be in [0, 1], got {ema}')
  z_old = jnp.asarray(z_old, jnp.float32)
  z_batch = jax.lax.stop_gradient(jnp.asarray(z_batch, jnp.float32))
  return jnp.where(z_old > 0, (1.0 - ema) * z_old + ema * z_batch, z_batch)


class PIRLLoss(NamedTuple):
  """PIRL loss and its two terms (a pytree, usable as ``has_aux`` output)."""
  total: jax.Array
  jigsaw: jax.Array  # L(m_i, g_hat(v_It))
  image: jax.Array  # L(m_i, f_hat(v_I))


def pirl_loss(logits_g: jax.Array, logits_f: jax.Array, *, kind: str = 'nce',
              z: jax.Array | float | None = None, num_examples: int | None = None,
              lam: float = 0.5) -> PIRLLoss:
  """``lam * L(g) + (1 - lam) * L(f)``, both terms scored against the memory rows.

  Args:
    logits_g: ``(B, K + 1)`` scores of the jigsaw embedding g_hat (``contrastive_scores``).
    logits_f: ``(B, K + 1)`` scores of the image embedding f_hat.
    kind: ``'nce'`` or ``'infonce'``.
    z: NCE normaliser (required for ``'nce'``, ignored for ``'infonce'``).
    num_examples: N (required for ``'nce'``).
    lam: Weight of the jigsaw term (0.5 in the paper).

  Returns:
    ``PIRLLoss(total, jigsaw, image)`` scalars.

  Raises:
    ValueError: Unknown ``kind`` or missing NCE arguments.
  """
  if kind == 'nce':
    if z is None or num_examples is None:
      raise ValueError("loss kind 'nce' needs z and num_examples")
    loss_fn = lambda l: nce_loss(l, z, num_examples)
  elif kind == 'infonce':
    loss_fn = infonce_loss
  else:
    raise ValueError(f'Unknown loss kind {kind!r}; valid: {", ".join(LOSS_KINDS)}')
  loss_g = loss_fn(logits_g)
  loss_f = loss_fn(logits_f)
  return PIRLLoss(total=lam * loss_g + (1.0 - lam) * loss_f, jigsaw=loss_g, image=loss_f)
