"""ISIC 2017 Part 3 scoring: a classifier's probabilities on a split, the challenge's metrics,
the submission CSVs and the ROC plot.

`IsicEvaluator.run(state)` is an evaluator of the training loop (validation AUCs for model
selection); `IsicEvaluator.write_outputs` writes what a submission needs from the selected state.
The metrics are computed with sklearn from the probabilities exactly as written to the CSV, so
they equal what the challenge's scorer computes from that file.
"""

from __future__ import annotations

import csv
import io
import pathlib

from absl import logging
import jax
import numpy as np

from pirl_jax import sharding as sharding_lib
from pirl_jax import storage
from pirl_jax.data import labelled
from pirl_jax.data import labelled_input
from pirl_jax.data import labelled_views
from pirl_jax.data.isic import LABEL_NAMES as CLASS_NAMES

CSV_HEADER = ("image_id", "melanoma", "seborrheic_keratosis")


def _host(x: jax.Array) -> np.ndarray:
  # A replicated array is complete on every device, also on multi-host runs.
  return np.asarray(x.addressable_data(0))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
  """sklearn's ROC AUC, NaN (with a warning) when `y_true` has a single class."""
  from sklearn import metrics as sk_metrics

  if len(np.unique(y_true)) < 2:
    logging.warning("ROC AUC is undefined: only one class among %d labels.", len(y_true))
    return float("nan")
  return float(sk_metrics.roc_auc_score(y_true, score))


def split_metrics(
    split: labelled.LabelledSplit,
    melanoma: np.ndarray,
    seborrheic_keratosis: np.ndarray,
    probs: np.ndarray,
) -> dict:
  """The challenge metrics of one split.

  Args:
    split: the ground truth.
    melanoma: P(melanoma) per image, as written to the predictions CSV.
    seborrheic_keratosis: P(seborrheic keratosis) per image, as written.
    probs: (N, 3) probabilities, for accuracy and the confusion matrix.
  """
  from sklearn import metrics as sk_metrics

  auc_mel = roc_auc(split.melanoma, melanoma)
  auc_sk = roc_auc(split.seborrheic_keratosis, seborrheic_keratosis)
  predicted = np.argmax(probs, axis=-1)
  confusion = sk_metrics.confusion_matrix(split.label, predicted, labels=[0, 1, 2])
  return {
      "auc_melanoma": auc_mel,
      "auc_seborrheic_keratosis": auc_sk,
      "auc_mean": (auc_mel + auc_sk) / 2.0,
      "accuracy": float(np.mean(predicted == split.label)),
      "confusion_matrix": confusion.tolist(),
      "confusion_matrix_labels": list(CLASS_NAMES),  # rows: true class, columns: predicted
      "num_images": len(split),
  }


def format_probabilities(probs: np.ndarray) -> list[str]:
  # 9 significant digits round-trip float32 exactly.
  return [f"{p:.9g}" for p in np.asarray(probs, np.float64)]


def write_predictions(path: pathlib.Path, image_ids, probs: np.ndarray):
  """Writes the submission CSV and returns (melanoma, SK) exactly as written (parsed back)."""
  mel = format_probabilities(probs[:, 0])
  sk = format_probabilities(probs[:, 1])
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(CSV_HEADER)
  writer.writerows(zip(image_ids, mel, sk))
  storage.path(path).write_text(text.getvalue())
  # Metrics are computed from the parsed text so they equal a recomputation from the file.
  return np.array([float(x) for x in mel]), np.array([float(x) for x in sk])


def write_ground_truth(path: pathlib.Path, split: labelled.LabelledSplit) -> None:
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(CSV_HEADER)
  for row in zip(split.image_ids, split.melanoma, split.seborrheic_keratosis):
    writer.writerow([row[0], f"{float(row[1]):.1f}", f"{float(row[2]):.1f}"])
  storage.path(path).write_text(text.getvalue())


def plot_roc(
    path: pathlib.Path,
    split: labelled.LabelledSplit,
    melanoma: np.ndarray,
    seborrheic_keratosis: np.ndarray,
    metrics: dict,
    title: str,
) -> None:
  """The two ROC curves of `split` with their AUCs (matplotlib, Agg canvas; no global state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from sklearn import metrics as sk_metrics

  fig = Figure(figsize=(5.5, 5.0), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for y, score, key, label in (
      (split.melanoma, melanoma, "auc_melanoma", "melanoma"),
      (
          split.seborrheic_keratosis,
          seborrheic_keratosis,
          "auc_seborrheic_keratosis",
          "seborrheic keratosis",
      ),
  ):
    if len(np.unique(y)) < 2:
      continue
    fpr, tpr, _ = sk_metrics.roc_curve(y, score)
    ax.plot(fpr, tpr, lw=2, label=f"{label} (AUC {metrics[key]:.3f})")
  ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
  ax.set(
      xlim=(0, 1),
      ylim=(0, 1.01),
      xlabel="false positive rate",
      ylabel="true positive rate",
      title=title,
  )
  ax.legend(loc="lower right")
  fig.tight_layout()
  storage.save_figure(fig, path)


class IsicEvaluator:
  """Scores a classifier state on one ISIC 2017 split.

  `run(state)` returns the challenge metrics (an evaluator of the training loop);
  `write_outputs(state, workdir)` also writes the split's predictions CSV (the submission
  format), the ground truth it is scored against, and for the test split the ROC plot.
  """

  def __init__(
      self,
      split: labelled.LabelledSplit,
      view: labelled_views.AugmentConfig,
      eval_step,
      mesh,
      *,
      eval_batch_size: int,
      num_parallel_calls: int = -1,
  ):
    """`eval_step(state, batch) -> (B, 3) probabilities`: the classifier's jitted eval step."""
    self.name = split.split
    self.split = split
    self.mesh = mesh
    self._eval_step = eval_step
    self.input = labelled_input.EvalInput(
        split,
        view,
        global_batch_size=eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_parallel_calls=num_parallel_calls,
    )

  def predict(self, state) -> np.ndarray:
    """(N, 3) class probabilities of the split's images, in the split's order."""
    outputs = [
        self._eval_step(state, sharding_lib.global_batch({"image": batch["image"]}, self.mesh))
        for batch in self.input.batches()
    ]
    return np.concatenate([_host(o) for o in outputs])[: len(self.split)]

  def run(self, state) -> dict:
    probs = self.predict(state)
    return split_metrics(self.split, probs[:, 0], probs[:, 1], probs)

  def describe(self, metrics: dict) -> str:
    return (
        f"AUC melanoma {metrics['auc_melanoma']:.4f} SK "
        f"{metrics['auc_seborrheic_keratosis']:.4f} mean {metrics['auc_mean']:.4f} "
        f"acc {metrics['accuracy']:.3f}"
    )

  def write_outputs(self, state, workdir: pathlib.Path, plot_title: str) -> dict:
    """Predictions (and ground truth, ROC plot) of `state` in `workdir`; returns the metrics.

    Only process 0 writes; every process must call it (the prediction is a collective).
    """
    probs = self.predict(state)
    if jax.process_index() != 0:
      return {}
    split, name = self.split, self.name
    if split.csv_path is None:
      gt_path = workdir / f"ground_truth_{name}.csv"
      write_ground_truth(gt_path, split)
    else:
      gt_path = storage.path(split.csv_path, absolute=False)
    predictions = workdir / f"predictions_{name}.csv"
    mel, sk = write_predictions(predictions, split.image_ids, probs)
    metrics = split_metrics(split, mel, sk, probs)
    metrics["ground_truth_csv"] = str(gt_path)
    metrics["predictions_csv"] = str(predictions)
    if name == "test":
      plot_roc(workdir / "roc.png", split, mel, sk, metrics, plot_title)
    return metrics
