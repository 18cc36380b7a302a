"""The fine-tuning network and its state: a trunk and a linear classifier, SGD, the jitted steps.

With `probe=True` (the PIRL paper's linear-probe protocol) the trunk is frozen: it runs
with BatchNorm in inference mode and no gradient, and only res5 average pool -> BatchNorm ->
Linear is trained; the optimizer leaves the trunk's parameters exactly unchanged.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pirl_jax import sharding as sharding_lib
from pirl_jax.models import resnet
from pirl_jax.tasks import uda as uda_lib
from pirl_jax.train import state as state_lib
from pirl_jax.trunk_init import TRUNK

CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")


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
      features = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5, name="head_norm"
      )(features)
    else:
      features = self.trunk(images, train=train)
    return resnet.torch_dense(self.num_classes, features.shape[-1], name="head")(features)


def create_model(config) -> Classifier:
  """The classifier of a fine-tuning config: its trunk, frozen under protocol 'linear'."""
  trunk = resnet.get_trunk(
      config.model.trunk,
      width_multiplier=config.model.width_multiplier,
      dtype=state_lib.compute_dtype(config.model.dtype),
  )
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
      optax.sgd(schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
  )
  if probe:
    # set_to_zero makes the trunk's update exactly zero (weight decay included) and keeps no
    # optimizer state for it.
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: {k: "frozen" if k == TRUNK else "train" for k in params},
    )
  return tx, schedule


def create_state_variables(
    model: Classifier, tx, image_size: int, rng: jax.Array | None = None
) -> FinetuneState:
  """The initial state from `rng` (unsharded; `jax.eval_shape` of it gives the shapes)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0) if rng is None else rng, images, train=False)
  return FinetuneState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
  )


def create_state(model: Classifier, tx, image_size: int, mesh, seed: int):
  """The initial state, born replicated on `mesh`. Returns (state, shardings)."""

  def init(rng):
    return create_state_variables(model, tx, image_size, rng)

  rng = jax.random.PRNGKey(seed)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def train_step(
    state: FinetuneState,
    batch,
    *,
    model: Classifier,
    tx,
    schedule,
    class_weights,
    uda: uda_lib.UdaSettings | None = None,
    total_steps: int = 0,
):
  """One SGD step. Returns (new_state, metrics).

  The loss is the weighted softmax cross-entropy of the labelled batch; with `uda`, the batch also
  holds `unlabelled` and `unlabelled_strong` images and the loss is UDA's (`uda.uda_loss`, its
  TSA schedule over `total_steps`), all three parts in one forward pass.
  """
  class_weights = jnp.asarray(class_weights, jnp.float32)
  labels = batch["label"]
  num_labelled = batch["image"].shape[0]
  if uda is None:
    images = batch["image"]
  else:
    images = jnp.concatenate(
        [batch["image"], batch["unlabelled"], batch["unlabelled_strong"]], axis=0
    )

  def loss_fn(params):
    logits, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    labelled_logits = logits[:num_labelled]
    if uda is None:
      weights = class_weights[labels]
      ce = optax.softmax_cross_entropy_with_integer_labels(labelled_logits, labels)
      loss = jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1e-12)
      parts = {}
    else:
      clean_logits, strong_logits = jnp.split(logits[num_labelled:], 2)
      loss, parts = uda_lib.uda_loss(
          labelled_logits,
          labels,
          clean_logits,
          strong_logits,
          class_weights=class_weights,
          step=state.step,
          total_steps=total_steps,
          settings=uda,
      )
    return loss, (labelled_logits, new_vars, parts)

  (loss, (logits, new_vars, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
      **parts,
  }
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=new_vars["batch_stats"], opt_state=opt_state
  )
  return new_state, metrics


def eval_step(state: FinetuneState, batch, *, model: Classifier) -> jax.Array:
  """Class probabilities (B, 3), BatchNorm in inference mode; the state is not changed."""
  logits = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
  )
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def jit_train_step(mesh, shardings, **kwargs):
  """`train_step` under jit with explicit shardings; the input state is donated."""
  return jax.jit(
      lambda state, batch: train_step(state, batch, **kwargs),
      in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0,
  )


def jit_eval_step(mesh, shardings, model: Classifier):
  """`eval_step` under jit; the probabilities come back replicated (readable on every host)."""
  return jax.jit(
      lambda state, batch: eval_step(state, batch, model=model),
      in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=sharding_lib.replicated(mesh),
  )
