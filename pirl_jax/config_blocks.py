"""The config blocks pretraining (configs/pirl.py) and fine-tuning (configs/finetune_isic.py)
share, defined once so that they cannot drift: the trunk of each size of run, and the probe block
(also the probe command's defaults for a checkpoint without a config)."""

from __future__ import annotations

import ml_collections

# The trunk of the default run, and of each preset that changes it: fine-tuning starts from a
# pretrained trunk of the same preset, so both configs take it from here.
TRUNKS = {
    "default": {"trunk": "resnet18", "width_multiplier": 0.25},
    "tiny": {"trunk": "resnet_tiny", "width_multiplier": 1.0},
    "full": {"trunk": "resnet50", "width_multiplier": 1.0},  # the paper's (isic, imagenet)
}


def set_trunk(model: ml_collections.ConfigDict, size: str = "default") -> None:
  """Sets `model.trunk` and `model.width_multiplier` to the trunk of `size` (TRUNKS)."""
  model.trunk = TRUNKS[size]["trunk"]
  model.width_multiplier = TRUNKS[size]["width_multiplier"]


def probe_config() -> ml_collections.ConfigDict:
  """The probe block: kNN and linear classifiers on the frozen trunk's features.

  Every eval_every_steps (0: only after the last step), on labelled images: the embedded set's
  and ISIC's train split as the labelled index, `query_split` as the held-out queries; a folder
  is labelled by the CSV `labels` ('file,label[,split]') or by its class subfolders.
  """
  probe = ml_collections.ConfigDict()
  probe.enabled = True
  probe.knn_k = 20
  probe.knn_temperature = 0.07  # each neighbour votes with weight exp(cosine similarity / this)
  probe.linear_regularization = 1.0  # logistic regression's C (inverse L2 strength)
  probe.labels = ""  # folder source: CSV of 'file,label[,split]' lines, file relative to data.path
  probe.query_fraction = 0.5  # folder without a split column: held-out fraction of each class
  probe.index_split = "train"  # ISIC layout / tfds: the labelled examples
  probe.query_split = "test"  # ISIC layout / tfds: the held-out queries
  probe.tfds_name = ""  # probe on a labelled tfds dataset instead (e.g. for tfds pretraining)
  probe.tfds_label = "label"
  probe.image_size = 0  # 0: data.views.image_size
  probe.eval_crop_fraction = 1.0  # short side resized to image_size / this, centre crop
  probe.batch_size = 256
  # The tile pathway's learning curve (TensorBoard tiles/*): the probes on the mean of the tiles'
  # trunk features, and for PIRL the retrieval of the image's f from g of its tiles.
  probe.tile_pathway = True
  return probe
