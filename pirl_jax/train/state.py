"""The PIRL train state (one pytree), the model and the optimizer built from a config."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from pirl_jax import key_queue
from pirl_jax import memory_bank
from pirl_jax import methods
from pirl_jax import sharding as sharding_lib
from pirl_jax.models import pirl as pirl_model
from pirl_jax.models import resnet


@flax.struct.dataclass
class TrainState:
  """Everything that changes during pretraining; checkpointed, sharded and donated as one."""

  step: jax.Array  # int32 scalar
  params: Any
  batch_stats: Any  # running statistics for evaluation: the image pass's (see `bn_running_stats`)
  # {'trunk': the trunk's running statistics of the pass on the jigsaw tiles alone}, so that the
  # trunk and g on tiles are evaluated with statistics of tiles. A method without a tile pass
  # keeps a copy of the image pass's here.
  tile_batch_stats: Any
  opt_state: Any
  bank: jax.Array  # (N padded to a multiple of the device count, embed_dim), rows sharded
  nce_z: jax.Array  # float32 scalar; 0 until estimated at the first NCE step
  rng: jax.Array  # raw uint32 PRNG key for the negatives
  nonfinite_steps: jax.Array  # int32 scalar: steps skipped for a non-finite loss or gradient
  # An exponential moving average of `params` (`ema_decay`): moco_v2's key (momentum) encoder,
  # or any method's with config.ema_decay > 0; a float32 0 when neither.
  ema_params: Any
  # moco_v2's queue of keys (`key_queue`; K padded to a multiple of the device count, embed_dim),
  # rows sharded as the bank's; a zero row per device for the other methods.
  key_queue: jax.Array


def tile_stats_of_earlier_version(fields: dict) -> dict:
  """`tile_batch_stats` for a checkpoint written before the state kept them: the image pass's,
  the statistics such a run evaluated tiles with."""
  return {"trunk": jax.tree.map(jnp.copy, fields["batch_stats"]["trunk"])}


def ema_decay(config) -> float:
  """The decay of the parameter EMA in the state: moco_v2's key-encoder momentum, or
  `config.ema_decay` (0: none)."""
  if methods.uses_key_queue(config.method):
    return float(config.moco.momentum)
  return float(config.get("ema_decay", 0.0))


def fields_of_earlier_version(config, abstract: "TrainState") -> dict:
  """How to derive the fields a checkpoint written by an earlier version lacks: the tile
  statistics (the image pass's), the EMA (the parameters themselves) and the key queue (zero
  rows: only methods without one were written before it existed)."""

  def ema(fields):
    if ema_decay(config) > 0:
      return jax.tree.map(jnp.copy, fields["params"])
    return jnp.zeros((), jnp.float32)

  return {
      "tile_batch_stats": tile_stats_of_earlier_version,
      "ema_params": ema,
      "key_queue": lambda fields: jnp.zeros(abstract.key_queue.shape, abstract.key_queue.dtype),
  }


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def create_model(
    model_cfg, num_devices: int = 1, num_permutations: int = 1000
) -> pirl_model.PIRLNet:
  """The PIRL network of a `model` config block.

  Args:
    model_cfg: the block.
    num_devices: the mesh's device count; with `model.batch_norm='per_device'` each device's
      share of the batch is normalised with its own statistics.
    num_permutations: the jigsaw classifier's classes (`config.jigsaw_permutations`).
  """
  groups = num_devices if model_cfg.get("batch_norm", "global") == "per_device" else 1
  trunk = resnet.get_trunk(
      model_cfg.trunk,
      width_multiplier=model_cfg.width_multiplier,
      dtype=compute_dtype(model_cfg.dtype),
      bn_groups=groups,
  )
  return pirl_model.PIRLNet(
      trunk=trunk,
      embed_dim=model_cfg.embed_dim,
      head=model_cfg.head,
      head_batch_norm=model_cfg.get("head_batch_norm", False),
      num_permutations=num_permutations,
  )


def weight_decay_mask(params):
  """True for conv and dense kernels; BatchNorm parameters and biases are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params
  )


def create_optimizer(optim_cfg, learning_rate: float, warmup_steps: int, total_steps: int):
  """SGD with momentum and masked weight decay (or LARS, `optim.name='lars'`), cosine learning
  rate with optional warmup."""
  end_value = learning_rate * optim_cfg.final_learning_rate_fraction
  if warmup_steps > 0:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_value,
    )
  else:
    schedule = optax.cosine_decay_schedule(
        learning_rate, decay_steps=total_steps, alpha=optim_cfg.final_learning_rate_fraction
    )
  if optim_cfg.get("name", "sgd") == "lars":
    # SimCLR's recipe: LARS, with BatchNorm parameters and biases excluded from both the weight
    # decay and the trust-ratio adaptation.
    tx = optax.lars(
        schedule,
        weight_decay=optim_cfg.weight_decay,
        weight_decay_mask=weight_decay_mask,
        trust_coefficient=optim_cfg.get("lars_trust_coefficient", 0.001),
        trust_ratio_mask=weight_decay_mask,
        momentum=optim_cfg.momentum,
        nesterov=optim_cfg.nesterov,
    )
    return tx, schedule
  tx = optax.chain(
      optax.add_decayed_weights(optim_cfg.weight_decay, mask=weight_decay_mask),
      optax.sgd(schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
  )
  return tx, schedule


def state_shardings(abstract_state: TrainState, mesh):
  """Everything replicated except the memory bank and the key queue, whose rows are split over
  'data'."""
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract_state)
  return shardings.replace(
      bank=sharding_lib.bank_sharding(mesh), key_queue=sharding_lib.bank_sharding(mesh)
  )


def _example_inputs(config) -> dict:
  """One zero example of each view, shaped as the pipeline makes them."""
  views = config.data.views
  image = jnp.zeros((1, views.image_size, views.image_size, 3), jnp.float32)
  tile = (views.tile_size, views.tile_size, 3)
  return {
      "image": image,
      "rotated": image,
      "tiles": jnp.zeros((1, views.grid**2) + tile, jnp.float32),
      "patches": jnp.zeros((1, 2) + tile, jnp.float32),
  }


def init_variables(model, rng, config):
  """The variables of the heads `config.method` trains (and of the trunk)."""
  x = _example_inputs(config)
  init = lambda *args, method: model.init(rng, *args, train=False, method=method)
  method = config.method
  if method == "pirl":
    return model.init(rng, x["image"], x["tiles"], train=False)
  if method in ("npid", "pirl_rotation"):
    variables = init(x["image"], method="embed_images")
    if method == "npid":
      return variables
    rotated = init(x["rotated"], method="embed_rotated")
    # Both inits draw the trunk from the same `rng`, so the trunks are identical: f's variables
    # plus g's head.
    return {c: {**rotated[c], **variables[c]} for c in variables}
  if method in methods.TWO_VIEW_METHODS:
    return init(x["image"], method="embed_projected")
  if method == "jigsaw":
    return init(x["tiles"], method="classify_permutation")
  if method == "rotation":
    return init(x["image"], method="classify_rotation")
  if method == "relative_patch":
    return init(x["patches"], method="classify_relative_position")
  raise ValueError(f"Unknown method {method!r}; valid: {', '.join(methods.METHODS)}.")


def _init_fn(config, model, tx, num_examples: int, num_shards: int):
  # Covariant methods have no memory bank: a zero row per device keeps the state's structure
  # (and Orbax cannot save an empty array).
  num_rows = (
      memory_bank.padded_size(num_examples, num_shards)
      if methods.uses_bank(config.method)
      else num_shards
  )

  embed_dim = config.model.embed_dim
  queue_rows = (
      memory_bank.padded_size(config.moco.queue_size, num_shards)
      if methods.uses_key_queue(config.method)
      else num_shards
  )

  def init(rng):
    params_rng, bank_rng, step_rng = jax.random.split(rng, 3)
    variables = init_variables(model, params_rng, config)
    params = variables["params"]
    if methods.uses_bank(config.method):
      bank = memory_bank.init_bank(bank_rng, num_examples, config.model.embed_dim, num_rows)
    else:
      bank = jnp.zeros((num_rows, embed_dim), jnp.float32)
    if methods.uses_key_queue(config.method):
      # Its own key, so that the bank methods' draws stay what they were.
      queue_rng = jax.random.fold_in(bank_rng, 1)
      queue = key_queue.init_queue(queue_rng, config.moco.queue_size, embed_dim, queue_rows)
    else:
      queue = jnp.zeros((queue_rows, embed_dim), jnp.float32)
    # The key encoder starts as a copy of the query encoder (MoCo).
    ema = jax.tree.map(jnp.copy, params) if ema_decay(config) > 0 else jnp.zeros((), jnp.float32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        tile_batch_stats={"trunk": variables["batch_stats"]["trunk"]},
        opt_state=tx.init(params),
        bank=bank,
        nce_z=jnp.zeros((), jnp.float32),
        rng=step_rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        ema_params=ema,
        key_queue=queue,
    )

  return init


def abstract_train_state(config, model, tx, num_examples: int, mesh):
  """The state's shapes and dtypes, nothing computed or compiled. Returns (abstract, shardings)."""
  init = _init_fn(config, model, tx, num_examples, mesh.size)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  return abstract, state_shardings(abstract, mesh)


def create_train_state(config, model, tx, num_examples: int, mesh, seed: int):
  """The initial state, born sharded on `mesh`. Returns (state, shardings)."""
  init = _init_fn(config, model, tx, num_examples, mesh.size)
  rng = jax.random.PRNGKey(seed)
  shardings = state_shardings(jax.eval_shape(init, rng), mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings
