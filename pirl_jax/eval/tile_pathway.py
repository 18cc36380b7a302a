"""What the tile pathway of a pretraining run has learned: the tile-bag probe and g->f retrieval.

PIRL's jigsaw term trains the trunk on tiles and pulls g(tiles) towards the memory-bank row of
the image. Whether that pathway learns anything is invisible in the image probes; these two
measures show it on every learning curve (TensorBoard `tiles/*`, `summary.json`):

* **Tile bag**: the kNN and linear probes (`ProbeEvaluator.scores`, the same index and queries as
  the image probe) on the mean of the trunk's pooled features of an image's nine tiles (the
  deterministic eval tiles, `jigsaw.eval_tiles`). A trunk that learned nothing from tiles scores
  at a random trunk's level.
* **g -> f retrieval** (PIRL only): for each query image, ĝ of its tiles in a fixed shuffled order
  ranks the f̂ of all query images by cosine similarity; `retrieval_top1` is the fraction where
  the true image comes first, `retrieval_median_rank` the median rank of the true image (1 =
  first; chance is about half the number of queries).

Each pass is evaluated with its own running statistics: the trunk and g on tiles with the tile
pass's (`TrainState.tile_batch_stats`), f on images with the image pass's (`batch_stats`).
"""

from __future__ import annotations

import types

import jax
import numpy as np

from pirl_jax import sharding as sharding_lib
from pirl_jax.data import jigsaw
from pirl_jax.data import labelled_input
from pirl_jax.data import probe_data
from pirl_jax.train import state as state_lib

PERMUTATION_SEED = 0


def tile_bag(tile_features: np.ndarray) -> np.ndarray:
  """(N, n, F) features of each image's n tiles -> (N, F), their mean."""
  return np.asarray(tile_features, np.float64).mean(axis=1)


def retrieval_ranks(g_hat: np.ndarray, f_hat: np.ndarray) -> np.ndarray:
  """(N,) rank of f_i among all f_j by cosine similarity to g_i (1 = first).

  Ties are resolved in the true image's favour (only strictly more similar images count ahead).
  """
  g = np.asarray(g_hat, np.float64)
  f = np.asarray(f_hat, np.float64)
  g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  similarity = g @ f.T
  return 1 + np.sum(similarity > np.diag(similarity)[:, None], axis=1)


def retrieval_metrics(ranks: np.ndarray) -> dict[str, float]:
  ranks = np.asarray(ranks)
  return {
      "retrieval_top1": float(np.mean(ranks == 1)),
      "retrieval_median_rank": float(np.median(ranks)),
      "retrieval_candidates": float(len(ranks)),
  }


def shuffle_orders(count: int, num_tiles: int, seed: int = PERMUTATION_SEED) -> np.ndarray:
  """(count, num_tiles) one fixed random order of the tiles per image."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(num_tiles) for _ in range(count)]).astype(np.int32)


def state_of_arrays(arrays: dict):
  """The fields the evaluator reads from a pretraining checkpoint's arrays; one written before
  the state kept tile statistics evaluates tiles with the image pass's."""
  tile_stats = arrays.get("tile_batch_stats") or state_lib.tile_stats_of_earlier_version(arrays)
  return types.SimpleNamespace(
      params=arrays["params"], batch_stats=arrays["batch_stats"], tile_batch_stats=tile_stats
  )


def tile_variables(state) -> tuple[dict, dict]:
  """(trunk variables on tiles, network variables on tiles) of a pretraining state."""
  tile_stats = state.tile_batch_stats
  return (
      {"params": state.params["trunk"], "batch_stats": tile_stats["trunk"]},
      {"params": state.params, "batch_stats": {**state.batch_stats, **tile_stats}},
  )


class TilePathwayEvaluator:
  """The tile-bag probe (and, for PIRL, g->f retrieval) of a pretraining state."""

  name = "tiles"

  def __init__(
      self,
      probe_evaluator,
      model,
      views: jigsaw.ViewConfig,
      mesh,
      *,
      retrieval: bool,
      num_parallel_calls: int = -1,
  ):
    """`probe_evaluator`: the run's `probe.ProbeEvaluator` (its sets, scores and eval view)."""
    self.probe = probe_evaluator
    self.model = model
    self.mesh = mesh
    self.retrieval = retrieval
    sets: probe_data.ProbeSets = probe_evaluator.sets
    batch = probe_evaluator.global_batch_size
    self._inputs = {
        name: labelled_input.EvalInput(
            images,
            probe_evaluator.view,
            global_batch_size=batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_parallel_calls=num_parallel_calls,
            tiles=lambda image: jigsaw.eval_tiles(image, views),
        )
        for name, images in (("index", sets.index), ("query", sets.query))
    }
    self._orders = shuffle_orders(len(sets.query), views.num_tiles)
    replicated, batched = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    jit = lambda fn: jax.jit(fn, in_shardings=(replicated, batched), out_shardings=replicated)

    def trunk_on_tiles(variables, tiles):
      b, n = tiles.shape[:2]
      x = model.trunk.apply(variables, tiles.reshape((b * n,) + tiles.shape[2:]), train=False)
      return x.reshape(b, n, -1)

    self._trunk_on_tiles = jit(trunk_on_tiles)
    self._g = jit(lambda v, tiles: model.apply(v, tiles, train=False, method="embed_tiles"))
    self._f = jit(lambda v, images: model.apply(v, images, train=False, method="embed_images"))

  def _outputs(self, split: str, fns: dict) -> dict[str, np.ndarray]:
    """{name: (N, ...) outputs} of `fns` {name: (fn, variables, input key, tile orders)}."""
    eval_input = self._inputs[split]
    outputs = {name: [] for name in fns}
    start = eval_input.process_index * eval_input.local_batch_size
    for batch in eval_input.batches():
      size = len(batch["mask"])
      for name, (fn, variables, key, orders) in fns.items():
        x = batch[key]
        if orders is not None:
          # This process's rows of the global batch; padding rows reuse the last order.
          rows = np.minimum(np.arange(start, start + size), len(orders) - 1)
          x = np.take_along_axis(x, orders[rows][:, :, None, None, None], axis=1)
        x = sharding_lib.global_batch({key: x}, self.mesh)[key]
        outputs[name].append(np.asarray(fn(variables, x).addressable_data(0)))
      start += eval_input.global_batch_size
    return {name: np.concatenate(v)[: eval_input.num_examples] for name, v in outputs.items()}

  def run(self, state) -> dict[str, float]:
    trunk_vars, net_tile_vars = tile_variables(state)
    net_image_vars = {"params": state.params, "batch_stats": state.batch_stats}
    bag = {"bag": (self._trunk_on_tiles, trunk_vars, "tiles", None)}
    index = self._outputs("index", bag)
    query_fns = dict(bag)
    if self.retrieval:
      query_fns["g"] = (self._g, net_tile_vars, "tiles", self._orders)
      query_fns["f"] = (self._f, net_image_vars, "image", None)
    query = self._outputs("query", query_fns)
    scores = self.probe.scores(tile_bag(index["bag"]), tile_bag(query["bag"]))
    metrics = {f"tilebag_{k}": v for k, v in scores.items()}
    if self.retrieval:
      metrics.update(retrieval_metrics(retrieval_ranks(query["g"], query["f"])))
    return metrics

  def describe(self, metrics: dict[str, float]) -> str:
    text = (
        f"tile bag kNN AUC {metrics['tilebag_knn_auc_mean']:.4f} | linear AUC "
        f"{metrics['tilebag_linear_auc_mean']:.4f}"
    )
    if "retrieval_top1" in metrics:
      text += (
          f" | g->f top-1 {metrics['retrieval_top1']:.3f} median rank "
          f"{metrics['retrieval_median_rank']:.0f} of "
          f"{metrics['retrieval_candidates']:.0f}"
      )
    return text
