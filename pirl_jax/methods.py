"""The pretraining methods: PIRL and the pretext tasks it is measured against.

All share the trunk, the tf.data pipeline, the loop, checkpoints and the probes; they differ in
the views the pipeline makes (`data.jigsaw.make_views`), the heads (`models.pirl.PIRLNet`) and
the loss (`train.step`).

Invariant (memory-bank NCE/InfoNCE losses, `memory_bank`):
  pirl            image view + jigsaw tiles; g(tiles) and f(image) pulled to the image's bank row.
  pirl_rotation   image view + a rotated image view (0/90/180/270 degrees) in place of the tiles
                  (the paper's section 5 variant).
  npid            the image view alone (instance discrimination, Wu et al. 2018; PIRL with
                  lambda = 0).
Two views, no memory bank (the methods that followed PIRL):
  moco_v2         MoCo v2 (He et al. 2020; Chen et al. 2020): a query view through the network, a
                  key view through its momentum (EMA) copy, InfoNCE against the key and a queue
                  of earlier keys (`key_queue`); MLP projection head.
  simclr          SimCLR (Chen et al. 2020): two views, NT-Xent over the global batch (each
                  view's partner is its positive, the other 2B - 2 views its negatives); MLP
                  projection head.
Covariant (predict the transform; softmax cross-entropy, no memory bank):
  jigsaw          which of `jigsaw_permutations` fixed permutations shuffled the nine tiles
                  (Noroozi & Favaro 2016; Goyal et al. 2019), the same tiles as PIRL.
  rotation        the rotation (0/90/180/270 degrees) of each image view; every view is shown in
                  all four rotations in the same batch (RotNet, Gidaris et al. 2018).
  relative_patch  where one tile lies relative to the centre tile of the 3x3 grid (8 classes),
                  with the grid's gaps and jitter between tiles (Doersch et al. 2015).
"""

BANK_METHODS = ("pirl", "pirl_rotation", "npid")
TWO_VIEW_METHODS = ("moco_v2", "simclr")
CLASSIFICATION_METHODS = ("jigsaw", "rotation", "relative_patch")
METHODS = BANK_METHODS + TWO_VIEW_METHODS + CLASSIFICATION_METHODS

NUM_ROTATIONS = 4
# Row-major cells of the 3x3 grid around the centre cell 4; class c is the c-th of them.
RELATIVE_POSITION_CELLS = (0, 1, 2, 3, 5, 6, 7, 8)
# Methods whose classes are defined on a 3x3 grid of tiles.
NEEDS_3X3_GRID = ("jigsaw", "relative_patch")


def uses_bank(method: str) -> bool:
  """True for the methods trained against the memory bank."""
  return method in BANK_METHODS


def uses_key_queue(method: str) -> bool:
  """True for the methods trained against a queue of keys from a momentum encoder (MoCo)."""
  return method == "moco_v2"


def transformed_view(method: str) -> str | None:
  """The batch key of the view g embeds for a memory-bank method ('tiles', 'rotated'), or None."""
  return {"pirl": "tiles", "pirl_rotation": "rotated"}.get(method)
