"""Losses against straightforward float64 NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pirl_jax import losses
from pirl_jax import memory_bank

B, K, D, N = 4, 6, 8, 20


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def setup():
  rs = np.random.RandomState(0)
  bank = _unit(rs.randn(N, D)).astype(np.float32)
  query = _unit(rs.randn(B, D)).astype(np.float32)
  positives = rs.choice(N, B, replace=False).astype(np.int32)
  negatives = rs.randint(0, N, (B, K)).astype(np.int32)
  return bank, query, positives, negatives


def _ref_scores(bank, query, positives, negatives, tau):
  out = np.zeros((len(query), negatives.shape[1] + 1))
  for b in range(len(query)):
    q = query[b].astype(np.float64)
    out[b, 0] = np.dot(bank[positives[b]].astype(np.float64), q) / tau
    for j, n in enumerate(negatives[b]):
      out[b, j + 1] = np.dot(bank[n].astype(np.float64), q) / tau
  return out


def _ref_infonce(logits):
  total = 0.0
  for row in logits:
    total += -math.log(math.exp(row[0]) / sum(math.exp(s) for s in row))
  return total / len(logits)


def _ref_nce(logits, z, n, eps=0.0):
  k = logits.shape[1] - 1
  pn = 1.0 / n
  total = 0.0
  for row in logits:
    x = [math.exp(s) / z for s in row]
    term = math.log(x[0] / (x[0] + k * pn + eps))
    for xj in x[1:]:
      term += math.log(k * pn / (xj + k * pn + eps))
    total += term
  return -total / len(logits)


def test_l2_normalize():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(losses.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(losses.l2_normalize(v)))(x)
  assert np.all(np.isfinite(grad))


def test_infonce_matches_reference(setup):
  bank, query, positives, negatives = setup
  ref_logits = _ref_scores(bank, query, positives, negatives, 0.1)
  loss = losses.infonce_loss(jnp.asarray(ref_logits, jnp.float32))
  np.testing.assert_allclose(loss, _ref_infonce(ref_logits), rtol=1e-5)


@pytest.mark.parametrize('tau', [0.07, 0.5])
def test_nce_matches_reference(setup, tau):
  bank, query, positives, negatives = setup
  ref_logits = _ref_scores(bank, query, positives, negatives, tau)
  z = N * np.exp(ref_logits).mean()
  loss = losses.nce_loss(jnp.asarray(ref_logits, jnp.float32), jnp.float32(z), N)
  np.testing.assert_allclose(loss, _ref_nce(ref_logits, z, N), rtol=1e-5)
  # A Z far from the estimate still matches (exercises both tails of the softplus form).
  for z_other in (z * 1e-3, z * 1e3):
    loss = losses.nce_loss(jnp.asarray(ref_logits, jnp.float32), z_other, N)
    np.testing.assert_allclose(loss, _ref_nce(ref_logits, z_other, N), rtol=1e-5)


@pytest.mark.parametrize('eps', [1e-7, 0.5])
def test_nce_with_vissl_epsilon_matches_reference(setup, eps):
  bank, query, positives, negatives = setup
  logits = _ref_scores(bank, query, positives, negatives, 0.07).astype(np.float32)
  got = losses.nce_loss(jnp.asarray(logits), 3.0, N, eps=eps)
  np.testing.assert_allclose(got, _ref_nce(logits.astype(np.float64), 3.0, N, eps), rtol=1e-5)
  assert np.isfinite(float(losses.nce_loss(jnp.asarray(logits) * 100, 1e-30, N, eps=eps)))


def test_nce_is_finite_for_extreme_logits():
  logits = jnp.asarray([[200.0, -200.0, 150.0], [-300.0, 300.0, 0.0]])
  loss = losses.nce_loss(logits, 1e-30, 10)
  grad = jax.grad(lambda l: losses.nce_loss(l, 1e-30, 10))(logits)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_estimate_z(setup):
  rs = np.random.RandomState(1)
  a = rs.randn(B, K + 1).astype(np.float32)
  b = rs.randn(3, K + 1).astype(np.float32)
  np.testing.assert_allclose(losses.estimate_z(jnp.asarray(a), N), N * np.exp(a).mean(), rtol=1e-5)
  both = np.concatenate([np.exp(a).ravel(), np.exp(b).ravel()])
  np.testing.assert_allclose(
      losses.estimate_z([jnp.asarray(a), jnp.asarray(b)], N), N * both.mean(), rtol=1e-5
  )


def test_update_z():
  assert float(losses.update_z(-1.0, 5.0, ema=0.0)) == 5.0  # uninitialised takes the estimate
  assert float(losses.update_z(-1.0, 5.0, ema=0.3)) == 5.0
  assert float(losses.update_z(2.0, 5.0, ema=0.0)) == 2.0  # frozen
  np.testing.assert_allclose(losses.update_z(2.0, 5.0, ema=0.1), 0.9 * 2.0 + 0.1 * 5.0, rtol=1e-6)
  jitted = jax.jit(losses.update_z, static_argnums=2)
  assert float(jitted(jnp.float32(-1.0), jnp.float32(7.0), 0.0)) == 7.0
  with pytest.raises(ValueError, match='ema'):
    losses.update_z(1.0, 1.0, ema=1.5)


@pytest.mark.parametrize('kind', ['nce', 'infonce'])
def test_gradient_reaches_query_not_bank(setup, kind):
  bank, query, positives, negatives = setup

  def loss_fn(q, m, z):
    logits = memory_bank.score(q, m, jnp.asarray(positives), jnp.asarray(negatives), 0.07)
    return losses.pirl_loss(logits, logits, kind=kind, z=z, num_examples=N).total

  gq, gm, gz = jax.grad(loss_fn, argnums=(0, 1, 2))(
      jnp.asarray(query), jnp.asarray(bank), jnp.float32(3.0)
  )
  assert np.abs(np.asarray(gq)).max() > 1e-3
  np.testing.assert_array_equal(gm, 0.0)
  np.testing.assert_array_equal(gz, 0.0)


def test_pirl_loss_combination(setup):
  bank, query, positives, negatives = setup
  rs = np.random.RandomState(2)
  lg = rs.randn(B, K + 1).astype(np.float32) * 3
  lf = rs.randn(B, K + 1).astype(np.float32) * 3
  out = losses.pirl_loss(
      jnp.asarray(lg), jnp.asarray(lf), kind='nce', z=2.0, num_examples=N, lam=0.3
  )
  np.testing.assert_allclose(out.jigsaw, _ref_nce(lg, 2.0, N), rtol=1e-5)
  np.testing.assert_allclose(out.image, _ref_nce(lf, 2.0, N), rtol=1e-5)
  np.testing.assert_allclose(out.total, 0.3 * out.jigsaw + 0.7 * out.image, rtol=1e-6)
  out = losses.pirl_loss(jnp.asarray(lg), jnp.asarray(lf), kind='infonce')
  np.testing.assert_allclose(out.total, 0.5 * _ref_infonce(lg) + 0.5 * _ref_infonce(lf), rtol=1e-5)
  with pytest.raises(ValueError, match='z and num_examples'):
    losses.pirl_loss(jnp.asarray(lg), jnp.asarray(lf), kind='nce')
  with pytest.raises(ValueError, match='kind'):
    losses.pirl_loss(jnp.asarray(lg), jnp.asarray(lf), kind='hinge')
