"""Reader for ISIC 2017 Part 3 (lesion classification) as distributed.

Each split is an image archive and a ground-truth CSV under one root, with the official names
(`SPLITS`). The images may be unzipped flat (`root/ISIC-2017_Training_Data/ISIC_0000000.jpg`),
unzipped as the archives unpack (one folder deeper:
`root/ISIC-2017_Training_Data/ISIC-2017_Training_Data/ISIC_0000000.jpg`), or left as the zip
(`root/ISIC-2017_Training_Data.zip`). Only `ISIC_<7 digits>.jpg` files are images; the
`_superpixels.png` files and `*_metadata.csv` next to them are ignored.

Everything is validated up front, and every problem raises `IsicFormatError` naming the file (and
the CSV line where there is one); a split whose CSV or images are absent raises its subclass
`MissingSplitError`, naming the split and the files looked for.

`SPLITS` is the one definition of the layout's names in the project.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from absl import logging

from pirl_jax import storage
from pirl_jax.user_errors import UserError

# split -> (image folder / zip stem, ground-truth CSV).
SPLITS = {
    "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part3_GroundTruth.csv"),
    "validation": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part3_GroundTruth.csv"),
    "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part3_GroundTruth.csv"),
}
CSV_COLUMNS = ("image_id", "melanoma", "seborrheic_keratosis")
LABEL_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")
IMAGE_NAME_RE = re.compile(r"(ISIC_\d{7})\.jpg")
_MAX_LISTED = 20  # ids named in one message; the rest are counted


class IsicFormatError(UserError, ValueError):
  """The ISIC files are missing or malformed; the message names the file (and line)."""


class MissingSplitError(IsicFormatError):
  """The ground-truth CSV or the images of one split are absent.

  Attributes:
    split: 'train', 'validation' or 'test'.
    looked_for: the paths looked for (the CSV, or the image folder, nested folder and zip).
  """

  def __init__(self, message: str, split: str, looked_for: tuple[str, ...]):
    super().__init__(message, split, looked_for)
    self.split = split
    self.looked_for = tuple(looked_for)

  def __str__(self) -> str:
    return self.args[0]


class ImageRef(NamedTuple):
  """Where one image lives: a file (`member` None) or a member of the zip at `path`."""

  path: str
  member: str | None = None

  @property
  def name(self) -> str:
    """A readable location for messages: the path, or `archive.zip:member`."""
    return self.path if self.member is None else f"{self.path}:{self.member}"


def _zip_file(path: str | os.PathLike) -> zipfile.ZipFile:
  if storage.is_url(path):  # zipfile seeks in the object through a file-like reader
    return zipfile.ZipFile(storage.path(path).open("rb"))
  return zipfile.ZipFile(path)


@functools.lru_cache(maxsize=16)
def _open_zip(path: str, pid: int) -> zipfile.ZipFile:
  # Keyed by pid: a forked child must not share the parent's file offset, so it opens its own.
  del pid
  return _zip_file(path)


def _read_ref(ref: ImageRef) -> bytes:
  if ref.member is None:
    return storage.path(ref.path, absolute=False).read_bytes()
  return _open_zip(ref.path, os.getpid()).read(ref.member)


@dataclasses.dataclass(frozen=True)
class IsicSplit:
  """One validated split, sorted by image id.

  Attributes:
    split: 'train', 'validation' or 'test'.
    csv_path: the ground-truth CSV it was read from.
    image_ids: e.g. 'ISIC_0000000', sorted.
    melanoma: int32 0/1 per image.
    seborrheic_keratosis: int32 0/1 per image.
    label: int32 per image: 0 melanoma, 1 seborrheic keratosis, 2 nevus.
    refs: where each image lives (`ImageRef`).
  """

  split: str
  csv_path: Path
  image_ids: list[str]
  melanoma: np.ndarray
  seborrheic_keratosis: np.ndarray
  label: np.ndarray
  refs: list[ImageRef]

  def __len__(self) -> int:
    return len(self.image_ids)

  def read_bytes(self, i: int) -> bytes:
    """Returns the encoded bytes of image `i` (from its file or zip member)."""
    return _read_ref(self.refs[i])

  def items(self) -> list[tuple[str, Callable[[], bytes]]]:
    """`(name, loader)` pairs for `images.prepare_all`, in split order."""
    return [(ref.name, functools.partial(_read_ref, ref)) for ref in self.refs]


def _image_locations(root: Path, stem: str) -> tuple[Path, Path, Path]:
  """Where a split's images may be: (flat folder, nested folder, zip)."""
  return root / stem, root / stem / stem, root / f"{stem}.zip"


def _find_images(root: Path, split: str) -> tuple[Path, dict[str, ImageRef]]:
  """Finds the split's image folder (flat or nested) or zip; returns it and image id -> ref."""
  flat, nested, archive = _image_locations(root, SPLITS[split][0])
  found: dict[str, ImageRef] = {}
  if flat.is_dir():
    folder = nested if nested.is_dir() else flat
    if storage.is_url(folder):
      # One listing; the objects listed are files (a request per object to check would be slow).
      names = sorted((p.name, True) for p in folder.iterdir())
    else:
      with os.scandir(folder) as entries:
        names = sorted(((e.name, e.is_file()) for e in entries), key=lambda e: e[0])
    for name, is_file in names:
      match = IMAGE_NAME_RE.fullmatch(name)
      if match and is_file:
        found[match.group(1)] = ImageRef(str(folder / name))
    return folder, found
  if archive.is_file():
    try:
      with _zip_file(archive) as zf:
        members = sorted(i.filename for i in zf.infolist() if not i.is_dir())
    except (zipfile.BadZipFile, OSError) as e:
      raise IsicFormatError(f"{archive}: not a readable zip archive ({e})") from e
    for member in members:
      basename = member.rsplit("/", 1)[-1]
      match = IMAGE_NAME_RE.fullmatch(basename)
      if not match:  # also skips macOS "__MACOSX/.../._ISIC_..." resource forks
        continue
      if match.group(1) in found:
        raise IsicFormatError(
            f"{archive}: image {basename} appears twice, as "
            f"{found[match.group(1)].member} and {member}"
        )
      found[match.group(1)] = ImageRef(str(archive), member)
    return archive, found
  raise MissingSplitError(
      f"{root}: no image folder or archive for the {split} split; looked for {flat}/ (or nested "
      f"{nested}/) and {archive}",
      split,
      (str(flat), str(nested), str(archive)),
  )


def _parse_label(value: str, column: str, where: str) -> int:
  try:
    number = float(value)
  except ValueError:
    raise IsicFormatError(f"{where}: {column} is {value!r}, not a number") from None
  if number not in (0.0, 1.0):
    raise IsicFormatError(f"{where}: {column} is {value!r}; must be 0 or 1")
  return int(number)


def _read_csv(csv_path: Path) -> list[tuple[str, int, int, int]]:
  """Returns (image_id, melanoma, seborrheic_keratosis, line) rows, validated."""
  rows = []
  first_line: dict[str, int] = {}
  try:
    # utf-8-sig: spreadsheet programs often prepend a byte-order mark.
    with io.StringIO(csv_path.read_bytes().decode("utf-8-sig"), newline="") as f:
      reader = csv.DictReader(f)
      header = reader.fieldnames
      if header is None:
        raise IsicFormatError(
            f"{csv_path}: empty file; expected a header " f"{','.join(CSV_COLUMNS)}"
        )
      missing = [c for c in CSV_COLUMNS if c not in [h.strip() for h in header]]
      if missing:
        raise IsicFormatError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; the header is "
            f"{','.join(header)!r}, expected {','.join(CSV_COLUMNS)}"
        )
      for row in reader:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        where = f"{csv_path} line {reader.line_num}"
        image_id = row["image_id"]
        if not image_id:
          raise IsicFormatError(f"{where}: empty image_id")
        if image_id in first_line:
          raise IsicFormatError(
              f"{where}: duplicate image_id {image_id} " f"(first on line {first_line[image_id]})"
          )
        first_line[image_id] = reader.line_num
        mel = _parse_label(row["melanoma"], "melanoma", where)
        sk = _parse_label(row["seborrheic_keratosis"], "seborrheic_keratosis", where)
        if mel and sk:
          raise IsicFormatError(
              f"{where}: {image_id} has both melanoma and "
              "seborrheic_keratosis set to 1; at most one may be"
          )
        rows.append((image_id, mel, sk, reader.line_num))
  except UnicodeDecodeError as e:
    raise IsicFormatError(
        f"{csv_path}: not valid UTF-8 text ({e.reason}); " "save the CSV as UTF-8"
    ) from e
  except csv.Error as e:
    raise IsicFormatError(f"{csv_path}: malformed CSV ({e})") from e
  return rows


def _listed(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown if len(names) <= _MAX_LISTED else f"{shown}, ... ({len(names)} in all)"


def read_split(root: str | os.PathLike, split: str, *, strict: bool = False) -> IsicSplit:
  """Reads and validates one ISIC 2017 split.

  Args:
    root: the folder holding the split's image folder or zip and its ground-truth CSV (`~` is
      expanded).
    split: 'train', 'validation' or 'test'.
    strict: if True, images with no CSV row are an error; otherwise they are ignored with a
      warning that lists them.

  Returns:
    IsicSplit sorted by image id.

  Raises:
    MissingSplitError: for a missing CSV or image folder.
    IsicFormatError: for a missing root, a malformed CSV (missing column, non-UTF-8, labels outside
      {0, 1}, both labels 1, duplicate id), a CSV row without an image, an empty split, or
      (strict) an image without a CSV row.
    ValueError: for an unknown split name.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown ISIC 2017 split {split!r}; expected one of {list(SPLITS)}")
  root = storage.path(root, absolute=False)
  if not root.is_dir():
    raise IsicFormatError(f"{root}: ISIC 2017 root folder does not exist")
  csv_path = root / SPLITS[split][1]
  if not csv_path.is_file():
    raise MissingSplitError(
        f"{csv_path}: ground-truth CSV of the {split} split not found", split, (str(csv_path),)
    )
  image_location, images = _find_images(root, split)
  rows = _read_csv(csv_path)
  if not rows:
    raise IsicFormatError(f"{csv_path}: empty {split} split (no labelled rows)")

  unmatched = [
      f"{image_id} (line {line})" for image_id, _, _, line in rows if image_id not in images
  ]
  if unmatched:
    raise IsicFormatError(
        f"{csv_path}: {len(unmatched)} image_id(s) have no image in "
        f"{image_location}: {_listed(unmatched)}"
    )
  unlabelled = sorted(set(images) - {row[0] for row in rows})
  if unlabelled:
    message = (
        f"{image_location}: {len(unlabelled)} image(s) have no row in {csv_path}: "
        f"{_listed(unlabelled)}"
    )
    if strict:
      raise IsicFormatError(message)
    logging.warning("%s; ignoring them.", message)

  rows.sort()
  mel = np.array([r[1] for r in rows], dtype=np.int32)
  sk = np.array([r[2] for r in rows], dtype=np.int32)
  return IsicSplit(
      split=split,
      csv_path=csv_path,
      image_ids=[r[0] for r in rows],
      melanoma=mel,
      seborrheic_keratosis=sk,
      label=np.where(mel == 1, 0, np.where(sk == 1, 1, 2)).astype(np.int32),
      refs=[images[r[0]] for r in rows],
  )


def read_isic2017(root: str | os.PathLike, strict: bool = False) -> dict[str, IsicSplit]:
  """Reads all three splits (see `read_split`); returns {'train', 'validation', 'test'} -> split."""
  return {split: read_split(root, split, strict=strict) for split in SPLITS}
