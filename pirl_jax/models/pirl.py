"""The PIRL network: one shared trunk, image head f and jigsaw head g.

``PIRLNet.__call__`` runs the trunk twice with the same weights: first on the B*9 tiles
(``embed_tiles``), then on the B images (``embed_images``). Each pass normalises with its own batch
statistics, and because both calls go through the same BatchNorm submodules inside one
``apply(..., mutable=['batch_stats'])``, the running statistics are updated by the tile pass and then
by the image pass (the order of the reference implementation). The train step can instead apply the
two methods separately and keep only the image pass's update, so that the running statistics, which
only evaluation uses, describe images (``model.bn_running_stats='images'``).

Heads (torch-style Linear init):
  * ``'linear'``: f = Linear(F->E) on image features; g = per-tile Linear(F->E), the 9 tile embeddings
    concatenated in their given (shuffled) order, then Linear(9E->E).
  * ``'mlp'`` (VISSL mlphead): f = Linear(F->F), ReLU, Linear(F->E); g = the same per-tile MLP
    (separate parameters), concatenated, then Linear(9E->E).
Both outputs are L2-normalised.

Parameter layout: ``params['trunk']`` is exactly the parameter tree of the trunk module alone, so
evaluation can apply the trunk with ``{'params': params['trunk'], 'batch_stats':
batch_stats['trunk']}``, or use ``PIRLNet.apply(variables, images, train=False,
method=PIRLNet.trunk_features)``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pirl_jax.losses import l2_normalize
from pirl_jax.models.resnet import torch_dense

HEADS = ('linear', 'mlp')


class PIRLNet(nn.Module):
  """Shared trunk + heads f (image) and g (jigsaw).

  Attributes:
    trunk: Feature module ``trunk(x, train=...) -> (N, F)`` (e.g. ``resnet.get_trunk('resnet50')``).
    embed_dim: Embedding size E (128).
    head: ``'linear'`` (paper) or ``'mlp'`` (VISSL mlphead).
    head_batch_norm: a BatchNorm (batch statistics in training) on the trunk's pooled features
      before each head: centred and scaled features, as in SimCLR's projection head. Not in
      the paper; its statistics are the heads' own, the trunk's are unchanged.
    num_tiles: Tiles per example (9).
    dtype: Compute dtype of the heads; outputs are float32.
  """
  trunk: nn.Module
  embed_dim: int = 128
  head: str = 'linear'
  head_batch_norm: bool = False
  num_tiles: int = 9
  dtype: Any = jnp.float32

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f'Unknown head {self.head!r}; valid: {", ".join(HEADS)}')
    features = self.trunk.num_features
    dense = lambda out, fan_in: torch_dense(out, fan_in, dtype=self.dtype)
    if self.head == 'mlp':
      self.f_hidden = dense(features, features)
      self.g_tile_hidden = dense(features, features)
    self.f_out = dense(self.embed_dim, features)
    self.g_tile_out = dense(self.embed_dim, features)
    if self.head_batch_norm:
      norm = lambda: nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
      self.f_norm, self.g_tile_norm = norm(), norm()
    self.g_concat = dense(self.embed_dim, self.num_tiles * self.embed_dim)

  def trunk_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Pooled trunk features ``(B, F)`` of images, for evaluation (BN in inference mode by default)."""
    return self.trunk(images, train=train)

  def embed_images(self, images: jax.Array, train: bool) -> jax.Array:
    """f_hat of the image views ``(B, S, S, 3)``: ``(B, embed_dim)`` float32, L2-normalised."""
    x = self.trunk(images, train=train)
    if self.head_batch_norm:
      x = self.f_norm(x, use_running_average=not train)
    if self.head == 'mlp':
      x = nn.relu(self.f_hidden(x))
    return l2_normalize(self.f_out(x).astype(jnp.float32))

  def embed_tiles(self, tiles: jax.Array, train: bool) -> jax.Array:
    """g_hat of the jigsaw views ``(B, num_tiles, T, T, 3)``, tiles in their shuffled order."""
    batch = tiles.shape[0]
    if tiles.ndim != 5 or tiles.shape[1] != self.num_tiles:
      raise ValueError(f'tiles must have shape (B, {self.num_tiles}, T, T, C), got {tiles.shape}')
    x = self.trunk(tiles.reshape((batch * self.num_tiles,) + tiles.shape[2:]), train=train)
    if self.head_batch_norm:
      x = self.g_tile_norm(x, use_running_average=not train)
    if self.head == 'mlp':
      x = nn.relu(self.g_tile_hidden(x))
    g = self.g_tile_out(x).reshape(batch, self.num_tiles * self.embed_dim)
    return l2_normalize(self.g_concat(g).astype(jnp.float32))

  def __call__(self, images: jax.Array, tiles: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array]:
    """Embeds both views: the tiles first, then the images.

    Args:
      images: ``(B, S, S, 3)`` image views v_I.
      tiles: ``(B, num_tiles, T, T, 3)`` jigsaw tiles v_It, in their shuffled order.
      train: BatchNorm mode of the trunk.

    Returns:
      ``(f_hat, g_hat)``, each ``(B, embed_dim)`` float32 and L2-normalised.
    """
    if tiles.shape[0] != images.shape[0]:
      raise ValueError(f'tiles must have shape (B={images.shape[0]}, {self.num_tiles}, T, T, C), '
                       f'got {tiles.shape}')
    # Tiles first, then images: the order in which the running BN statistics are updated.
    g = self.embed_tiles(tiles, train)
    f = self.embed_images(images, train)
    return f, g
