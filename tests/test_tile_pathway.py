"""The tile pathway's diagnostics (pirl_jax/eval/tile_pathway.py) and the eval tiles they use.

* the tile bag and g->f retrieval against NumPy double loops on fixed features;
* the deterministic eval tiles are the centre squares of the crop's cells, in row-major order;
* inside pretraining the evaluator writes its metrics to the summary (and for NPID, no
  retrieval: it has no g).
"""

import numpy as np
import pytest
import tensorflow as tf

from pirl_jax.data import augment
from pirl_jax.data import jigsaw
from pirl_jax.eval import tile_pathway


def test_tile_bag_is_the_mean_of_the_tiles_features():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(5, 9, 7))
  expected = np.zeros((5, 7))
  for i in range(5):
    for k in range(9):
      expected[i] += features[i, k] / 9
  np.testing.assert_allclose(tile_pathway.tile_bag(features), expected, rtol=1e-12, atol=1e-12)


def _ranks_double_loop(g, f):
  ranks = []
  for i in range(len(g)):
    cos = lambda a, b: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    true = cos(g[i], f[i])
    ranks.append(1 + sum(1 for j in range(len(f)) if cos(g[i], f[j]) > true + 1e-12))
  return np.array(ranks)


def test_retrieval_ranks_against_a_double_loop():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(40, 6))
  g = f + rng.normal(scale=1.5, size=f.shape)  # related, not identical
  ranks = tile_pathway.retrieval_ranks(g * 3.0, f)  # the scale of g does not matter
  np.testing.assert_array_equal(ranks, _ranks_double_loop(g, f))
  assert 1 < np.median(ranks) < 20  # neither perfect nor chance: the test has something to see
  metrics = tile_pathway.retrieval_metrics(ranks)
  assert metrics["retrieval_top1"] == pytest.approx(np.mean(ranks == 1))
  assert metrics["retrieval_median_rank"] == np.median(ranks)
  assert metrics["retrieval_candidates"] == 40
  # g equal to f: every image first; g unrelated: about half way.
  assert tile_pathway.retrieval_metrics(tile_pathway.retrieval_ranks(f, f))["retrieval_top1"] == 1
  far = tile_pathway.retrieval_ranks(rng.normal(size=(400, 6)), rng.normal(size=(400, 6)))
  assert 150 < np.median(far) < 250


def test_shuffle_orders_are_fixed_permutations():
  orders = tile_pathway.shuffle_orders(50, 9)
  np.testing.assert_array_equal(orders, tile_pathway.shuffle_orders(50, 9))
  assert all(sorted(o) == list(range(9)) for o in orders)
  assert len({tuple(o) for o in orders}) > 40


def test_eval_tiles_are_the_centre_squares_of_the_cells():
  cfg = jigsaw.ViewConfig(
      image_size=32, jigsaw_crop_size=36, tile_size=10, mean=(0, 0, 0), std=(1, 1, 1)
  )
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, size=(36, 48, 3), dtype=np.uint8)  # short side = the crop size
  tiles = jigsaw.eval_tiles(tf.constant(image), cfg).numpy()
  assert tiles.shape == (9, 10, 10, 3)
  crop = image[:, 6:42].astype(np.float64) / 255.0  # the centre 36 x 36
  for k in range(9):
    r, c = divmod(k, 3)
    expected = crop[r * 12 + 1 : r * 12 + 11, c * 12 + 1 : c * 12 + 11]
    np.testing.assert_allclose(tiles[k], expected, atol=1e-5)
  # Normalised as the jigsaw view: the default mean and std.
  default = jigsaw.ViewConfig(image_size=32, jigsaw_crop_size=36, tile_size=10)
  normalised = jigsaw.eval_tiles(tf.constant(image), default).numpy()
  mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
  np.testing.assert_allclose(normalised, (tiles - mean) / std, atol=1e-4)


def test_pretraining_reports_the_tile_pathway(tiny_pretraining):
  summary = tiny_pretraining.summary
  tiles = summary["evaluations"]["tiles"]
  for key in (
      "tilebag_knn_auc_mean",
      "tilebag_linear_auc_mean",
      "retrieval_top1",
      "retrieval_median_rank",
  ):
    assert np.isfinite(tiles[key]), key
  assert tiles["retrieval_candidates"] > 1
  assert 1 <= tiles["retrieval_median_rank"] <= tiles["retrieval_candidates"]
  assert [h["step"] for h in summary["evaluation_history"]] == [2, 4]
  assert all("tiles" in h for h in summary["evaluation_history"])


def test_the_probe_command_reports_the_same_tile_pathway(tiny_pretraining, shared_cache_dir):
  """The standalone probe scores a workdir's tile pathway as the loop did at its last step, and
  a random network next to it."""
  from pirl_jax.commands import probe  # pylint: disable=g-import-not-at-top

  result = probe.run_probe(str(tiny_pretraining.workdir), cache_dir=str(shared_cache_dir))
  trained, random = result["results"].values()
  in_loop = tiny_pretraining.summary["evaluations"]["tiles"]
  for key, value in in_loop.items():
    assert trained[key] == pytest.approx(value, abs=1e-6), key
  assert set(in_loop) <= set(random)
  assert "tile bag kNN AUC mean" in result["table"] and "g->f median rank" in result["table"]
