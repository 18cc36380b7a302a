"""The PIRL network: one shared trunk, image head f and jigsaw head g.

``PIRLNet.__call__`` runs the trunk twice with the same weights: first on the B*9 tiles
(``embed_tiles``), then on the B images (``embed_images``). Each pass normalises with its own batch
statistics, and because both calls go through the same BatchNorm submodules inside one
``apply(..., mutable=['batch_stats'])``, the running statistics are updated by the tile pass and then
by the image pass (the order of the reference implementation). The train step can instead apply the
two methods separately and keep each pass's update apart (``TrainState.batch_stats`` from the images,
``TrainState.tile_batch_stats`` from the tiles), so that evaluation applies each pass with the
statistics of what it was trained on.

Heads (torch-style Linear init):
  * ``'linear'``: f = Linear(F->E) on image features; g = per-tile Linear(F->E), the 9 tile embeddings
    concatenated in their given (shuffled) order, then Linear(9E->E).
  * ``'mlp'`` (VISSL mlphead): f = Linear(F->F), ReLU, Linear(F->E); g = the same per-tile MLP
    (separate parameters), concatenated, then Linear(9E->E).
Both outputs are L2-normalised.

The other methods (`pirl_jax.methods`) reuse these pieces: PIRL-rotation's g is f's structure with
its own parameters (g_rot_*) on the rotated image; the covariant classifiers put one Linear on the
same inputs: jigsaw on the 9 concatenated tile embeddings (9E -> P permutations, where PIRL's
g_concat has 9E -> E), relative patch on the centre and neighbour tile embeddings (2E -> 8),
rotation on the image features (F -> 4; after f's BatchNorm / hidden layer when configured).
MoCo v2 and SimCLR embed both their image views with a projection MLP of their papers, whatever
`head` says: Linear(F->F), ReLU, Linear(F->E) (proj_hidden, proj_out), L2-normalised.

Parameter layout: ``params['trunk']`` is exactly the parameter tree of the trunk module alone, so
evaluation can apply the trunk with ``{'params': params['trunk'], 'batch_stats':
batch_stats['trunk']}``, or use ``PIRLNet.apply(variables, images, train=False,
method=PIRLNet.trunk_features)``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pirl_jax import methods
from pirl_jax.losses import l2_normalize
from pirl_jax.models.resnet import torch_dense

HEADS = ('linear', 'mlp')


class PIRLNet(nn.Module):
  """Shared trunk + heads f (image) and g (jigsaw), and the heads of the other methods.

  Only the heads a method calls get parameters (`methods`): PIRL f_*, g_tile_*, g_concat;
  PIRL-rotation f_*, g_rot_*; NPID f_*; MoCo v2 and SimCLR proj_*; jigsaw g_tile_*, jigsaw_classifier; rotation f_*
  (norm/hidden), rotation_classifier; relative patch g_tile_*, relative_position_classifier.

  Attributes:
    trunk: Feature module ``trunk(x, train=...) -> (N, F)`` (e.g. ``resnet.get_trunk('resnet50')``).
    embed_dim: Embedding size E (128).
    head: ``'linear'`` (paper) or ``'mlp'`` (VISSL mlphead).
    head_batch_norm: a BatchNorm (batch statistics in training) on the trunk's pooled features
      before each head: centred and scaled features, as in SimCLR's projection head. Not in
      the paper; its statistics are the heads' own, the trunk's are unchanged.
    num_tiles: Tiles per example (9).
    num_permutations: Classes of the covariant jigsaw classifier.
    dtype: Compute dtype of the heads; outputs are float32.
  """

  trunk: nn.Module
  embed_dim: int = 128
  head: str = 'linear'
  head_batch_norm: bool = False
  num_tiles: int = 9
  num_permutations: int = 1000
  dtype: Any = jnp.float32

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f'Unknown head {self.head!r}; valid: {", ".join(HEADS)}')
    features = self.trunk.num_features
    dense = lambda out, fan_in: torch_dense(out, fan_in, dtype=self.dtype)
    if self.head == 'mlp':
      self.f_hidden = dense(features, features)
      self.g_tile_hidden = dense(features, features)
      self.g_rot_hidden = dense(features, features)
    self.f_out = dense(self.embed_dim, features)
    self.g_tile_out = dense(self.embed_dim, features)
    self.g_rot_out = dense(self.embed_dim, features)
    if self.head_batch_norm:
      norm = lambda: nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
      self.f_norm, self.g_tile_norm, self.g_rot_norm = norm(), norm(), norm()
      self.proj_norm = norm()
    self.proj_hidden = dense(features, features)
    self.proj_out = dense(self.embed_dim, features)
    self.g_concat = dense(self.embed_dim, self.num_tiles * self.embed_dim)
    self.jigsaw_classifier = dense(self.num_permutations, self.num_tiles * self.embed_dim)
    self.rotation_classifier = dense(methods.NUM_ROTATIONS, features)
    self.relative_position_classifier = dense(
        len(methods.RELATIVE_POSITION_CELLS), 2 * self.embed_dim
    )

  def trunk_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Pooled trunk features ``(B, F)`` of images, for evaluation (BN in inference mode by default)."""
    return self.trunk(images, train=train)

  def _head_input(self, x: jax.Array, train: bool, branch: str) -> jax.Array:
    """Trunk features, then the `branch` head's BatchNorm and hidden layer when configured."""
    x = self.trunk(x, train=train)
    if self.head_batch_norm:
      x = getattr(self, f'{branch}_norm')(x, use_running_average=not train)
    if self.head == 'mlp' or branch == 'proj':
      x = nn.relu(getattr(self, f'{branch}_hidden')(x))
    return x

  def _tile_embeddings(self, tiles: jax.Array, train: bool) -> jax.Array:
    """The per-tile embeddings of ``(B, n, T, T, C)`` tiles, concatenated in order: ``(B, n*E)``."""
    batch, count = tiles.shape[:2]
    x = self._head_input(tiles.reshape((batch * count,) + tiles.shape[2:]), train, 'g_tile')
    return self.g_tile_out(x).reshape(batch, count * self.embed_dim)

  def _check_tiles(self, tiles: jax.Array, count: int, name: str = 'tiles') -> None:
    if tiles.ndim != 5 or tiles.shape[1] != count:
      raise ValueError(f'{name} must have shape (B, {count}, T, T, C), got {tiles.shape}')

  def embed_images(self, images: jax.Array, train: bool) -> jax.Array:
    """f_hat of the image views ``(B, S, S, 3)``: ``(B, embed_dim)`` float32, L2-normalised."""
    return l2_normalize(self.f_out(self._head_input(images, train, 'f')).astype(jnp.float32))

  def embed_projected(self, images: jax.Array, train: bool) -> jax.Array:
    """MoCo v2's / SimCLR's embedding of image views ``(B, S, S, 3)``: the projection MLP on the
    trunk, ``(B, embed_dim)`` float32, L2-normalised."""
    return l2_normalize(self.proj_out(self._head_input(images, train, 'proj')).astype(jnp.float32))

  def embed_tiles(self, tiles: jax.Array, train: bool) -> jax.Array:
    """g_hat of the jigsaw views ``(B, num_tiles, T, T, 3)``, tiles in their shuffled order."""
    self._check_tiles(tiles, self.num_tiles)
    return l2_normalize(self.g_concat(self._tile_embeddings(tiles, train)).astype(jnp.float32))

  def embed_rotated(self, images: jax.Array, train: bool) -> jax.Array:
    """g_hat of PIRL-rotation's rotated views ``(B, S, S, 3)``: its own head on the trunk."""
    return l2_normalize(
        self.g_rot_out(self._head_input(images, train, 'g_rot')).astype(jnp.float32)
    )

  def classify_permutation(self, tiles: jax.Array, train: bool) -> jax.Array:
    """Jigsaw logits ``(B, num_permutations)`` float32 of shuffled tiles ``(B, 9, T, T, 3)``."""
    self._check_tiles(tiles, self.num_tiles)
    return self.jigsaw_classifier(self._tile_embeddings(tiles, train)).astype(jnp.float32)

  def classify_rotation(self, images: jax.Array, train: bool) -> jax.Array:
    """Rotation logits ``(B, 4)`` float32 of images ``(B, S, S, 3)``."""
    return self.rotation_classifier(self._head_input(images, train, 'f')).astype(jnp.float32)

  def classify_relative_position(self, patches: jax.Array, train: bool) -> jax.Array:
    """Relative-position logits ``(B, 8)`` float32 of (centre, neighbour) ``(B, 2, T, T, 3)``."""
    self._check_tiles(patches, 2, 'patches')
    return self.relative_position_classifier(self._tile_embeddings(patches, train)).astype(
        jnp.float32
    )

  def __call__(
      self, images: jax.Array, tiles: jax.Array, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Embeds both views: the tiles first, then the images.

    Args:
      images: ``(B, S, S, 3)`` image views v_I.
      tiles: ``(B, num_tiles, T, T, 3)`` jigsaw tiles v_It, in their shuffled order.
      train: BatchNorm mode of the trunk.

    Returns:
      ``(f_hat, g_hat)``, each ``(B, embed_dim)`` float32 and L2-normalised.
    """
    if tiles.shape[0] != images.shape[0]:
      raise ValueError(
          f'tiles must have shape (B={images.shape[0]}, {self.num_tiles}, T, T, C), '
          f'got {tiles.shape}'
      )
    # Tiles first, then images: the order in which the running BN statistics are updated.
    g = self.embed_tiles(tiles, train)
    f = self.embed_images(images, train)
    return f, g
