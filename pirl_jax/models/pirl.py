"""The PIRL network: one shared trunk, image head f and jigsaw head g.

``PIRLNet.__call__`` runs the trunk twice with the same weights: first on the B*9 tiles, then on the B
images. Each pass normalises with its own batch statistics, and because both calls go through the same
BatchNorm submodules inside one ``apply(..., mutable=['batch_stats'])``, the running statistics are
updated by the tile pass and then by the image pass (the order of the reference implementation).

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
    num_tiles: Tiles per example (9).
    dtype: Compute dtype of the heads; outputs are float32.
  """
  trunk: nn.Module
  embed_dim: int = 128
  head: str = 'linear'
  num_tiles: int = 9
  dtype: Any = jnp.float32

  def trunk_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Pooled trunk features ``(B, F)`` of images, for evaluation (BN in inference mode by default)."""
    return self.trunk(images, train=train)

  def _embed(self, feats: jax.Array, prefix: str) -> jax.Array:
    fan_in = feats.shape[-1]
    if self.head == 'mlp':
      feats = torch_dense(fan_in, fan_in, dtype=self.dtype, name=f'{prefix}_hidden')(feats)
      feats = nn.relu(feats)
    return torch_dense(self.embed_dim, fan_in, dtype=self.dtype, name=f'{prefix}_out')(feats)

  @nn.compact
  def __call__(self, images: jax.Array, tiles: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array]:
    """Embeds both views.

    Args:
      images: ``(B, S, S, 3)`` image views v_I.
      tiles: ``(B, num_tiles, T, T, 3)`` jigsaw tiles v_It, in their shuffled order.
      train: BatchNorm mode of the trunk.

    Returns:
      ``(f_hat, g_hat)``, each ``(B, embed_dim)`` float32 and L2-normalised.
    """
    if self.head not in HEADS:
      raise ValueError(f'Unknown head {self.head!r}; valid: {", ".join(HEADS)}')
    batch = images.shape[0]
    if tiles.ndim != 5 or tiles.shape[:2] != (batch, self.num_tiles):
      raise ValueError(f'tiles must have shape (B={batch}, {self.num_tiles}, T, T, C), '
                       f'got {tiles.shape}')

    # Tiles first, then images: the order in which the running BN statistics are updated.
    tile_feats = self.trunk(tiles.reshape((batch * self.num_tiles,) + tiles.shape[2:]),
                            train=train)
    image_feats = self.trunk(images, train=train)

    f = self._embed(image_feats, 'f')
    g = self._embed(tile_feats, 'g_tile')
    g = g.reshape(batch, self.num_tiles * self.embed_dim)
    g = torch_dense(self.embed_dim, g.shape[-1], dtype=self.dtype, name='g_concat')(g)
    return (l2_normalize(f.astype(jnp.float32)), l2_normalize(g.astype(jnp.float32)))
