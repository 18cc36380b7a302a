"""Helpers several test files share: a workdir's checkpoints and files, tiny configs on the small
ISIC-layout set, and synthetic images."""

import hashlib
import pathlib

import numpy as np


def steps(workdir) -> list[int]:
  """The finished checkpoint steps in `workdir` (none when it has no checkpoints folder)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def item(workdir, step) -> pathlib.Path:
  """The state item folder of checkpoint `step` in `workdir`."""
  return pathlib.Path(workdir) / "checkpoints" / str(step) / "default"


def snapshot(folder) -> dict:
  """Every path under `folder`: file -> (content digest, mtime in ns), folder -> None."""
  folder = pathlib.Path(folder)
  return {
      str(p.relative_to(folder)): (
          (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
          if p.is_file()
          else None
      )
      for p in sorted(folder.rglob("*"))
  }


def tiny_finetuning_config(isic_root, cache_dir, **overrides):
  """configs/finetune_isic.py:tiny on the ISIC-layout folder `isic_root`, with `overrides`."""
  from configs import finetune_isic  # pylint: disable=g-import-not-at-top

  config = finetune_isic.get_config("tiny")
  config.update_from_flattened_dict(
      {
          "data.source": "isic",
          "data.path": str(isic_root),
          "data.cache_dir": str(cache_dir),
          **overrides,
      }
  )
  return config


def noise_image(seed, height, width) -> np.ndarray:
  """A smooth random uint8 image: unique local patterns, so crops and tiles can be located."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 4 + 1, width // 4 + 1, 3))
  fine = rng.uniform(-40, 40, (height, width, 3))
  up = np.kron(coarse, np.ones((4, 4, 1)))[:height, :width]
  return np.clip(up + fine, 0, 255).astype(np.uint8)
