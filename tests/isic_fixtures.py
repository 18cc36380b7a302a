"""Writes small fake ISIC 2017 trees in the official layout, for the reader and builder tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pirl_jax.data import isic

# split -> (image_id, melanoma, seborrheic_keratosis); deliberately not sorted by id.
ROWS = {
    "train": [
        ("ISIC_0000003", 1, 0),
        ("ISIC_0000001", 0, 1),
        ("ISIC_0000000", 0, 0),
        ("ISIC_0000002", 0, 0),
    ],
    "validation": [("ISIC_0000011", 1, 0), ("ISIC_0000010", 0, 0)],
    "test": [("ISIC_0000020", 0, 1), ("ISIC_0000022", 1, 0), ("ISIC_0000021", 0, 0)],
}

Size = tuple[int, int] | Callable[[str], tuple[int, int]]


def jpeg_bytes(image_id: str, size: tuple[int, int] = (24, 16)) -> bytes:
  """A small RGB JPEG whose colour and pattern depend on the id's number."""
  n = int(image_id[-7:])
  width, height = size
  yy, xx = np.mgrid[0:height, 0:width]
  rgb = np.stack(
      [(xx * 5 + n * 40) % 256, (yy * 7 + n * 90) % 256, np.full_like(xx, (n * 23) % 256)], axis=-1
  ).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, format="JPEG", quality=90)
  return out.getvalue()


def csv_text(rows) -> str:
  """The ground-truth CSV for `rows`, mixing the `0`/`1` and `0.0`/`1.0` spellings."""
  lines = ["image_id,melanoma,seborrheic_keratosis"]
  for i, (image_id, mel, sk) in enumerate(rows):
    if i % 2:
      lines.append(f"{image_id},{mel},{sk}")
    else:
      lines.append(f"{image_id},{float(mel)},{float(sk)}")
  return "\n".join(lines) + "\n"


def split_files(split: str, rows, size: Size) -> dict[str, bytes]:
  """File name -> contents for one split's image folder, extras included."""
  stem, _ = isic.SPLITS[split]
  files = {}
  for image_id, _, _ in rows:
    files[f"{image_id}.jpg"] = jpeg_bytes(image_id, size(image_id) if callable(size) else size)
    png = io.BytesIO()
    Image.new("L", (4, 4), 7).save(png, format="PNG")
    files[f"{image_id}_superpixels.png"] = png.getvalue()
  meta = ["image_id,age_approximate,sex"] + [f"{r[0]},55,female" for r in rows]
  files[f"{stem}_metadata.csv"] = ("\n".join(meta) + "\n").encode()
  return files


def write_tree(root: str | Path, layout: str = "flat", rows=None, size: Size = (24, 16)) -> Path:
  """Writes all three splits under `root`.

  Args:
    root: the folder to write (created).
    layout: 'flat' (`root/<stem>/ISIC_x.jpg`), 'nested' (`root/<stem>/<stem>/ISIC_x.jpg`, as the
      zips unpack) or 'zip' (`root/<stem>.zip` holding `<stem>/ISIC_x.jpg`).
    rows: split -> [(image_id, melanoma, seborrheic_keratosis)]; defaults to `ROWS`.
    size: (width, height) of every image, or a function of the image id giving it.

  Returns:
    `root` as a Path.
  """
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  for split, split_rows in (rows or ROWS).items():
    stem, csv_name = isic.SPLITS[split]
    (root / csv_name).write_text(csv_text(split_rows))
    files = split_files(split, split_rows, size)
    if layout == "zip":
      with zipfile.ZipFile(root / f"{stem}.zip", "w") as zf:
        zf.writestr(f"{stem}/", b"")
        for name, data in files.items():
          zf.writestr(f"{stem}/{name}", data)
      continue
    folder = {"flat": root / stem, "nested": root / stem / stem}[layout]
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
      (folder / name).write_bytes(data)
  return root
