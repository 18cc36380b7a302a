"""Memory bank: init, negative sampling, read and write, checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pirl_jax import memory_bank as mb
from pirl_jax import sharding as sharding_lib


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
  with pytest.raises(ValueError, match="num_rows"):
    mb.init_bank(jax.random.key(0), 10, num_rows=8)


N = 10


@pytest.fixture(scope="module")
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
  neg = np.asarray(
      mb.sample_negatives(jax.random.key(1), positives, 2000, N, exclude_positive=False)
  )
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


def test_update_matches_numpy_and_leaves_other_rows():
  rs = np.random.RandomState(0)
  num_examples, rows, dim = 8, 12, 5
  bank = np.asarray(mb.init_bank(jax.random.key(3), num_examples, dim=dim, num_rows=rows))
  idx = np.array([6, 1, 3])
  emb = rs.randn(3, dim)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  new = np.asarray(
      mb.update(jnp.asarray(bank), jnp.asarray(idx), jnp.asarray(emb, jnp.float32), momentum=0.5)
  )

  expected = bank.astype(np.float64).copy()
  for i, row in zip(idx, emb):
    m = 0.5 * expected[i] + 0.5 * row
    expected[i] = m / np.linalg.norm(m)
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new[idx], axis=1), 1.0, rtol=1e-5)
  untouched = np.setdiff1d(np.arange(rows), idx)
  np.testing.assert_array_equal(new[untouched], bank[untouched])  # padded rows stay zero too

  # Other momentum, and no gradient reaches the embeddings through the bank.
  new9 = np.asarray(
      mb.update(jnp.asarray(bank), jnp.asarray(idx), jnp.asarray(emb, jnp.float32), momentum=0.9)
  )
  m = 0.9 * bank[6].astype(np.float64) + 0.1 * emb[0]
  np.testing.assert_allclose(new9[6], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda e: jnp.sum(mb.update(jnp.asarray(bank), jnp.asarray(idx), e)))(
      jnp.asarray(emb, jnp.float32)
  )
  np.testing.assert_array_equal(grad, 0.0)


# --- Scoring and writing on a mesh: the bank stays row-sharded -----------------------------------


def _scoring_setup(num_examples=203, dim=16, batch=16, num_negatives=30):
  rs = np.random.RandomState(0)
  bank = mb.init_bank(jax.random.key(0), num_examples, dim, mb.padded_size(num_examples, 8))
  query = rs.randn(batch, dim).astype(np.float32)
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  positives = rs.permutation(num_examples)[:batch].astype(np.int32)
  negatives = np.asarray(
      mb.sample_negatives(jax.random.key(1), jnp.asarray(positives), num_negatives, num_examples)
  )
  return np.asarray(bank), query, positives, negatives


def _on_mesh(num_devices, bank, *batch_arrays):
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  placed = [jax.device_put(bank, sharding_lib.bank_sharding(mesh))]
  placed += [jax.device_put(x, sharding_lib.batch_sharding(mesh)) for x in batch_arrays]
  return mesh, placed


@pytest.mark.parametrize("num_devices,chunk_size", [(1, 1024), (1, 7), (8, 7), (8, 1024)])
def test_scores_equal_numpy_on_any_device_count_and_chunk(num_devices, chunk_size):
  bank, query, positives, negatives = _scoring_setup()
  idx = np.concatenate([positives[:, None], negatives], axis=1)
  expected = np.einsum("bkd,bd->bk", bank[idx].astype(np.float64), query.astype(np.float64))
  mesh, (b, q, p, n) = _on_mesh(num_devices, bank, query, positives, negatives)
  logits = jax.jit(lambda q, b, p, n: mb.score(q, b, p, n, 0.07, mesh, chunk_size))(q, b, p, n)
  assert logits.shape == (16, 31) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), expected / 0.07, rtol=1e-5, atol=1e-5)
  # Plain arrays, no mesh: the same scores.
  np.testing.assert_allclose(
      np.asarray(
          mb.score(
              jnp.asarray(query),
              jnp.asarray(bank),
              jnp.asarray(positives),
              jnp.asarray(negatives),
              0.07,
              chunk_size=chunk_size,
          )
      ),
      expected / 0.07,
      rtol=1e-5,
      atol=1e-5,
  )


@pytest.mark.parametrize("num_devices", [1, 8])
def test_score_gradient_reaches_the_query_only_and_equals_dense_autodiff(num_devices):
  bank, query, positives, negatives = _scoring_setup()
  idx = jnp.asarray(np.concatenate([positives[:, None], negatives], axis=1))

  def dense(q, m):
    rows = jax.lax.stop_gradient(m)[idx]
    return jnp.einsum("bkd,bd->bk", rows, q, precision=jax.lax.Precision.HIGHEST) / 0.07

  def loss(scores):
    return jnp.sum(jnp.sin(scores))  # any nonlinear function of every score

  expected_q = jax.grad(lambda q: loss(dense(q, jnp.asarray(bank))))(jnp.asarray(query))
  mesh, (b, q, p, n) = _on_mesh(num_devices, bank, query, positives, negatives)
  grad_q, grad_bank = jax.jit(
      jax.grad(lambda q, m: loss(mb.score(q, m, p, n, 0.07, mesh, 7)), argnums=(0, 1))
  )(q, b)
  np.testing.assert_allclose(np.asarray(grad_q), np.asarray(expected_q), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(grad_bank), 0.0)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_update_on_a_mesh_writes_only_the_batch_rows_and_keeps_the_sharding(num_devices):
  bank, query, positives, _ = _scoring_setup()
  mesh, (b, q, p) = _on_mesh(num_devices, bank, query, positives)
  new = jax.jit(lambda b, p, q: mb.update(b, p, q, 0.5, mesh))(b, p, q)
  expected = bank.astype(np.float64).copy()
  rows = 0.5 * expected[positives] + 0.5 * query
  expected[positives] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-5, atol=1e-6)
  assert new.sharding.spec == sharding_lib.bank_sharding(mesh).spec


def _compiled_step(num_examples, num_negatives, batch, chunk_size):
  """The real train step (tiny trunk, tiny views, so that activations do not hide the bank),
  lowered and compiled for 8 devices from shapes only: nothing is allocated or run."""
  from configs import pirl as pirl_configs  # pylint: disable=g-import-not-at-top
  from pirl_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from pirl_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  config = pirl_configs.get_config("tiny")
  config.loss.num_negatives, config.global_batch_size = num_negatives, batch
  views = config.data.views
  views.image_size, views.jigsaw_crop_size, views.tile_size = 16, 24, 8
  mesh = sharding_lib.create_mesh(jax.devices())
  model = state_lib.create_model(config.model)
  tx, lr = state_lib.create_optimizer(config.optim, 0.1, 0, 1000)
  abstract, shardings = state_lib.abstract_train_state(config, model, tx, num_examples, mesh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
  rows = sharding_lib.batch_sharding(mesh)
  batch_shapes = {
      "image": jax.ShapeDtypeStruct((batch, 16, 16, 3), jnp.float32, sharding=rows),
      "tiles": jax.ShapeDtypeStruct((batch, 9, 8, 8, 3), jnp.float32, sharding=rows),
      "index": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
  }
  step = step_lib.jit_train_step(
      mesh,
      shardings,
      model=model,
      tx=tx,
      schedule=lr,
      loss_cfg=config.loss,
      bank_momentum=0.5,
      num_examples=num_examples,
      score_chunk_size=chunk_size,
  )
  compiled = step.lower(abstract, batch_shapes).compile()
  return compiled, abstract.bank


def test_imagenet_sized_bank_is_never_gathered_in_the_compiled_step():
  """N=1.28M rows, K=32000 negatives, global batch 256, 8 devices: no collective moves as much
  as one device's share of the bank, and the step's temporaries stay under a quarter of it."""
  compiled, bank = _compiled_step(1_281_167, 32_000, 256, chunk_size=256)
  bank_bytes = int(np.prod(bank.shape)) * 4
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  collectives = common.collective_bytes(compiled.as_text())
  assert collectives, "the step on 8 devices must communicate"
  largest = max(collectives, key=lambda c: c[2])
  assert largest[2] < bank_bytes / 8, largest
  temporaries = compiled.memory_analysis().temp_size_in_bytes
  assert temporaries < 0.25 * bank_bytes, (temporaries, bank_bytes)
