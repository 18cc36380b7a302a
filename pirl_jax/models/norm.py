"""BatchNorm with statistics per group of the batch: per-device BatchNorm under jit.

The reference PyTorch implementations of PIRL run one process per GPU, so BatchNorm there
normalises each GPU's share of the batch with that share's statistics. Under `jax.jit` over a
mesh, `flax.linen.BatchNorm` computes statistics over the global batch. This BatchNorm splits the
batch into `groups` contiguous parts and normalises each with its own statistics; with `groups`
equal to the device count and the batch sharded over the devices (each device holds one
contiguous part), the statistics are each device's own and need no communication. The running
averages are updated with the mean of the groups' statistics.

The class is named `BatchNorm`, and its variables are those of `flax.linen.BatchNorm` (params
`scale`, `bias`; batch_stats `mean`, `var`), so a network's variable tree, and its checkpoints, are
the same with either.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with per-group batch statistics in training.

  Attributes:
    groups: contiguous parts of the leading (batch) axis normalised separately; it must divide
      the batch size.
    use_running_average, momentum, epsilon, dtype, param_dtype, scale_init, bias_init: as
      `flax.linen.BatchNorm`.
  """

  groups: int = 1
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      if x.shape[0] % self.groups:
        raise ValueError(f"A batch of {x.shape[0]} does not split into {self.groups} groups.")
      grouped = x32.reshape((self.groups, x.shape[0] // self.groups) + x.shape[1:])
      axes = tuple(range(1, grouped.ndim - 1))
      mean = jnp.mean(grouped, axis=axes, keepdims=True)
      var = jnp.maximum(
          jnp.mean(jnp.square(grouped), axis=axes, keepdims=True) - jnp.square(mean), 0.0
      )
      y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        group_axes = tuple(range(grouped.ndim - 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jnp.mean(
            mean, axis=group_axes
        )
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jnp.mean(
            var, axis=group_axes
        )
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)
