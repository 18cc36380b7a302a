"""Frozen-trunk probes as an evaluator: kNN and a linear classifier on pooled trunk features.

Inside pretraining, `ProbeEvaluator` runs every `config.eval_every_steps` and at the end, giving
every run a learning curve (TensorBoard `probe/*`, `summary.json`); `python -m
pirl_jax.commands.probe` runs it on any checkpoint and labelled images.

Protocol: the eval view of every image (short side resized to the input size, centre crop),
BatchNorm in inference mode with each trunk's own statistics, pooled res5 features. kNN: cosine
similarity, the k nearest index images vote with weight exp(similarity / 0.07). Linear:
logistic regression on standardised features, classes weighted by inverse frequency.
"""

from __future__ import annotations

from absl import logging
import jax
import numpy as np

from pirl_jax import trunk_init
from pirl_jax import user_errors
from pirl_jax.data import labelled_input
from pirl_jax.data import labelled_views
from pirl_jax.data import pipeline
from pirl_jax.data import probe_data
from pirl_jax.eval import features
from pirl_jax.eval import probes
from pirl_jax.eval import tile_pathway


def trunk_variables(state) -> dict:
  """The trunk's {'params', 'batch_stats'} of a pretraining or fine-tuning state."""
  return {
      "params": state.params[trunk_init.TRUNK],
      "batch_stats": state.batch_stats[trunk_init.TRUNK],
  }


def _check_sets(sets: probe_data.ProbeSets, probe_cfg, knn_k_field: str) -> None:
  """Refuses probes whose scores would be silently different from what was asked: a kNN over
  fewer neighbours than probe.knn_k, or AUCs that are undefined (NaN) on the queries."""
  where = f"the probe's data ({sets.description})"
  if probe_cfg.knn_k > len(sets.index.label):
    raise user_errors.UserError(
        f"{knn_k_field}={probe_cfg.knn_k} is larger than the probe's index, "
        f"{len(sets.index.label)} labelled images in {where}: set {knn_k_field} <= "
        f"{len(sets.index.label)}."
    )
  for role, images in (("index", sets.index), ("query", sets.query)):
    present = sorted(set(np.asarray(images.label).tolist()))
    if len(present) < 2:
      only = sets.class_names[present[0]] if present else "no class"
      raise user_errors.UserError(
          f"The probe's {role} images hold only {only!r} ({len(images.label)} images in "
          f"{where}): kNN, logistic regression and ROC AUC need at least two classes; label "
          "more classes or choose another split."
      )
  query = np.asarray(sets.query.label)
  for name in sets.scored:
    c = sets.class_names.index(name)
    if (query == c).all() or not (query == c).any():
      raise user_errors.UserError(
          f"The probe's queries ({len(query)} images in {where}) have no "
          f"{'negatives' if (query == c).all() else 'examples'} of {name!r}: its ROC AUC is "
          "undefined; choose a query split that holds both."
      )


class ProbeEvaluator:
  """kNN and linear-probe scores of a state's trunk on one `probe_data.ProbeSets`."""

  name = "probe"

  def __init__(
      self,
      sets: probe_data.ProbeSets,
      trunk,
      image_size: int,
      mesh,
      probe_cfg,
      *,
      num_parallel_calls: int = -1,
      knn_k_field: str = "config.probe.knn_k",
  ):
    _check_sets(sets, probe_cfg, knn_k_field)
    self.sets = sets
    self.mesh = mesh
    self.cfg = probe_cfg
    view = labelled_views.AugmentConfig(
        image_size=image_size, eval_crop_fraction=probe_cfg.eval_crop_fraction
    )
    # The eval batch must split over the devices and the processes.
    batch = -(-probe_cfg.batch_size // mesh.size) * mesh.size
    self.view, self.global_batch_size = view, batch
    self._inputs = {
        name: labelled_input.EvalInput(
            images,
            view,
            global_batch_size=batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_parallel_calls=num_parallel_calls,
        )
        for name, images in (("index", sets.index), ("query", sets.query))
    }
    self._features = features.feature_fn(trunk, mesh)

  def features(self, variables) -> tuple[np.ndarray, np.ndarray]:
    """(index, query) pooled features of the trunk `variables`."""
    return tuple(
        features.extract(self._features, variables, self._inputs[name], self.mesh)
        for name in ("index", "query")
    )

  def scores(self, index_features: np.ndarray, query_features: np.ndarray) -> dict[str, float]:
    """{'knn_auc_mean', 'knn_accuracy', 'knn_auc_<class>', 'linear_...'} on the queries."""
    sets, cfg = self.sets, self.cfg
    num_classes = len(sets.class_names)
    probabilities = {
        "knn": probes.knn_probabilities(
            index_features,
            sets.index.label,
            query_features,
            num_classes,
            k=cfg.knn_k,
            temperature=cfg.knn_temperature,
        ),
        "linear": probes.linear_probe_probabilities(
            index_features,
            sets.index.label,
            query_features,
            num_classes,
            regularization=cfg.linear_regularization,
        ),
    }
    out = {}
    for kind, probs in probabilities.items():
      metrics = probes.classification_metrics(
          sets.query.label, probs, sets.class_names, sets.scored
      )
      out.update({f"{kind}_{k}": v for k, v in metrics.items()})
    return out

  def run(self, state) -> dict[str, float]:
    return self.scores(*self.features(trunk_variables(state)))

  def describe(self, metrics: dict[str, float]) -> str:
    return (
        f"kNN AUC {metrics['knn_auc_mean']:.4f} acc {metrics['knn_accuracy']:.3f} | "
        f"linear AUC {metrics['linear_auc_mean']:.4f} acc {metrics['linear_accuracy']:.3f}"
    )


def probe_sets(data_cfg, probe_cfg) -> probe_data.ProbeSets | None:
  """The labelled images a pretraining run's probes use, or None when its data has no labels."""
  source = data_cfg.source
  if probe_cfg.tfds_name:
    return probe_data.load_tfds(
        probe_cfg.tfds_name,
        probe_cfg.index_split,
        probe_cfg.query_split,
        data_cfg,
        probe_cfg.tfds_label,
    )
  if source in ("synthetic", "isic"):
    return probe_data.load_isic(data_cfg, probe_cfg.index_split, probe_cfg.query_split)
  if source == "folder" and probe_data.has_labels(data_cfg.path, probe_cfg.labels):
    return probe_data.load_folder(
        data_cfg.path, probe_cfg.labels, data_cfg, probe_cfg.query_fraction, seed=0
    )
  return None


def evaluators_for_pretraining(config, model, mesh) -> list:
  """The probe evaluators of a pretraining run (empty when disabled or without labels): the
  image probe and, with `probe.tile_pathway`, the tile pathway's (`tile_pathway`)."""
  if not config.probe.enabled:
    return []
  sets = probe_sets(config.data, config.probe)
  if sets is None:
    logging.info(
        "No labels to probe the trunk with: set config.probe.labels (a CSV "
        "'file,label' for data.path), put each class's images in a subfolder of its "
        "own, or set config.probe.tfds_name for kNN and linear-probe learning curves."
    )
    return []
  logging.info("Probes: %s.", probe_data.describe_sets(sets))
  image_size = config.probe.image_size or config.data.views.image_size
  image_probe = ProbeEvaluator(
      sets,
      model.trunk,
      image_size,
      mesh,
      config.probe,
      num_parallel_calls=config.data.num_parallel_calls,
  )
  if not config.probe.get("tile_pathway", False):
    return [image_probe]
  tiles = tile_pathway.TilePathwayEvaluator(
      image_probe,
      model,
      pipeline.view_config(config.data.views),
      mesh,
      retrieval=config.method == "pirl",
      num_parallel_calls=config.data.num_parallel_calls,
  )
  return [image_probe, tiles]
