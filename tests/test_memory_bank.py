"""Memory bank: init, negative sampling, read and write, checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pirl_jax import memory_bank as mb


def test_padded_size():
  assert mb.padded_size(10, 1) == 10
  assert mb.padded_size(10, 4) == 12
  assert mb.padded_size(12, 4) == 12
  assert mb.padded_size(1, 8) == 8
  with pytest.raises(ValueError):
    mb.padded_size(0, 4)


def test_init_bank_unit_rows_and_zero_padding():
  bank = np.asarray(mb.init_bank(jax.random.key(0), 10, dim=128, num_rows=16))
  assert bank.shape == (16, 128) and bank.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(bank[:10], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(bank[10:], 0.0)
  # Random directions (not all in one orthant): off-diagonal cosines are small on average.
  cos = bank[:10] @ bank[:10].T
  assert np.abs(cos[~np.eye(10, dtype=bool)]).mean() < 0.3
  assert (bank[:10] < 0).any()
  assert mb.init_bank(jax.random.key(1), 7).shape == (7, 128)
  with pytest.raises(ValueError, match='num_rows'):
    mb.init_bank(jax.random.key(0), 10, num_rows=8)


def test_validate_num_negatives():
  mb.validate_num_negatives(9, 10, exclude_positive=True)
  mb.validate_num_negatives(10, 10, exclude_positive=False)
  with pytest.raises(ValueError, match=r'loss\.num_negatives=10.*num_examples=10'):
    mb.validate_num_negatives(10, 10, exclude_positive=True)
  with pytest.raises(ValueError, match=r'loss\.num_negatives=11.*num_examples=10'):
    mb.validate_num_negatives(11, 10, exclude_positive=False)
  with pytest.raises(ValueError, match=r'loss\.num_negatives'):
    mb.validate_num_negatives(0, 10)


N = 10


@pytest.fixture(scope='module')
def draws():
  # Every dataset index appears as a positive, including the edges 0 and N-1.
  positives = jnp.asarray(np.tile(np.arange(N), 4), jnp.int32)
  neg = mb.sample_negatives(jax.random.key(0), positives, 4000, N, exclude_positive=True)
  return np.asarray(positives), np.asarray(neg)


def test_sample_negatives_excludes_positive_and_stays_in_range(draws):
  positives, neg = draws
  assert neg.shape == (len(positives), 4000) and neg.dtype == np.int32
  assert neg.min() == 0 and neg.max() == N - 1  # both ends reachable, padded rows (>= N) never
  assert not np.any(neg == positives[:, None])


def test_sample_negatives_uniform_over_the_others(draws):
  positives, neg = draws
  chi2 = []
  for p in range(N):
    rows = neg[positives == p]
    counts = np.bincount(rows.ravel(), minlength=N)
    assert counts[p] == 0
    others = np.delete(counts, p)
    expected = rows.size / (N - 1)
    chi2.append(((others - expected) ** 2 / expected).sum())
  # N-2 = 8 degrees of freedom per positive: mean 8, P(chi2 > 30) ~ 2e-4.
  assert max(chi2) < 30, chi2


def test_sample_negatives_without_exclusion_can_hit_positive():
  positives = jnp.arange(N, dtype=jnp.int32)
  neg = np.asarray(mb.sample_negatives(jax.random.key(1), positives, 2000, N,
                                       exclude_positive=False))
  assert neg.min() == 0 and neg.max() == N - 1
  assert np.all((neg == np.arange(N)[:, None]).any(axis=1))
  counts = np.bincount(neg.ravel(), minlength=N)
  expected = neg.size / N
  assert ((counts - expected) ** 2 / expected).sum() < 30


def test_sample_negatives_fresh_per_key():
  positives = jnp.arange(4, dtype=jnp.int32)
  a = mb.sample_negatives(jax.random.key(0), positives, 50, 1000)
  b = mb.sample_negatives(jax.random.key(1), positives, 50, 1000)
  assert np.mean(np.asarray(a) == np.asarray(b)) < 0.05


def test_gather_values_and_no_gradient():
  bank = jnp.asarray(np.random.RandomState(0).randn(6, 4), jnp.float32)
  idx = jnp.asarray([[0, 5], [2, 2]])
  np.testing.assert_array_equal(mb.gather(bank, idx), np.asarray(bank)[np.asarray(idx)])
  grad = jax.grad(lambda b: jnp.sum(mb.gather(b, idx) ** 2))(bank)
  np.testing.assert_array_equal(grad, 0.0)


def test_update_matches_numpy_and_leaves_other_rows():
  rs = np.random.RandomState(0)
  num_examples, rows, dim = 8, 12, 5
  bank = np.asarray(mb.init_bank(jax.random.key(3), num_examples, dim=dim, num_rows=rows))
  idx = np.array([6, 1, 3])
  emb = rs.randn(3, dim)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  new = np.asarray(mb.update(jnp.asarray(bank), jnp.asarray(idx), jnp.asarray(emb, jnp.float32),
                             momentum=0.5))

  expected = bank.astype(np.float64).copy()
  for i, row in zip(idx, emb):
    m = 0.5 * expected[i] + 0.5 * row
    expected[i] = m / np.linalg.norm(m)
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new[idx], axis=1), 1.0, rtol=1e-5)
  untouched = np.setdiff1d(np.arange(rows), idx)
  np.testing.assert_array_equal(new[untouched], bank[untouched])  # padded rows stay zero too

  # Other momentum, and no gradient reaches the embeddings through the bank.
  new9 = np.asarray(mb.update(jnp.asarray(bank), jnp.asarray(idx), jnp.asarray(emb, jnp.float32),
                              momentum=0.9))
  m = 0.9 * bank[6].astype(np.float64) + 0.1 * emb[0]
  np.testing.assert_allclose(new9[6], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda e: jnp.sum(mb.update(jnp.asarray(bank), jnp.asarray(idx), e)))(
      jnp.asarray(emb, jnp.float32))
  np.testing.assert_array_equal(grad, 0.0)
