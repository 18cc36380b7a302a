"""Frozen-feature probes: a cosine kNN classifier and a logistic-regression probe, and their scores.

Pure functions on host arrays of pooled trunk features (`features.py` extracts them). Both probes
return class probabilities for the query images, from which `classification_metrics` computes
one-vs-rest ROC AUCs (sklearn) and accuracy. They judge a representation without training the
trunk: how well do images of one class sit together (kNN), and how linearly separable are the
classes (logistic regression).

kNN follows the instance-discrimination literature (Wu et al. 2018, used by PIRL's successors as a
training monitor): L2-normalised features, the k most cosine-similar index images vote for their
class with weight exp(similarity / temperature).
"""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probabilities(
    index_features: np.ndarray,
    index_labels: np.ndarray,
    query_features: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
  """Class probabilities of the queries by a similarity-weighted vote of their k nearest neighbours.

  Args:
    index_features: (N, F) features of the labelled images.
    index_labels: (N,) int classes in [0, num_classes).
    query_features: (Q, F) features of the images to classify.
    num_classes: C.
    k: neighbours per query (capped at N).
    temperature: each neighbour's vote is exp(cosine similarity / temperature).
    chunk: queries scored at a time (bounds the (chunk, N) similarity matrix).

  Returns:
    (Q, C) float64 probabilities (each row sums to 1).
  """
  index = l2_normalize(index_features)
  labels = np.asarray(index_labels, np.int64)
  k = min(int(k), len(index))
  out = np.zeros((len(query_features), num_classes), np.float64)
  for start in range(0, len(query_features), chunk):
    query = l2_normalize(query_features[start : start + chunk])
    similarity = query @ index.T
    # Stable order: on equal similarity the lower index wins, as in sklearn's brute-force search.
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(similarity, nearest, axis=1)
    # Shifting by the row maximum leaves the normalised votes unchanged and cannot overflow.
    votes = np.exp((sims - sims[:, :1]) / temperature)
    rows = np.repeat(np.arange(len(query))[:, None], k, axis=1)
    np.add.at(out[start : start + chunk], (rows, labels[nearest]), votes)
  return out / out.sum(axis=1, keepdims=True)


def linear_probe_probabilities(
    index_features: np.ndarray,
    index_labels: np.ndarray,
    query_features: np.ndarray,
    num_classes: int,
    regularization: float = 1.0,
    max_iter: int = 1000,
) -> np.ndarray:
  """Class probabilities from multinomial logistic regression on standardised features.

  The features are standardised with the index set's mean and standard deviation; classes are
  weighted by inverse frequency so that a rare class (melanoma) is not ignored.

  Args:
    index_features, index_labels, query_features, num_classes: as `knn_probabilities`.
    regularization: sklearn's C (inverse L2 strength).
    max_iter: L-BFGS iterations.

  Returns:
    (Q, C) float64 probabilities; classes absent from the index get probability 0.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  labels = np.asarray(index_labels, np.int64)
  model = make_pipeline(
      StandardScaler(),
      LogisticRegression(C=regularization, max_iter=max_iter, class_weight="balanced"),
  )
  model.fit(np.asarray(index_features, np.float64), labels)
  probs = model.predict_proba(np.asarray(query_features, np.float64))
  out = np.zeros((len(query_features), num_classes), np.float64)
  out[:, model.classes_] = probs
  return out


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
    mean_over: tuple[str, ...] | None = None,
) -> dict[str, float]:
  """One-vs-rest ROC AUC per class, their mean, and accuracy.

  Args:
    labels: (Q,) int true classes.
    probabilities: (Q, C) scores.
    class_names: the C class names; metrics are named `auc_<name>`.
    mean_over: the classes whose AUCs `auc_mean` averages (ISIC 2017: melanoma and seborrheic
      keratosis); default all classes (for two classes, only the second: the binary AUC).

  Returns:
    {'auc_<name>': ..., 'auc_mean': ..., 'accuracy': ...}; an AUC is NaN when the queries hold
    only one of its two sides.
  """
  from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels)
  out = {}
  for c, name in enumerate(class_names):
    positive = labels == c
    if positive.all() or not positive.any():
      out[f"auc_{name}"] = float("nan")
    else:
      out[f"auc_{name}"] = float(sk_metrics.roc_auc_score(positive, probabilities[:, c]))
  if mean_over is None:
    mean_over = class_names[1:] if len(class_names) == 2 else class_names
  out["auc_mean"] = float(np.mean([out[f"auc_{name}"] for name in mean_over]))
  out["accuracy"] = float(np.mean(np.argmax(probabilities, axis=1) == labels))
  return out
