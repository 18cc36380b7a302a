"""The pretraining step of every method: a pure function of (state, batch)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pirl_jax import key_queue
from pirl_jax import losses
from pirl_jax import memory_bank
from pirl_jax import methods
from pirl_jax import sharding as sharding_lib
from pirl_jax.train.state import TrainState


def is_finite_step(metrics):
  """True (a device bool) when the step's loss and gradient norm are both finite."""
  return jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])


def rotation_batch(images):
  """Every image in its four rotations (0/90/180/270 degrees counter-clockwise) and the labels.

  An image's four copies are adjacent rows, so a device's share of the batch stays its own
  (per-device BatchNorm groups see whole examples).

  Returns:
    (rotated (4B, S, S, C), labels int32 (4B,)).
  """
  rotated = jnp.stack(
      [jnp.rot90(images, k, axes=(1, 2)) for k in range(methods.NUM_ROTATIONS)], axis=1
  )
  labels = jnp.tile(jnp.arange(methods.NUM_ROTATIONS, dtype=jnp.int32), images.shape[0])
  return rotated.reshape((-1,) + images.shape[1:]), labels


def _head_stats(batch_stats) -> dict:
  """The heads' own BatchNorm statistics (g_tile_norm, g_rot_norm) of a pass's update."""
  return {name: stats for name, stats in batch_stats.items() if name.startswith("g_")}


def classification_logits(model, variables, batch, method: str, train: bool = True):
  """The covariant method's logits and labels. Returns (logits, labels, new batch_stats)."""
  if method == "rotation":
    inputs, labels = rotation_batch(batch["image"])
    apply_method = "classify_rotation"
  else:
    inputs, labels = (
        (batch["tiles"], batch["label"])
        if method == "jigsaw"
        else (batch["patches"], batch["label"])
    )
    apply_method = "classify_permutation" if method == "jigsaw" else "classify_relative_position"
  logits, new_vars = model.apply(
      variables, inputs, train=train, mutable=["batch_stats"], method=apply_method
  )
  return logits, labels, new_vars["batch_stats"]


def _bank_loss_fn(
    state: TrainState,
    batch,
    *,
    model,
    loss_cfg,
    num_examples: int,
    mesh,
    score_chunk_size: int,
    running_stats_from_images: bool,
    method: str,
):
  """The memory-bank loss of PIRL (or its rotation variant, or NPID) as a function of params."""
  rng, transformed_rng, image_rng = jax.random.split(state.rng, 3)
  index = batch["index"]
  k = loss_cfg.num_negatives
  negatives_transformed = memory_bank.sample_negatives(
      transformed_rng, index, k, num_examples, exclude_positive=loss_cfg.exclude_positive
  )
  negatives_image = memory_bank.sample_negatives(
      image_rng, index, k, num_examples, exclude_positive=loss_cfg.exclude_positive
  )
  if mesh is not None:
    # Each device draws only its queries' negatives (B/devices x K), not all of them.
    negatives_transformed, negatives_image = (
        jax.lax.with_sharding_constraint(n, sharding_lib.batch_sharding(mesh))
        for n in (negatives_transformed, negatives_image)
    )
  transformed = methods.transformed_view(method)

  def embed(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    if transformed is None:
      f_hat, new_vars = apply(variables, batch["image"], method="embed_images")
      stats = new_vars["batch_stats"]
      return f_hat.astype(jnp.float32), None, stats, {"trunk": stats["trunk"]}
    if transformed == "rotated":
      # The trunk's running statistics describe the upright images; g_rot's head BatchNorm
      # (model.head_batch_norm) sees the rotated views only: it keeps that pass's.
      g_hat, g_vars = apply(variables, batch["rotated"], method="embed_rotated")
      f_hat, new_vars = apply(variables, batch["image"], method="embed_images")
      stats = {**new_vars["batch_stats"], **_head_stats(g_vars["batch_stats"])}
      return (
          f_hat.astype(jnp.float32),
          g_hat.astype(jnp.float32),
          stats,
          {"trunk": stats["trunk"]},
      )
    # The tile pass starts from (and updates) the trunk's tile statistics, the image pass the
    # image statistics. Training does not read either (each pass normalises with its own batch
    # statistics); evaluation of the trunk and g on tiles uses the first, of images the second.
    tile_variables = {
        "params": params,
        "batch_stats": {**state.batch_stats, **state.tile_batch_stats},
    }
    g_hat, g_vars = apply(tile_variables, batch["tiles"], method="embed_tiles")
    tile_stats = {"trunk": g_vars["batch_stats"]["trunk"]}
    image_stats = state.batch_stats
    if not running_stats_from_images:
      # The reference implementation's order: the tiles' batch moments enter the running
      # statistics first, then the images'. The tile pass above added (1 - m) * moments to m *
      # its own statistics; the same increment applied to m * the shared statistics.
      momentum = model.trunk.bn_momentum
      increment = jax.tree.map(
          lambda new, old: new - momentum * old,
          tile_stats["trunk"],
          state.tile_batch_stats["trunk"],
      )
      image_stats = {
          **state.batch_stats,
          "trunk": jax.tree.map(
              lambda shared, inc: momentum * shared + inc, state.batch_stats["trunk"], increment
          ),
      }
    f_hat, new_vars = apply(
        {"params": params, "batch_stats": image_stats}, batch["image"], method="embed_images"
    )
    # g's own head BatchNorm (model.head_batch_norm) sees the tiles only: it keeps that pass's.
    stats = {**new_vars["batch_stats"], **_head_stats(g_vars["batch_stats"])}
    return f_hat.astype(jnp.float32), g_hat.astype(jnp.float32), stats, tile_stats

  def loss_fn(params):
    f_hat, g_hat, batch_stats, tile_batch_stats = embed(params)
    logits_transformed = (
        None
        if g_hat is None
        else memory_bank.score(
            g_hat,
            state.bank,
            index,
            negatives_transformed,
            loss_cfg.temperature,
            mesh,
            score_chunk_size,
        )
    )
    logits_image = memory_bank.score(
        f_hat, state.bank, index, negatives_image, loss_cfg.temperature, mesh, score_chunk_size
    )
    scored = [l for l in (logits_transformed, logits_image) if l is not None]
    if loss_cfg.kind == "nce":
      # Z from both terms' scores, or (VISSL) from the jigsaw term's only.
      z_from = [logits_transformed] if loss_cfg.nce_z_from == "jigsaw" else scored
      z_batch = losses.estimate_z([jax.lax.stop_gradient(l) for l in z_from], num_examples)
      z = jnp.where(state.nce_z > 0, state.nce_z, z_batch)
    else:
      z_batch = z = jnp.zeros((), jnp.float32)
    loss = losses.pirl_loss(
        logits_transformed,
        logits_image,
        kind=loss_cfg.kind,
        z=z,
        num_examples=num_examples,
        lam=loss_cfg.jigsaw_weight,
        nce_eps=loss_cfg.nce_eps,
    )
    tau = loss_cfg.temperature
    metrics = {
        "loss_image": loss.image,
        "nce_z": z,
        "positive_similarity": sum(jnp.mean(l[:, 0]) for l in scored) * tau / len(scored),
        "negative_similarity": sum(jnp.mean(l[:, 1:]) for l in scored) * tau / len(scored),
    }
    if loss.jigsaw is not None:
      metrics["loss_jigsaw" if transformed == "tiles" else "loss_rotated"] = loss.jigsaw
    aux = dict(
        batch_stats=batch_stats,
        tile_batch_stats=tile_batch_stats,
        f_hat=f_hat,
        z_batch=z_batch,
        metrics=jax.lax.stop_gradient(metrics),
    )
    return loss.total, aux

  return loss_fn, rng


def ema_update(ema, params, decay: float):
  """``decay * ema + (1 - decay) * params``, leaf by leaf (no gradient)."""
  return jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * jax.lax.stop_gradient(p).astype(e.dtype),
      ema,
      params,
  )


def pair_views(first, second):
  """(B, ...) and (B, ...) -> (2B, ...) with an example's two views in adjacent rows, so that a
  device's share of the batch keeps both views of its examples (per-device BatchNorm groups)."""
  return jnp.stack([first, second], axis=1).reshape((-1,) + first.shape[1:])


def _moco_loss_fn(state: TrainState, batch, *, model, moco_cfg, mesh, shuffle_keys: bool):
  """MoCo v2's loss as a function of params, and the key encoder and keys of this step.

  As MoCo: the key encoder (the EMA of the parameters) first moves towards the current query
  encoder, then embeds the key views (BatchNorm in training mode; with per-device BatchNorm the
  key batch is shuffled across devices and un-shuffled after, MoCo's shuffling BN); the queries
  are scored against their keys and the old queue.
  """
  rng, shuffle_rng = jax.random.split(state.rng)
  key_params = ema_update(state.ema_params, state.params, moco_cfg.momentum)
  key_views = batch["image_2"]
  if shuffle_keys:
    order = jax.random.permutation(shuffle_rng, key_views.shape[0])
    key_views = key_views[order]
  keys, _ = model.apply(
      {"params": key_params, "batch_stats": state.batch_stats},
      key_views,
      train=True,
      mutable=["batch_stats"],
      method="embed_projected",
  )
  if shuffle_keys:
    keys = keys[jnp.argsort(order)]
  keys = jax.lax.stop_gradient(keys.astype(jnp.float32))

  def loss_fn(params):
    queries, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        method="embed_projected",
    )
    loss, metrics = key_queue.moco_loss(
        queries, keys, state.key_queue, moco_cfg.queue_size, moco_cfg.temperature, mesh
    )
    stats = new_vars["batch_stats"]
    return loss, dict(
        batch_stats=stats, tile_batch_stats={"trunk": stats["trunk"]}, metrics=metrics
    )

  return loss_fn, rng, key_params, keys


def _simclr_loss_fn(state: TrainState, batch, *, model, simclr_cfg):
  """SimCLR's NT-Xent as a function of params: both views in one pass over the 2B views."""

  def loss_fn(params):
    views = pair_views(batch["image"], batch["image_2"])
    embeddings, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        views,
        train=True,
        mutable=["batch_stats"],
        method="embed_projected",
    )
    loss, metrics = losses.nt_xent_loss(embeddings, simclr_cfg.temperature)
    stats = new_vars["batch_stats"]
    return loss, dict(
        batch_stats=stats, tile_batch_stats={"trunk": stats["trunk"]}, metrics=metrics
    )

  return loss_fn


def _classification_loss_fn(state: TrainState, batch, *, model, method: str):
  """The covariant pretext's softmax cross-entropy as a function of params."""

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, labels, batch_stats = classification_logits(model, variables, batch, method)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    # One pass: on tiles (jigsaw, relative_patch) or on rotated images (rotation).
    return loss, dict(
        batch_stats=batch_stats,
        tile_batch_stats={"trunk": batch_stats["trunk"]},
        metrics={"accuracy": accuracy},
    )

  return loss_fn


def train_step(
    state: TrainState,
    batch,
    *,
    model,
    tx,
    schedule,
    loss_cfg,
    bank_momentum: float,
    num_examples: int,
    mesh=None,
    score_chunk_size: int = 1024,
    skip_nonfinite: bool = False,
    running_stats_from_images: bool = True,
    method: str = "pirl",
    moco_cfg=None,
    simclr_cfg=None,
    ema_decay: float = 0.0,
    shuffle_keys: bool = False,
):
  """One pretraining step of `method` (`pirl_jax.methods`): forward, loss, optimizer, bank write.

  PIRL: both trunk passes, heads, loss, then the bank write. PIRL-rotation: the same with the
  rotated image view in place of the tiles. NPID: no transformed view: the image pass, the image
  term of the loss (Z, for NCE, from its scores) and the bank write. The covariant methods
  (jigsaw, rotation, relative_patch): one pass, softmax cross-entropy on the transform's label;
  their state has an empty bank and no step touches it. MoCo v2: the key encoder (the EMA in
  the state) moves towards the query encoder and embeds the key views, InfoNCE of the queries
  against their keys and the old queue (`key_queue`), the optimizer step, then the keys replace
  the oldest rows of the queue. SimCLR: NT-Xent over the batch's 2B views, one pass.

  Any other method with `ema_decay` > 0 keeps an EMA of its parameters, updated after the
  optimizer step (`state.ema_params`).

  The order matters: both loss terms score against the *old* bank rows; only the image
  embedding f(v_I) is written, after the gradient step, without gradient. On a `mesh` the bank
  stays row-sharded throughout (`memory_bank.score` / `update`); None runs on plain arrays.

  With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves params,
  batch_stats, opt_state, bank, nce_z, the EMA and the key queue as they were; the step counter
  and the negatives' key still advance (so the data and the randomness of later steps do not
  depend on skips) and `nonfinite_steps` counts it. The optimizer's own step count is part of the kept state, so its
  learning-rate schedule runs one step behind `state.step` per skipped step.

  Running statistics (only evaluation reads them; training normalises each pass with its own
  batch statistics): `state.tile_batch_stats` is the trunk's average of the tile pass's batch
  moments alone, for evaluating the trunk and g on tiles. `state.batch_stats` is, with
  `running_stats_from_images`, the image pass's alone, for probes and fine-tuning on images;
  otherwise the tiles' moments enter it first, then the images', as in the reference
  implementation. (PIRL-rotation keeps the unrotated image pass's; a method with one pass keeps
  that pass's in both.)

  Returns:
    (new_state, metrics) with scalar metrics for this step.
  """
  bank_method = methods.uses_bank(method)
  if bank_method:
    loss_fn, rng = _bank_loss_fn(
        state,
        batch,
        model=model,
        loss_cfg=loss_cfg,
        num_examples=num_examples,
        mesh=mesh,
        score_chunk_size=score_chunk_size,
        running_stats_from_images=running_stats_from_images,
        method=method,
    )
  elif method == "moco_v2":
    loss_fn, rng, key_params, keys = _moco_loss_fn(
        state, batch, model=model, moco_cfg=moco_cfg, mesh=mesh, shuffle_keys=shuffle_keys
    )
  elif method == "simclr":
    loss_fn, rng = _simclr_loss_fn(state, batch, model=model, simclr_cfg=simclr_cfg), state.rng
  else:
    loss_fn, rng = _classification_loss_fn(state, batch, model=model, method=method), state.rng

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  bank, nce_z = state.bank, state.nce_z
  if bank_method:
    bank = memory_bank.update(state.bank, batch["index"], aux["f_hat"], bank_momentum, mesh)
    if loss_cfg.kind == "nce":
      nce_z = jnp.where(
          state.nce_z > 0,
          losses.update_z(state.nce_z, aux["z_batch"], loss_cfg.nce_z_ema),
          aux["z_batch"],
      )

  ema_params, queue = state.ema_params, state.key_queue
  if method == "moco_v2":
    ema_params = key_params
    queue = key_queue.write(state.key_queue, keys, state.step, moco_cfg.queue_size, mesh)
  elif ema_decay > 0:
    ema_params = ema_update(state.ema_params, params, ema_decay)

  metrics = {
      "loss": loss,
      **aux["metrics"],
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
  }
  learned = dict(
      params=params,
      batch_stats=aux["batch_stats"],
      tile_batch_stats=aux["tile_batch_stats"],
      opt_state=opt_state,
      bank=bank,
      nce_z=nce_z,
      ema_params=ema_params,
      key_queue=queue,
  )
  nonfinite_steps = state.nonfinite_steps
  if skip_nonfinite:
    ok = is_finite_step(metrics)
    old = dict(
        params=state.params,
        batch_stats=state.batch_stats,
        tile_batch_stats=state.tile_batch_stats,
        opt_state=state.opt_state,
        bank=state.bank,
        nce_z=state.nce_z,
        ema_params=state.ema_params,
        key_queue=state.key_queue,
    )
    learned = jax.tree.map(lambda new, prev: jnp.where(ok, new, prev), learned, old)
    nonfinite_steps = nonfinite_steps + jnp.where(ok, 0, 1).astype(nonfinite_steps.dtype)
  new_state = state.replace(
      step=state.step + 1, rng=rng, nonfinite_steps=nonfinite_steps, **learned
  )
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
