"""Unsupervised data augmentation (UDA; Xie et al., "Unsupervised Data Augmentation for
Consistency Training", NeurIPS 2020): the loss of semi-supervised fine-tuning, as pure functions.

A training step sees a labelled batch and `unlabelled_ratio` times as many unlabelled images, each
twice: a clean view (the fine-tuning augmentation) and a strong view (the same view, then
RandAugment and cutout; `pirl_jax.data.randaugment`). The three go through the network in one
forward pass (BatchNorm statistics over all of them, as in the reference code), and

  loss = supervised + weight * consistency

* supervised: the class-weighted cross-entropy of the labelled examples, with training signal
  annealing (TSA): an example whose correct-class probability already exceeds the threshold
  eta_t is left out of the loss, so that the few labelled images are not memorised before the
  unlabelled ones have shaped the model. eta_t grows from 1/K to 1 over training on a linear, log
  or exp schedule.
* consistency: KL(p(y | clean) || p(y | strong)) averaged over the unlabelled batch, with the
  clean prediction a fixed target (stop-gradient), sharpened by a softmax temperature, and only
  for images whose clean prediction is confident (max probability above a threshold).

Defaults and their sources are in configs/finetune_isic.py and docs/uda.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

TSA_SCHEDULES = ("none", "linear", "log", "exp")
# The log and exp schedules of the reference code reach within exp(-5) of their end points.
_TSA_SCALE = 5.0


@dataclasses.dataclass(frozen=True)
class UdaSettings:
  """The `uda` config block's loss settings (the data settings are read by the input pipeline).

  Attributes:
    weight: lambda, the weight of the consistency term.
    temperature: softmax temperature of the clean prediction used as the target (< 1 sharpens;
      1 = none).
    confidence_threshold: beta; an unlabelled image counts only if the clean prediction's largest
      probability is above it (0 = every image).
    tsa: training signal annealing schedule: 'none', 'linear', 'log' or 'exp'.
  """

  weight: float = 1.0
  temperature: float = 0.4
  confidence_threshold: float = 0.5
  tsa: str = "none"

  @classmethod
  def from_config(cls, uda_cfg) -> "UdaSettings":
    return cls(
        weight=float(uda_cfg.weight),
        temperature=float(uda_cfg.temperature),
        confidence_threshold=float(uda_cfg.confidence_threshold),
        tsa=str(uda_cfg.tsa),
    )


def tsa_threshold(step, total_steps: int, schedule: str, num_classes: int) -> jax.Array:
  """eta_t = alpha_t * (1 - 1/K) + 1/K, alpha_t the schedule's progress at t / T.

  linear: t/T; log: 1 - exp(-5 t/T); exp: exp(5 (t/T - 1)); 'none': 1 (no example is ever left
  out: probabilities never exceed 1).
  """
  if schedule not in TSA_SCHEDULES:
    raise ValueError(f"Unknown TSA schedule {schedule!r}; expected one of {TSA_SCHEDULES}.")
  if schedule == "none":
    return jnp.ones((), jnp.float32)
  progress = jnp.asarray(step, jnp.float32) / float(max(total_steps, 1))
  if schedule == "linear":
    alpha = progress
  elif schedule == "log":
    alpha = 1.0 - jnp.exp(-progress * _TSA_SCALE)
  else:
    alpha = jnp.exp((progress - 1.0) * _TSA_SCALE)
  start = 1.0 / num_classes
  return alpha * (1.0 - start) + start


def supervised_loss(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array, threshold
) -> tuple[jax.Array, jax.Array]:
  """Class-weighted cross-entropy over the examples TSA keeps.

  An example is kept while its correct-class probability is at most `threshold`; the loss is
  sum(w * keep * ce) / sum(w * keep) (0 when nothing is kept).

  Returns:
    (loss, the fraction of the batch kept).
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.take_along_axis(jax.nn.softmax(logits, -1), labels[:, None], axis=-1)[:, 0]
  keep = jax.lax.stop_gradient((correct <= threshold).astype(jnp.float32))
  weights = class_weights[labels] * keep
  loss = jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1e-12)
  return loss, jnp.mean(keep)


def kl_divergence_with_logits(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(softmax(p) || softmax(q)) per row."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), -1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), -1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def consistency_loss(
    clean_logits: jax.Array,
    strong_logits: jax.Array,
    *,
    temperature: float,
    confidence_threshold: float,
) -> tuple[jax.Array, jax.Array]:
  """mean over the unlabelled batch of mask * KL(sharpened clean || strong).

  The target is softmax(clean_logits / temperature) under stop-gradient; the mask keeps images
  whose unsharpened clean prediction has its largest probability above `confidence_threshold`.
  Masked-out images count in the mean with 0, as in the reference code.

  Returns:
    (loss, the fraction of the batch above the threshold).
  """
  clean_logits = jax.lax.stop_gradient(clean_logits.astype(jnp.float32))
  confidence = jnp.max(jax.nn.softmax(clean_logits, -1), -1)
  mask = (confidence > confidence_threshold).astype(jnp.float32)
  kl = kl_divergence_with_logits(clean_logits / temperature, strong_logits)
  return jnp.mean(mask * kl), jnp.mean(mask)


def uda_loss(
    labelled_logits,
    labels,
    clean_logits,
    strong_logits,
    *,
    class_weights,
    step,
    total_steps: int,
    settings: UdaSettings,
) -> tuple[jax.Array, dict]:
  """supervised (with TSA) + weight * consistency, and the pieces as metrics."""
  threshold = tsa_threshold(step, total_steps, settings.tsa, labelled_logits.shape[-1])
  supervised, kept = supervised_loss(labelled_logits, labels, class_weights, threshold)
  consistency, confident = consistency_loss(
      clean_logits,
      strong_logits,
      temperature=settings.temperature,
      confidence_threshold=settings.confidence_threshold,
  )
  metrics = {
      "supervised_loss": supervised,
      "consistency_loss": consistency,
      "tsa_threshold": threshold,
      "tsa_kept_fraction": kept,
      "confident_fraction": confident,
  }
  return supervised + settings.weight * consistency, metrics
