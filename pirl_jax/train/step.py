"""The PIRL train step: a pure function of (state, batch)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pirl_jax import losses
from pirl_jax import memory_bank
from pirl_jax import sharding as sharding_lib
from pirl_jax.train.state import TrainState


def is_finite_step(metrics):
  """True (a device bool) when the step's loss and gradient norm are both finite."""
  return jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])


def train_step(state: TrainState, batch, *, model, tx, schedule, loss_cfg, bank_momentum: float,
               num_examples: int, mesh=None, score_chunk_size: int = 1024,
               skip_nonfinite: bool = False, running_stats_from_images: bool = True,
               method: str = "pirl"):
  """One PIRL step: both trunk passes, heads, loss, optimizer, then the bank write.

  With `method='npid'` there is no jigsaw view: the image pass, the image term of the loss
  (Z, for NCE, from its scores) and the bank write; the batch has no 'tiles'.

  The order matters: both loss terms score against the *old* bank rows; only the image
  embedding f(v_I) is written, after the gradient step, without gradient. On a `mesh` the bank
  stays row-sharded throughout (`memory_bank.score` / `update`); None runs on plain arrays.

  With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves params,
  batch_stats, opt_state, bank and nce_z as they were; the step counter and the negatives' key
  still advance (so the data and the randomness of later steps do not depend on skips) and
  `nonfinite_steps` counts it. The optimizer's own step count is part of the kept state, so its
  learning-rate schedule runs one step behind `state.step` per skipped step.

  With `running_stats_from_images`, the BatchNorm running averages are updated by the image pass
  only (the tile pass still normalises with its own batch statistics): training is unchanged, and
  the statistics that evaluation uses describe images. Otherwise the tile pass updates them first,
  then the image pass, as in the reference implementation.

  Returns:
    (new_state, metrics) with scalar metrics for this step.
  """
  rng, jigsaw_rng, image_rng = jax.random.split(state.rng, 3)
  index = batch["index"]
  k = loss_cfg.num_negatives
  negatives_jigsaw = memory_bank.sample_negatives(
      jigsaw_rng, index, k, num_examples, exclude_positive=loss_cfg.exclude_positive)
  negatives_image = memory_bank.sample_negatives(
      image_rng, index, k, num_examples, exclude_positive=loss_cfg.exclude_positive)
  if mesh is not None:
    # Each device draws only its queries' negatives (B/devices x K), not all of them.
    negatives_jigsaw, negatives_image = (
        jax.lax.with_sharding_constraint(n, sharding_lib.batch_sharding(mesh))
        for n in (negatives_jigsaw, negatives_image))

  def embed(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if method == "npid":
      f_hat, new_vars = model.apply(variables, batch["image"], train=True,
                                    mutable=["batch_stats"], method="embed_images")
      return f_hat.astype(jnp.float32), None, new_vars["batch_stats"]
    if running_stats_from_images:
      # Only evaluation uses the running statistics: let the trunk's describe images, not
      # tiles. The jigsaw head's own BatchNorm (model.head_batch_norm) sees tiles only: it keeps
      # the tile pass's.
      g_hat, tile_vars = model.apply(variables, batch["tiles"], train=True,
                                     mutable=["batch_stats"], method="embed_tiles")
      f_hat, new_vars = model.apply(variables, batch["image"], train=True,
                                    mutable=["batch_stats"], method="embed_images")
      tile_stats = tile_vars["batch_stats"]
      if "g_tile_norm" in tile_stats:
        new_vars = {"batch_stats": {**new_vars["batch_stats"],
                                    "g_tile_norm": tile_stats["g_tile_norm"]}}
    else:
      (f_hat, g_hat), new_vars = model.apply(variables, batch["image"], batch["tiles"],
                                             train=True, mutable=["batch_stats"])
    return f_hat.astype(jnp.float32), g_hat.astype(jnp.float32), new_vars["batch_stats"]

  def loss_fn(params):
    f_hat, g_hat, batch_stats = embed(params)
    logits_jigsaw = None if g_hat is None else memory_bank.score(
        g_hat, state.bank, index, negatives_jigsaw, loss_cfg.temperature, mesh, score_chunk_size)
    logits_image = memory_bank.score(f_hat, state.bank, index, negatives_image,
                                     loss_cfg.temperature, mesh, score_chunk_size)
    scored = [l for l in (logits_jigsaw, logits_image) if l is not None]
    if loss_cfg.kind == "nce":
      # Z from both terms' scores, or (VISSL) from the jigsaw term's only.
      z_from = [logits_jigsaw] if loss_cfg.nce_z_from == "jigsaw" else scored
      z_batch = losses.estimate_z([jax.lax.stop_gradient(l) for l in z_from], num_examples)
      z = jnp.where(state.nce_z > 0, state.nce_z, z_batch)
    else:
      z_batch = z = jnp.zeros((), jnp.float32)
    loss = losses.pirl_loss(logits_jigsaw, logits_image, kind=loss_cfg.kind, z=z,
                            num_examples=num_examples, lam=loss_cfg.jigsaw_weight,
                            nce_eps=loss_cfg.nce_eps)
    tau = loss_cfg.temperature
    similarities = {
        "positive_similarity": sum(jnp.mean(l[:, 0]) for l in scored) * tau / len(scored),
        "negative_similarity": sum(jnp.mean(l[:, 1:]) for l in scored) * tau / len(scored),
    }
    aux = dict(batch_stats=batch_stats, f_hat=f_hat, z=z, z_batch=z_batch, loss=loss,
               similarities=jax.lax.stop_gradient(similarities))
    return loss.total, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  bank = memory_bank.update(state.bank, index, aux["f_hat"], bank_momentum, mesh)

  if loss_cfg.kind == "nce":
    nce_z = jnp.where(state.nce_z > 0,
                      losses.update_z(state.nce_z, aux["z_batch"], loss_cfg.nce_z_ema),
                      aux["z_batch"])
  else:
    nce_z = state.nce_z

  metrics = {
      "loss": loss,
      **({} if aux["loss"].jigsaw is None else {"loss_jigsaw": aux["loss"].jigsaw}),
      "loss_image": aux["loss"].image,
      "nce_z": aux["z"],
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
      **aux["similarities"],
  }
  learned = dict(params=params, batch_stats=aux["batch_stats"], opt_state=opt_state, bank=bank,
                 nce_z=nce_z)
  nonfinite_steps = state.nonfinite_steps
  if skip_nonfinite:
    ok = is_finite_step(metrics)
    old = dict(params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state,
               bank=state.bank, nce_z=state.nce_z)
    learned = jax.tree.map(lambda new, prev: jnp.where(ok, new, prev), learned, old)
    nonfinite_steps = nonfinite_steps + jnp.where(ok, 0, 1).astype(nonfinite_steps.dtype)
  new_state = state.replace(step=state.step + 1, rng=rng, nonfinite_steps=nonfinite_steps,
                            **learned)
  return new_state, metrics


def jit_train_step(mesh, state_shardings, **step_kwargs):
  """`train_step` under jit with explicit shardings; the input state is donated."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  step = functools.partial(train_step, mesh=mesh, **step_kwargs)
  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0,
  )
