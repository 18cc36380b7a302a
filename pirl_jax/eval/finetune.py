"""ISIC 2017 Part 3 evaluation: fine-tune or linear-probe a trunk, select on validation, score test.

config -> labelled splits -> sharded state (trunk from scratch, a PIRL run or a checkpoint) ->
jitted steps -> validation mean AUC every `eval_every_*` (the best state is checkpointed) -> the
best state scored on validation and test -> predictions CSVs, metrics.json, roc.png.

The network is the trunk, then a 3-way softmax over melanoma / seborrheic keratosis / nevus; the
challenge's two probabilities are the first two. With `protocol='linear'` the trunk is frozen:
it runs with BatchNorm in inference mode and no gradient, and only res5 average pool ->
BatchNorm -> Linear is trained (PIRL.md section 7).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import time
from typing import Any

from absl import logging
from clu import metric_writers
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import labelled
from pirl_jax.models import resnet
from pirl_jax.train import state as state_lib

CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")
CSV_HEADER = ("image_id", "melanoma", "seborrheic_keratosis")
EVAL_SPLITS = ("validation", "test")
TRUNK = "trunk"

_CHOICES = {
    "mode": ("finetune",),
    "protocol": ("finetune", "linear"),
    "init.kind": ("", "scratch", "pirl", "checkpoint"),
    "data.source": ("synthetic", "isic", "tfds"),
    "data.on_bad_image": ("error", "skip"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.class_balance": ("weighted", "sampling", "none"),
}


# --- Config ---------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks every field that does not need the data; errors name the field."""
  for field, choices in _CHOICES.items():
    value = configuration.get_field(config, field)
    if value not in choices:
      raise configuration.ConfigError(
          f"config.{field}={value!r} is not one of {', '.join(repr(c) for c in choices)}.")
  checks = [
      ("label_fraction", 0.0 < config.label_fraction <= 1.0, "must be in (0, 1]"),
      ("global_batch_size", config.global_batch_size > 0, "must be positive"),
      ("global_batch_size", config.global_batch_size % num_devices == 0,
       f"must be divisible by the number of devices ({num_devices})"),
      ("eval_batch_size", config.eval_batch_size > 0, "must be positive"),
      ("eval_batch_size", config.eval_batch_size % num_devices == 0,
       f"must be divisible by the number of devices ({num_devices})"),
      ("optim.learning_rate", config.optim.learning_rate > 0, "must be positive"),
      ("optim.momentum", 0.0 <= config.optim.momentum < 1.0, "must be in [0, 1)"),
      ("optim.weight_decay", config.optim.weight_decay >= 0, "must be >= 0"),
      ("optim.lr_decay_at", all(0.0 < f < 1.0 for f in config.optim.lr_decay_at),
       "must be fractions of training in (0, 1)"),
      ("optim.lr_decay_factor", config.optim.lr_decay_factor > 0, "must be positive"),
      ("num_epochs", config.num_epochs > 0 or config.num_train_steps > 0,
       "must be positive (or set num_train_steps)"),
      ("min_train_steps", config.min_train_steps >= 0, "must be >= 0"),
      ("eval_every_epochs", config.eval_every_epochs > 0 or config.eval_every_steps > 0,
       "must be positive (or set eval_every_steps)"),
      ("log_every_steps", config.log_every_steps >= 1, "must be >= 1"),
  ]
  for field, ok, why in checks:
    if not ok:
      value = configuration.get_field(config, field)
      raise configuration.ConfigError(f"config.{field}={value!r} {why}.")
  if config.init.kind == "scratch" and config.init.checkpoint:
    raise configuration.ConfigError(
        f"config.init.kind='scratch' contradicts config.init.checkpoint="
        f"{config.init.checkpoint!r}; leave one of them empty.")
  if config.init.kind in ("pirl", "checkpoint") and not config.init.checkpoint:
    raise configuration.ConfigError(
        f"config.init.kind={config.init.kind!r} needs config.init.checkpoint (a PIRL "
        "pretraining workdir or a checkpoint folder).")


def training_length(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total steps, validation interval in steps) for a labelled subset of `steps_per_epoch`.

  `num_train_steps` > 0 is taken as given. Otherwise `num_epochs` epochs over the labelled subset,
  but at least `min_train_steps`: 30 epochs of a 10 % subset (200 images) are ~190 steps, too few
  to fit even those 200 images, and a comparison of initialisations in that regime measures
  which one is quickest to start, not which represents the data better.
  """
  if config.num_train_steps > 0:
    total = int(config.num_train_steps)
  else:
    total = max(1, math.ceil(config.num_epochs * steps_per_epoch), int(config.min_train_steps))
  eval_every = (int(config.eval_every_steps) if config.eval_every_steps > 0
                else max(1, int(round(config.eval_every_epochs * steps_per_epoch))))
  return total, min(eval_every, total)


@dataclasses.dataclass(frozen=True)
class Init:
  """Where the trunk comes from.

  Attributes:
    kind: 'scratch', 'pirl' or 'checkpoint'.
    checkpoint: the folder the user gave ('' for scratch).
    item_dir: the Orbax item folder that is restored (None for scratch).
    step: the checkpoint's step, when known.
    source_config: the checkpoint's workdir config.json, when there is one.
  """
  kind: str
  checkpoint: str = ""
  item_dir: str | None = None
  step: int | None = None
  source_config: dict | None = None


def _find_workdir_config(item_dir: pathlib.Path, given: pathlib.Path) -> dict | None:
  # item folder -> step folder -> checkpoints/ -> workdir: the first config.json on the way up.
  for folder in [given, *item_dir.parents][:5]:
    path = folder / "config.json"
    if path.is_file():
      try:
        return json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it should be the resolved config "
                         "the checkpoint's run wrote.") from e
  return None


def resolve_init(init_cfg) -> Init:
  """Finds the checkpoint `init.checkpoint` names and infers `init.kind` when it is empty."""
  if not init_cfg.checkpoint:
    return Init(kind="scratch")
  given = pathlib.Path(init_cfg.checkpoint).expanduser().absolute()
  item_dir, step = checkpointing.resolve_checkpoint(
      given, None if init_cfg.step < 0 else int(init_cfg.step))
  source_config = _find_workdir_config(item_dir, given)
  kind = init_cfg.kind
  if not kind:
    is_pirl = source_config is not None and source_config.get("mode") == "pretrain"
    kind = "pirl" if is_pirl else "checkpoint"
  return Init(kind=kind, checkpoint=str(given), item_dir=str(item_dir), step=step,
              source_config=source_config)


def resolve_config(config: ml_collections.ConfigDict, init: Init) -> ml_collections.ConfigDict:
  """A copy of `config` with `init.kind` filled in and, if inherited, the checkpoint's trunk."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.init.kind = init.kind
  model = (init.source_config or {}).get("model") or {}
  if init.kind != "scratch" and config.init.inherit_trunk and "trunk" in model:
    trunk, width = model["trunk"], float(model.get("width_multiplier", 1.0))
    if (trunk, width) != (config.model.trunk, float(config.model.width_multiplier)):
      logging.info("Using the checkpoint's trunk %s at width %g (from its config.json) instead "
                   "of model.trunk=%s, model.width_multiplier=%g (init.inherit_trunk=True).",
                   trunk, width, config.model.trunk, config.model.width_multiplier)
    config.model.trunk, config.model.width_multiplier = trunk, width
  return config


# --- Model, optimizer, state ----------------------------------------------------------------------


class Classifier(nn.Module):
  """Trunk -> 3-way linear classifier; with `probe`, a frozen trunk and a BatchNorm before it.

  Attributes:
    trunk: feature module `trunk(x, train) -> (B, F)` (res5 average pool).
    num_classes: 3 (melanoma, seborrheic keratosis, nevus).
    probe: linear probe: the trunk always runs in inference mode and passes no gradient.
  """
  trunk: nn.Module
  num_classes: int = len(CLASS_NAMES)
  probe: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """Logits (B, num_classes), float32."""
    if self.probe:
      features = jax.lax.stop_gradient(self.trunk(images, train=False))
      features = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              name="head_norm")(features)
    else:
      features = self.trunk(images, train=train)
    return resnet.torch_dense(self.num_classes, features.shape[-1], name="head")(features)


def create_model(config) -> Classifier:
  trunk = resnet.get_trunk(config.model.trunk, width_multiplier=config.model.width_multiplier,
                           dtype=state_lib.compute_dtype(config.model.dtype))
  return Classifier(trunk=trunk, probe=config.protocol == "linear")


@flax.struct.dataclass
class FinetuneState:
  """Everything that changes while fine-tuning; checkpointed, sharded and donated as one."""
  step: jax.Array
  params: Any  # {'trunk': ..., 'head': ...} (+ 'head_norm' for the probe)
  batch_stats: Any
  opt_state: Any


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Step decay: x lr_decay_factor at each fraction `lr_decay_at` of `total_steps`."""
  scales: dict[int, float] = {}
  for fraction in optim_cfg.lr_decay_at:
    boundary = max(1, int(round(fraction * total_steps)))
    scales[boundary] = scales.get(boundary, 1.0) * optim_cfg.lr_decay_factor
  return optax.piecewise_constant_schedule(optim_cfg.learning_rate, scales)


def create_optimizer(optim_cfg, total_steps: int, probe: bool):
  """SGD (Nesterov) with masked weight decay and step decay; the probe freezes the trunk."""
  schedule = lr_schedule(optim_cfg, total_steps)
  tx = optax.chain(
      optax.add_decayed_weights(optim_cfg.weight_decay, mask=state_lib.weight_decay_mask),
      optax.sgd(schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov))
  if probe:
    # set_to_zero makes the trunk's update exactly zero (weight decay included) and keeps no
    # optimizer state for it.
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: {k: "frozen" if k == TRUNK else "train" for k in params})
  return tx, schedule


def create_state_variables(model: Classifier, tx, image_size: int,
                           rng: jax.Array | None = None) -> FinetuneState:
  """The initial state from `rng` (unsharded; `jax.eval_shape` of it gives the shapes)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0) if rng is None else rng, images, train=False)
  return FinetuneState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]))


def create_state(model: Classifier, tx, image_size: int, mesh, seed: int):
  """The initial state, born replicated on `mesh`. Returns (state, shardings)."""

  def init(rng):
    return create_state_variables(model, tx, image_size, rng)

  rng = jax.random.PRNGKey(seed)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def _trunk_targets(item_dir: str, params_trunk, stats_trunk) -> dict:
  # A PIRL or fine-tuned state keeps the trunk under 'trunk'; a bare trunk sits at the top level.
  nested = checkpointing.subtree(checkpointing.array_metadata(item_dir),
                                 ("params", TRUNK)) is not None
  prefix = (TRUNK,) if nested else ()
  return {("params",) + prefix: params_trunk, ("batch_stats",) + prefix: stats_trunk}


def check_trunk(config, init: Init, model: Classifier) -> None:
  """Fails early, before any data is read, if the checkpoint's trunk does not fit `model`.

  Raises:
    checkpointing.CheckpointMismatchError: naming the parameter and both shapes, and the config
      fields that choose the architecture.
  """
  size = config.augment.image_size
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32), train=False))
  try:
    checkpointing.check_subtrees(init.item_dir, _trunk_targets(
        init.item_dir, variables["params"][TRUNK], variables["batch_stats"][TRUNK]))
  except checkpointing.CheckpointMismatchError as e:
    saved = ((init.source_config or {}).get("model") or {})
    told = (f" Its run's config.json has model.trunk={saved.get('trunk')!r}, "
            f"model.width_multiplier={saved.get('width_multiplier')!r}." if saved else "")
    raise checkpointing.CheckpointMismatchError(
        f"{e}\nThe model is config.model.trunk={config.model.trunk!r} at "
        f"config.model.width_multiplier={config.model.width_multiplier!r}; config.init.checkpoint="
        f"{init.checkpoint!r} holds another architecture.{told}") from None


def load_trunk(state: FinetuneState, init: Init, mesh) -> FinetuneState:
  """Replaces the trunk's params and batch statistics with the checkpoint's.

  The checkpoint's trunk is found under params/batch_stats['trunk'] (a PIRL pretraining state or
  a fine-tuned state of this loop) or, failing that, at their top level (a bare trunk).

  Raises:
    checkpointing.CheckpointMismatchError: naming the parameter whose shape differs, or that is
      missing or unexpected.
  """
  targets = _trunk_targets(init.item_dir, state.params[TRUNK], state.batch_stats[TRUNK])
  (params_key, stats_key) = targets
  restored = checkpointing.restore_subtrees(init.item_dir, targets,
                                            sharding=sharding_lib.replicated(mesh))
  params = dict(state.params, trunk=restored[params_key])
  batch_stats = dict(state.batch_stats, trunk=restored[stats_key])
  # The optimizer state (momentum) is still zeros, so it does not depend on the restored values.
  return state.replace(params=params, batch_stats=batch_stats)


# --- Steps ----------------------------------------------------------------------------------------


def train_step(state: FinetuneState, batch, *, model: Classifier, tx, schedule, class_weights):
  """One SGD step on weighted softmax cross-entropy. Returns (new_state, metrics)."""
  weights = jnp.asarray(class_weights, jnp.float32)[batch["label"]]

  def loss_fn(params):
    logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["image"], train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1e-12), (logits, new_vars)

  (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
  }
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=new_vars["batch_stats"], opt_state=opt_state)
  return new_state, metrics


def eval_step(state: FinetuneState, batch, *, model: Classifier) -> jax.Array:
  """Class probabilities (B, 3), BatchNorm in inference mode; the state is not changed."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def jit_train_step(mesh, shardings, **kwargs):
  """`train_step` under jit with explicit shardings; the input state is donated."""
  return jax.jit(lambda state, batch: train_step(state, batch, **kwargs),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)


def jit_eval_step(mesh, shardings, model: Classifier):
  """`eval_step` under jit; the probabilities come back replicated (readable on every host)."""
  return jax.jit(lambda state, batch: eval_step(state, batch, model=model),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=sharding_lib.replicated(mesh))


# --- Metrics and outputs --------------------------------------------------------------------------


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


def split_metrics(split: labelled.LabelledSplit, melanoma: np.ndarray,
                  seborrheic_keratosis: np.ndarray, probs: np.ndarray) -> dict:
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
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(zip(image_ids, mel, sk))
  # Metrics are computed from the parsed text so they equal a recomputation from the file.
  return np.array([float(x) for x in mel]), np.array([float(x) for x in sk])


def write_ground_truth(path: pathlib.Path, split: labelled.LabelledSplit) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in zip(split.image_ids, split.melanoma, split.seborrheic_keratosis):
      writer.writerow([row[0], f"{float(row[1]):.1f}", f"{float(row[2]):.1f}"])


def plot_roc(path: pathlib.Path, split: labelled.LabelledSplit, melanoma: np.ndarray,
             seborrheic_keratosis: np.ndarray, metrics: dict, title: str) -> None:
  """The two ROC curves of `split` with their AUCs (matplotlib, Agg canvas; no global state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from sklearn import metrics as sk_metrics
  fig = Figure(figsize=(5.5, 5.0), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for y, score, key, label in ((split.melanoma, melanoma, "auc_melanoma", "melanoma"),
                               (split.seborrheic_keratosis, seborrheic_keratosis,
                                "auc_seborrheic_keratosis", "seborrheic keratosis")):
    if len(np.unique(y)) < 2:
      continue
    fpr, tpr, _ = sk_metrics.roc_curve(y, score)
    ax.plot(fpr, tpr, lw=2, label=f"{label} (AUC {metrics[key]:.3f})")
  ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
         title=title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path)


class Evaluator:
  """Scores a state on one split: `run(state)` -> ((N, 3) probabilities, metrics)."""

  def __init__(self, split: labelled.LabelledSplit, aug: labelled.AugmentConfig, p_eval_step,
               mesh, config):
    self.split = split
    self.mesh = mesh
    self.p_eval_step = p_eval_step
    self.input = labelled.EvalInput(
        split, aug, global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_parallel_calls=config.data.num_parallel_calls)

  def predict(self, state: FinetuneState) -> np.ndarray:
    outputs = [self.p_eval_step(state, sharding_lib.global_batch(
        {"image": batch["image"]}, self.mesh)) for batch in self.input.batches()]
    return np.concatenate([_host(o) for o in outputs])[:len(self.split)]

  def run(self, state: FinetuneState) -> tuple[np.ndarray, dict]:
    probs = self.predict(state)
    return probs, split_metrics(self.split, probs[:, 0], probs[:, 1], probs)


# --- The loop -------------------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _scalars(prefix: str, metrics: dict) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def _score(metrics: dict) -> float:
  auc = metrics["auc_mean"]
  return -math.inf if math.isnan(auc) else auc


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes (or linear-probes) as configured and scores the best validation state on test.

  Writes to `workdir`: predictions_{validation,test}.csv, metrics.json, roc.png, config.json,
  TensorBoard scalars and `checkpoints/` (the best state by validation mean AUC).

  Returns:
    A summary: the metrics per split, the selected step, paths, wall time.
  """
  start_time = time.time()
  workdir_path = pathlib.Path(workdir).absolute()
  mesh = sharding_lib.create_mesh()
  validate_config(config, mesh.size)
  init = resolve_init(config.init)
  config = resolve_config(config, init)
  checkpoint_dir = workdir_path / "checkpoints"
  if checkpoint_dir.is_dir() and any(
      p.name.isdigit() for p in checkpoint_dir.iterdir()):
    raise FileExistsError(
        f"{checkpoint_dir} already holds a fine-tuned model from an earlier run; choose a new "
        "--workdir (fine-tuning runs are not resumed).")
  model = create_model(config)
  if init.kind != "scratch":
    check_trunk(config, init, model)
  # Before the data is read or anything compiled: a writable workdir, and room for the best
  # checkpoint and its replacement (orbax writes the new one before deleting the old).
  preflight.agree(lambda: preflight.check_workdir_writable(workdir_path))
  size = config.augment.image_size
  abstract_state = jax.eval_shape(lambda: create_state_variables(
      model, create_optimizer(config.optim, 1, config.protocol == "linear")[0], size))
  preflight.agree(lambda: preflight.check_free_disk(
      checkpoint_dir, preflight.state_bytes(abstract_state), 2,
      advice="the best state and its replacement). Free some space or pass another --workdir."))
  probe = config.protocol == "linear"
  logging.info("Evaluation protocol %s, init %s%s, label_fraction %g, seed %d, trunk %s x%g.",
               config.protocol, init.kind,
               f" from {init.item_dir} (step {init.step})" if init.item_dir else "",
               config.label_fraction, config.seed, config.model.trunk,
               config.model.width_multiplier)

  splits = {s: labelled.load_split(config.data, s) for s in ("train",) + EVAL_SPLITS}
  train = splits["train"]
  positions = labelled.stratified_subset(train.label, config.label_fraction, config.seed)
  logging.info("Training on %s of %s.", labelled.summarize(train, positions),
               labelled.summarize(train))
  aug = labelled.augment_config(config.augment)
  train_input = labelled.TrainInput(
      train, positions, aug, seed=config.seed, global_batch_size=config.global_batch_size,
      balanced=config.loss.class_balance == "sampling", process_index=jax.process_index(),
      process_count=jax.process_count(), num_parallel_calls=config.data.num_parallel_calls,
      prefetch_batches=config.data.prefetch_batches)
  if config.loss.class_balance == "weighted":
    weights = labelled.class_weights(train.label[positions])
  else:
    weights = np.ones(labelled.NUM_CLASSES, np.float32)
  steps_per_epoch = train_input.steps_per_epoch
  total, eval_every = training_length(config, steps_per_epoch)
  logging.info("%d steps/epoch, %d steps in all, validation every %d steps; class weights %s.",
               steps_per_epoch, total, eval_every, np.round(weights, 3).tolist())

  tx, schedule = create_optimizer(config.optim, total, probe)
  state, shardings = create_state(model, tx, aug.image_size, mesh, config.seed)
  if init.kind != "scratch":
    state = load_trunk(state, init, mesh)
    logging.info("Restored the trunk's parameters and batch statistics from %s.", init.item_dir)
  if jax.process_index() == 0:
    (workdir_path / "config.json").write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))

  p_train_step = jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule,
                                class_weights=weights)
  p_eval_step = jit_eval_step(mesh, shardings, model)
  evaluators = {s: Evaluator(splits[s], aug, p_eval_step, mesh, config) for s in EVAL_SPLITS}
  checkpointer = checkpointing.Checkpointer(checkpoint_dir, keep=1)
  writer = metric_writers.create_default_writer(
      str(workdir_path), just_logging=jax.process_index() > 0)

  batches = train_input.iterate(0)
  accumulated, count = None, 0
  best = dict(step=None, score=-math.inf, metrics=None)
  history = []
  window_start, window_steps, train_start = time.time(), 0, time.time()
  first_log, wall_per_step = None, 0.0
  for step in range(total):
    state, metrics = p_train_step(state, sharding_lib.global_batch(next(batches), mesh))
    accumulated = metrics if accumulated is None else jax.tree.map(
        lambda a, b: a + b, accumulated, metrics)
    count += 1
    window_steps += 1
    done = step + 1
    if done % config.log_every_steps == 0 or done == total:
      means = {k: float(v) / count for k, v in jax.device_get(accumulated).items()}
      bad = [k for k, v in means.items() if not np.isfinite(v)]
      if bad:
        raise FloatingPointError(f"Non-finite {', '.join(bad)} in steps {done - count + 1}.."
                                 f"{done}; try a lower optim.learning_rate.")
      now = time.time()
      steps_per_sec = window_steps / max(now - window_start, 1e-9)
      # The ETA counts evaluation too: wall time per step since the first log (after compiling).
      if first_log is None:
        first_log, wall_per_step = (done, now), 1.0 / max(steps_per_sec, 1e-9)
      elif done > first_log[0]:
        wall_per_step = (now - first_log[1]) / (done - first_log[0])
      writer.write_scalars(done, _scalars("train", dict(
          means, steps_per_sec=steps_per_sec,
          images_per_sec=steps_per_sec * config.global_batch_size)))
      best_text = (f"best val mean AUC {best['score']:.4f} @ {best['step']}"
                   if best["step"] is not None else "no validation yet")
      logging.info("step %d/%d (%.1f%%) epoch %.1f loss %.4f acc %.3f lr %.4g | %.2f steps/s | "
                   "%s | elapsed %s ETA %s", done, total, 100.0 * done / total,
                   done / steps_per_epoch, means["loss"], means["accuracy"],
                   means["learning_rate"], steps_per_sec, best_text,
                   _format_duration(now - train_start),
                   _format_duration((total - done) * wall_per_step))
      accumulated, count = None, 0
      window_start, window_steps = now, 0
    if done % eval_every == 0 or done == total:
      eval_start = time.time()
      _, val = evaluators["validation"].run(state)
      writer.write_scalars(done, _scalars("validation", val))
      history.append(dict(step=done, epoch=done / steps_per_epoch,
                          **{k: val[k] for k in ("auc_melanoma", "auc_seborrheic_keratosis",
                                                  "auc_mean", "accuracy")}))
      improved = best["step"] is None or _score(val) > best["score"]
      if improved:
        best = dict(step=done, score=_score(val), metrics=val)
        checkpointer.save(done, state, force=True)
      logging.info("validation at step %d: AUC melanoma %.4f SK %.4f mean %.4f acc %.3f%s",
                   done, val["auc_melanoma"], val["auc_seborrheic_keratosis"], val["auc_mean"],
                   val["accuracy"], " (best so far, saved)" if improved else "")
      # Evaluation time is not training time: keep it out of the steps/s window.
      window_start += time.time() - eval_start

  checkpointer.wait_until_finished()
  state = checkpointer.restore(best["step"], checkpointing.abstract_like(state, shardings))
  checkpointer.close()
  logging.info("Selected the state of step %d (validation mean AUC %.4f).", best["step"],
               best["metrics"]["auc_mean"])

  results, gt_paths = {}, {}
  for name in EVAL_SPLITS:
    split = splits[name]
    probs = evaluators[name].predict(state)
    if jax.process_index() != 0:
      continue
    if split.csv_path is None:
      gt_path = workdir_path / f"ground_truth_{name}.csv"
      write_ground_truth(gt_path, split)
    else:
      gt_path = pathlib.Path(split.csv_path)
    mel, sk = write_predictions(workdir_path / f"predictions_{name}.csv", split.image_ids, probs)
    metrics = split_metrics(split, mel, sk, probs)
    metrics["ground_truth_csv"] = str(gt_path)
    metrics["predictions_csv"] = str(workdir_path / f"predictions_{name}.csv")
    results[name] = metrics
    gt_paths[name] = str(gt_path)
    writer.write_scalars(total, _scalars(f"final_{name}", metrics))
    if name == "test":
      plot_roc(workdir_path / "roc.png", split, mel, sk, metrics,
               f"ISIC 2017 test ({init.kind}, {config.protocol}, "
               f"labels {config.label_fraction:g})")
  writer.flush()

  summary = dict(
      results=results, selected=dict(step=best["step"], epoch=best["step"] / steps_per_epoch,
                                     validation_auc_mean=best["metrics"]["auc_mean"]),
      protocol=config.protocol, init=dict(kind=init.kind, checkpoint=init.checkpoint,
                                          item_dir=init.item_dir, step=init.step),
      trunk=dict(name=config.model.trunk, width_multiplier=config.model.width_multiplier),
      label_fraction=config.label_fraction, seed=config.seed,
      num_train_images=int(len(positions)), total_steps=total, history=history,
      workdir=str(workdir_path), checkpoint_dir=str(checkpoint_dir),
      wall_seconds=time.time() - start_time)
  if jax.process_index() == 0:
    (workdir_path / "metrics.json").write_text(json.dumps(
        {**results, **{k: v for k, v in summary.items() if k != "results"}}, indent=2))
    logging.info("%s", format_summary(summary))
  return summary


def format_summary(summary: dict) -> str:
  """A few lines for the terminal: test and validation AUCs, where the outputs are."""
  lines = [f"Evaluation ({summary['protocol']}, init {summary['init']['kind']}, "
           f"label_fraction {summary['label_fraction']:g}, seed {summary['seed']}) finished in "
           f"{summary['wall_seconds'] / 60:.1f} min; selected step {summary['selected']['step']} "
           "by validation mean AUC."]
  for name in EVAL_SPLITS:
    m = summary["results"].get(name)
    if m:
      lines.append(f"  {name:<10} AUC melanoma {m['auc_melanoma']:.4f}  seborrheic keratosis "
                   f"{m['auc_seborrheic_keratosis']:.4f}  mean {m['auc_mean']:.4f}  "
                   f"accuracy {m['accuracy']:.3f}")
  lines.append(f"  outputs: {summary['workdir']}/{{predictions_validation.csv, "
               "predictions_test.csv, metrics.json, roc.png}, checkpoints/")
  return "\n".join(lines)
