"""TensorFlow Datasets builder for ISIC 2017 Part 3 (lesion classification), `isic2017`.

The data cannot be downloaded automatically: the builder reads the user's copy from the tfds manual
directory with `pirl_jax.data.isic` (folders, nested folders or the zips). Importing this module
registers the builder:

  import tensorflow_datasets as tfds
  import pirl_jax.data.tfds_isic2017  # registers 'isic2017'
  ds = tfds.load("isic2017/resized_256", split="train", data_dir=...,
                 download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
                     manual_dir="/data/isic2017")})

Every image is decoded and validated while preparing, so a corrupt file fails the build with its
name instead of surfacing later in training. A split whose files are not in the manual directory
is left out with a warning (the others are built); asking for it later raises
`isic.MissingSplitError`, naming the split and the files that were looked for.
"""

from __future__ import annotations

import dataclasses
import os
import re

from absl import logging
import tensorflow_datasets as tfds

from pirl_jax.data import images
from pirl_jax.data import isic

_DESCRIPTION = """\
ISIC 2017 Challenge, Part 3: lesion classification of dermoscopic images into melanoma, seborrheic
keratosis and benign nevus (2000 training, 150 validation and 600 test images). `melanoma` and
`seborrheic_keratosis` are the challenge's two binary labels; `label` combines them (nevus when
both are 0). The challenge metric is ROC AUC of each binary task on the test split.
"""

_CITATION = """\
@inproceedings{codella2018skin,
  title={Skin lesion analysis toward melanoma detection: A challenge at the 2017 International
         Symposium on Biomedical Imaging (ISBI), hosted by the International Skin Imaging
         Collaboration (ISIC)},
  author={Codella, Noel C. F. and Gutman, David and Celebi, M. Emre and Helba, Brian and
          Marchetti, Michael A. and Dusza, Stephen W. and Kalloo, Aadi and Liopyris, Konstantinos
          and Mishra, Nabin and Kittler, Harald and Halpern, Allan},
  booktitle={IEEE 15th International Symposium on Biomedical Imaging (ISBI 2018)},
  pages={168--172},
  year={2018}
}
"""


_FILE_TABLE = "\n".join(
    f"    {stem + '.zip':<32}{csv_name}" for stem, csv_name in isic.SPLITS.values()
)
_NESTED_EXAMPLE = "{0}/{0}/ISIC_0000000.jpg".format(isic.SPLITS["train"][0])
_MISSING_SPLITS = "missing_splits"  # metadata key: split -> (message, paths looked for)


def _split_names(split) -> list[str]:
  """The split names in a tfds split argument ('train[:10%]+test', lists, dicts of them)."""
  if isinstance(split, str):
    return [m.group(1) for m in (re.match(r"\s*([\w-]+)", part) for part in split.split("+")) if m]
  if isinstance(split, dict):
    split = list(split.values())
  if isinstance(split, (list, tuple)):
    return [name for s in split for name in _split_names(s)]
  return []


@dataclasses.dataclass
class Isic2017Config(tfds.core.BuilderConfig):
  """An `isic2017` configuration.

  Attributes:
    resize_short_side: if set, images whose short side is longer are downscaled to it (aspect
      ratio kept, never upscaled) and re-encoded as JPEG quality 95 while preparing. None keeps
      the original images (only non-RGB or non-JPEG files are re-encoded).
  """

  resize_short_side: int | None = None


class Isic2017(tfds.core.GeneratorBasedBuilder):
  """ISIC 2017 Part 3 lesion classification, from files placed in the manual directory."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Isic2017Config(name="full", description="The original images."),
      Isic2017Config(
          name="resized_512",
          resize_short_side=512,
          description="Images downscaled so that the short side is at most 512.",
      ),
      Isic2017Config(
          name="resized_256",
          resize_short_side=256,
          description="Images downscaled so that the short side is at most 256.",
      ),
  ]
  DEFAULT_CONFIG_NAME = "full"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Download the ISIC 2017 Part 3 data from https://challenge.isic-archive.com/data/ and place
  these files, with their official names, directly in the manual directory
  (by default <data_dir>/downloads/manual/, or DownloadConfig(manual_dir=...)):

{_FILE_TABLE}

  The zips may also be unpacked there, as folders of the same names (flat, or nested one level as
  the archives unpack: {_NESTED_EXAMPLE}).
  A split whose files are absent is not built; the others are.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image_id": tfds.features.Text(),
                "melanoma": tfds.features.ClassLabel(num_classes=2),
                "seborrheic_keratosis": tfds.features.ClassLabel(num_classes=2),
                "label": tfds.features.ClassLabel(names=list(isic.LABEL_NAMES)),
            }
        ),
        supervised_keys=("image", "label"),
        homepage="https://challenge.isic-archive.com/landing/2017/",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # Reads and validates every split present before writing anything.
    root = os.fspath(dl_manager.manual_dir)
    splits, missing = {}, {}
    for name in isic.SPLITS:
      try:
        splits[name] = isic.read_split(root, name)
      except isic.MissingSplitError as e:
        missing[name] = (str(e), list(e.looked_for))
    if not splits:
      raise isic.IsicFormatError(
          f"{root}: no ISIC 2017 split to build; "
          + "; ".join(message for message, _ in missing.values())
      )
    for name, (message, _) in missing.items():
      logging.warning("isic2017: not building the %s split: %s", name, message)
    self.info.metadata[_MISSING_SPLITS] = missing
    return {name: self._generate_examples(split) for name, split in splits.items()}

  def as_dataset(self, split=None, **kwargs):
    """`tfds.core.DatasetBuilder.as_dataset`; a split left out when preparing is named."""
    missing = (self.info.metadata or {}).get(_MISSING_SPLITS) or {}
    for name in _split_names(split):
      if name in missing:
        message, looked_for = missing[name]
        raise isic.MissingSplitError(
            f"{self.info.full_name} has no {name} split: its files were not in the manual "
            f"directory when the dataset was prepared ({message}). Place them there, delete "
            f"{self.data_path} and prepare it again.",
            name,
            tuple(looked_for),
        )
    return super().as_dataset(split=split, **kwargs)

  def _generate_examples(self, split: isic.IsicSplit):
    for i, image_id in enumerate(split.image_ids):
      image = images.prepare_image(
          split.read_bytes(i),
          split.refs[i].name,
          min_side=1,
          max_side=self.builder_config.resize_short_side,
      )
      yield image_id, {
          "image": image,
          "image_id": image_id,
          "melanoma": int(split.melanoma[i]),
          "seborrheic_keratosis": int(split.seborrheic_keratosis[i]),
          "label": int(split.label[i]),
      }
