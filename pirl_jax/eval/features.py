"""Pooled trunk features of a set of images, BatchNorm in inference mode, on the device mesh.

The images go through the deterministic eval view (`pirl_jax.data.labelled_views.eval_image`),
batches are sharded over the mesh's `data` axis, and the features come back to every host as one
(N, F) NumPy array in the images' order.
"""

from __future__ import annotations

import jax
import numpy as np

from pirl_jax import sharding as sharding_lib


def feature_fn(trunk, mesh):
  """A jitted `(variables, images) -> (B, F)` pooled features, inference-mode BatchNorm."""

  def apply(variables, images):
    return trunk.apply(variables, images, train=False)

  return jax.jit(
      apply,
      in_shardings=(sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)),
      out_shardings=sharding_lib.replicated(mesh),
  )


def extract(fn, variables, eval_input, mesh) -> np.ndarray:
  """Features of every image of `eval_input` (`labelled_input.EvalInput`), in order: (N, F) f32."""
  outputs = []
  for batch in eval_input.batches():
    images = sharding_lib.global_batch({"image": batch["image"]}, mesh)["image"]
    # A replicated array is complete on every device, also on multi-host runs.
    outputs.append(np.asarray(fn(variables, images).addressable_data(0)))
  return np.concatenate(outputs)[: eval_input.num_examples].astype(np.float32)
