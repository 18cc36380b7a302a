"""Writes two folders of real images, for measuring the defaults off the synthetic set.

`python -m benchmarks.real_folders --out=/data/real` writes

  digits/    sklearn's 1797 handwritten digits (8x8, 16 grey levels), upscaled to 32 px PNGs;
             ten classes.
  textures/  1200 grey 128 px crops of six scikit-image photographs (brick, grass, gravel, moon,
             immunohistochemistry, Hubble deep field); 200 per class, random side 64-192 px.
             Index crops come from the left half of each photograph and query crops from the
             right half, so no query overlaps an index image.

and, in each folder, `labels.csv` ('file,label,split': half of each class as queries, seeded)
and `labels_10.csv` (the same queries, 10 index images per class: the few-label probe). Both
sources ship inside the packages (scikit-learn, scikit-image); nothing is downloaded. They are
development data, not a project dependency: `pip install scikit-learn scikit-image` first.

Pretrain on a folder with `--config.data.source=folder --config.data.path=<out>/textures
--config.probe.labels=<out>/textures/labels.csv`.
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import numpy as np
from PIL import Image


def _write_labels(root: pathlib.Path, rows: list[tuple[str, str, str]], seed: int) -> None:
  rng = np.random.default_rng(seed)
  with open(root / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([("file", "label", "split"), *rows])
  few = []
  for label in sorted({r[1] for r in rows}):
    index = [r for r in rows if r[1] == label and r[2] == "index"]
    keep = set(rng.choice(len(index), size=min(10, len(index)), replace=False).tolist())
    few += [r for i, r in enumerate(index) if i in keep]
  few += [r for r in rows if r[2] == "query"]
  with open(root / "labels_10.csv", "w", newline="") as f:
    csv.writer(f).writerows([("file", "label", "split"), *few])


def write_digits(root: pathlib.Path, seed: int = 0) -> int:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  rows = []
  for label in range(10):
    positions = np.flatnonzero(digits.target == label)
    queries = set(rng.choice(positions, size=len(positions) // 2, replace=False).tolist())
    for i in positions:
      pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
      name = f"{label}_{i:04d}.png"
      Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(root / name)
      rows.append((name, str(label), "query" if i in queries else "index"))
  _write_labels(root, rows, seed)
  return len(rows)


def _texture_sources() -> dict[str, np.ndarray]:
  from skimage import color, data  # pylint: disable=g-import-not-at-top

  grey = lambda a: a if a.ndim == 2 else (color.rgb2gray(a[..., :3]) * 255).astype(np.uint8)
  return {
      "brick": data.brick(),
      "grass": data.grass(),
      "gravel": data.gravel(),
      "moon": data.moon(),
      "ihc": grey(data.immunohistochemistry()),
      "hubble": grey(data.hubble_deep_field()),
  }


def write_textures(root: pathlib.Path, per_class: int = 200, seed: int = 0) -> int:
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  rows = []
  for label, photo in _texture_sources().items():
    h, w = photo.shape
    for i in range(per_class):
      split = "index" if i < per_class // 2 else "query"
      x_lo, x_hi = (0, w // 2) if split == "index" else (w // 2, w)
      side = int(rng.integers(64, min(192, h, x_hi - x_lo) + 1))
      y = int(rng.integers(0, h - side + 1))
      x = int(rng.integers(x_lo, x_hi - side + 1))
      crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((128, 128), Image.BILINEAR)
      name = f"{label}_{i:03d}.png"
      crop.convert("RGB").save(root / name)
      rows.append((name, label, split))
  _write_labels(root, rows, seed)
  return len(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.real_folders", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--out", required=True, help="the folder to write digits/ and textures/ in")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out).expanduser()
  print(f"{out / 'digits'}: {write_digits(out / 'digits', seed=args.seed)} images")
  print(f"{out / 'textures'}: {write_textures(out / 'textures', seed=args.seed)} images")


if __name__ == "__main__":
  main()
