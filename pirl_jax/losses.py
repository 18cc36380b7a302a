"""PIRL contrastive losses against a memory bank: scores, NCE (paper / VISSL), InfoNCE, and Z;
SimCLR's NT-Xent over the batch (`nt_xent_loss`).

All functions are pure ``jnp`` and jit-friendly. Notation: B queries, K negatives per query, D embedding
size, N dataset size, tau temperature.

Typical step (read before write; negatives fresh per term; scores from ``memory_bank.score``)::

  logits_g = memory_bank.score(g_hat, bank, index, neg_g, tau, mesh)
  logits_f = memory_bank.score(f_hat, bank, index, neg_f, tau, mesh)
  z = update_z(z, estimate_z([logits_g, logits_f], N), ema)       # NCE only; z is train state
  out = pirl_loss(logits_g, logits_f, kind='nce', z=z, num_examples=N, lam=0.5)
  bank = memory_bank.update(bank, index, f_hat, 0.5, mesh)          # after scoring

Z never receives gradients (``stop_gradient``); nor do the bank rows (``memory_bank``).
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


def infonce_loss(logits: jax.Array) -> jax.Array:
  """Softmax cross-entropy with target 0 (the positive), mean over the batch.

  Args:
    logits: ``(B, K + 1)`` scores, column 0 the positive.

  Returns:
    Scalar float32 loss.
  """
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])


def nce_loss(
    logits: jax.Array, z: jax.Array | float, num_examples: int, eps: float = 0.0
) -> jax.Array:
  """NCE loss of the paper / VISSL ``nce_loss_with_memory`` (negatives summed, batch averaged).

  With ``x_j = exp(s_j) / Z``, ``P_n = 1/N`` and ``K`` negatives:
  ``h_pos = x_0 / (x_0 + K P_n + eps)``, ``h_neg_j = K P_n / (x_j + K P_n + eps)`` and
  ``L = -mean_b[log h_pos + sum_j log h_neg_j]``, evaluated in log space (log-sum-exp) so that
  large logits or a small Z cannot overflow. VISSL adds ``eps = 1e-7`` to the denominators.

  Args:
    logits: ``(B, K + 1)`` scores, column 0 the positive.
    z: The normalising constant Z (> 0); treated as a constant (stop-gradient).
    num_examples: N, the dataset size (noise distribution P_n = 1/N).
    eps: Added to every denominator (0: the paper's formula).

  Returns:
    Scalar float32 loss.
  """
  logits = logits.astype(jnp.float32)
  num_negatives = logits.shape[1] - 1
  log_x = logits - jnp.log(jax.lax.stop_gradient(jnp.asarray(z, jnp.float32)))
  log_kpn = jnp.log(jnp.float32(num_negatives)) - jnp.log(jnp.float32(num_examples))
  if eps > 0:
    # log(x + K P_n + eps) for every entry, without leaving log space.
    log_rest = jnp.logaddexp(log_kpn, jnp.log(jnp.float32(eps)))
    log_denominator = jnp.logaddexp(log_x, log_rest)
  else:
    log_denominator = jnp.logaddexp(log_x, log_kpn)
  log_h_pos = log_x[:, 0] - log_denominator[:, 0]
  log_h_neg = log_kpn - log_denominator[:, 1:]
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
  jigsaw: jax.Array | None  # L(m_i, g_hat(v_It)); None without a jigsaw view
  image: jax.Array  # L(m_i, f_hat(v_I))


def pirl_loss(
    logits_g: jax.Array,
    logits_f: jax.Array,
    *,
    kind: str = 'nce',
    z: jax.Array | float | None = None,
    num_examples: int | None = None,
    lam: float = 0.5,
    nce_eps: float = 0.0,
) -> PIRLLoss:
  """``lam * L(g) + (1 - lam) * L(f)``, both terms scored against the memory rows.

  Args:
    logits_g: ``(B, K + 1)`` scores of the jigsaw embedding g_hat, or None for the image term
      alone (NPID; `lam` is then unused and `jigsaw` is None).
    logits_f: ``(B, K + 1)`` scores of the image embedding f_hat.
    kind: ``'nce'`` or ``'infonce'``.
    z: NCE normaliser (required for ``'nce'``, ignored for ``'infonce'``).
    num_examples: N (required for ``'nce'``).
    lam: Weight of the jigsaw term (0.5 in the paper).
    nce_eps: see `nce_loss`.

  Returns:
    ``PIRLLoss(total, jigsaw, image)`` scalars.

  Raises:
    ValueError: Unknown ``kind`` or missing NCE arguments.
  """
  if kind == 'nce':
    if z is None or num_examples is None:
      raise ValueError("loss kind 'nce' needs z and num_examples")
    loss_fn = lambda l: nce_loss(l, z, num_examples, nce_eps)
  elif kind == 'infonce':
    loss_fn = infonce_loss
  else:
    raise ValueError(f'Unknown loss kind {kind!r}; valid: {", ".join(LOSS_KINDS)}')
  loss_f = loss_fn(logits_f)
  if logits_g is None:  # no jigsaw view (NPID): the image term is the loss
    return PIRLLoss(total=loss_f, jigsaw=None, image=loss_f)
  loss_g = loss_fn(logits_g)
  return PIRLLoss(total=lam * loss_g + (1.0 - lam) * loss_f, jigsaw=loss_g, image=loss_f)


def nt_xent_loss(
    embeddings: jax.Array, temperature: float, precision=jax.lax.Precision.HIGHEST
) -> tuple[jax.Array, dict]:
  """SimCLR's NT-Xent over a batch of view pairs, mean over all 2B views.

  Each view's positive is its partner, its negatives the other 2B - 2 views of the (global)
  batch: ``l_i = -log(exp(s_i,p(i)) / sum_{j != i} exp(s_ij))`` with ``s_ij = <z_i, z_j> / tau``.

  Args:
    embeddings: ``(2B, D)`` L2-normalised, rows 2i and 2i + 1 the two views of example i (a
      device's share of the batch keeps both views of its examples).
    temperature: tau.
    precision: matmul precision (HIGHEST: TF32 would perturb logits of ~1/tau scale).

  Returns:
    (scalar float32 loss, metrics: mean positive and negative similarity).
  """
  z = embeddings.astype(jnp.float32)
  count = z.shape[0]
  if count % 2:
    raise ValueError(f'nt_xent_loss needs pairs of views (an even count), got {count} rows')
  similarity = jnp.einsum('id,jd->ij', z, z, precision=precision)
  self_pair = jnp.eye(count, dtype=bool)
  logits = jnp.where(self_pair, -jnp.inf, similarity / temperature)
  partner = jnp.arange(count) ^ 1
  positive = jnp.take_along_axis(similarity, partner[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive / temperature)
  negatives = ~self_pair & (jnp.arange(count)[None, :] != partner[:, None])
  metrics = {
      'positive_similarity': jnp.mean(positive),
      'negative_similarity': jnp.sum(jnp.where(negatives, similarity, 0.0)) / (count * (count - 2)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
