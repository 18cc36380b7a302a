"""The embedded synthetic dermoscopy set in the exact ISIC 2017 Part 3 layout: writer and cache.

The images come from `synthetic_render`; this module draws the labels of each split with the
ISIC 2017 training priors (melanoma 374/2000, seborrheic keratosis 254/2000, nevus the rest),
writes the set, and caches it for the data sources.

Layout written by :func:`generate` (the names of `isic.SPLITS`, as the official archives unzip
flat)::

    out_dir/
      ISIC-2017_Training_Data/ISIC_0000000.jpg ... + ISIC-2017_Training_Data_metadata.csv
      ISIC-2017_Validation_Data/...                + ISIC-2017_Validation_Data_metadata.csv
      ISIC-2017_Test_v2_Data/...                   + ISIC-2017_Test_v2_Data_metadata.csv
      ISIC-2017_Unlabeled_Data/...                 (optional, images only)
      ISIC-2017_Training_Part3_GroundTruth.csv
      ISIC-2017_Validation_Part3_GroundTruth.csv
      ISIC-2017_Test_v2_Part3_GroundTruth.csv
      SYNTHETIC_COMPLETE.json                      (written last)

Command line: `python -m pirl_jax.commands.synthetic` (pirl_jax/commands/synthetic.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import time
import uuid

import numpy as np
from absl import logging

from pirl_jax.data import isic
from pirl_jax.data import paths
from pirl_jax.data import synthetic_render as render

# ISIC 2017 Part 3 training priors, out of 2000 images.
PRIOR_COUNTS_2000 = (374, 254, 1372)

# Not an official ISIC 2017 name: the synthetic set's pool of images without labels.
UNLABELED_DIR = "ISIC-2017_Unlabeled_Data"
COMPLETE_MARKER = "SYNTHETIC_COMPLETE.json"
# Where `ensure_synthetic` keeps its sets by default, under the data cache root.
CACHE_SUBDIR = "synthetic"


def class_counts(n: int) -> tuple[int, int, int]:
  """Exact (melanoma, seborrheic keratosis, nevus) counts for ``n`` images.

  Melanoma and seborrheic keratosis counts are the training priors times
  ``n`` rounded half up; nevus takes the rest.
  """
  mel = (n * PRIOR_COUNTS_2000[0] + 1000) // 2000
  sk = (n * PRIOR_COUNTS_2000[1] + 1000) // 2000
  return mel, sk, n - mel - sk


def split_labels(seed: int, split: str, n: int) -> np.ndarray:
  """Shuffled class labels (0 melanoma, 1 SK, 2 nevus) of one split, by seed."""
  counts = class_counts(n)
  labels = np.repeat(np.arange(3, dtype=np.int32), counts)
  return np.random.default_rng([seed, render.SPLIT_IDS[split], 7919]).permutation(labels)


# ----------------------------------------------------------------------------
# Dataset writing
# ----------------------------------------------------------------------------


def _image_id(number: int) -> str:
  return f"ISIC_{number:07d}"


def _metadata_row(seed: int, split: str, index: int) -> tuple[str, str]:
  """(age_approximate, sex) like the ISIC metadata; independent of the class."""
  rng = np.random.default_rng([seed, render.SPLIT_IDS[split], index, 1])
  age = "unknown" if rng.random() < 0.08 else str(5 * int(rng.integers(2, 18)))
  sex = rng.choice(["male", "female", "unknown"], p=[0.47, 0.45, 0.08])
  return age, str(sex)


def _render_to_file(job) -> None:
  seed, split, index, label, path = job
  data = render.render_jpeg(seed, split, index, label)
  with open(path, "wb") as f:
    f.write(data)


def _default_workers() -> int:
  return max(1, min(os.cpu_count() or 1, 8))


def generate(
    out_dir,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 150,
    num_test: int = 600,
    num_unlabeled: int = 0,
    workers: int | None = None,
) -> pathlib.Path:
  """Writes the synthetic set in the ISIC 2017 Part 3 layout.

  Everything is written into a temporary sibling folder which is renamed to
  ``out_dir`` once complete (with :data:`COMPLETE_MARKER` written last), so an
  interrupted run never leaves a complete-looking ``out_dir``.

  Args:
    out_dir: destination folder; must not exist or be empty.
    seed: all content is a deterministic function of the seed and counts.
    num_train: images in ``ISIC-2017_Training_Data``.
    num_val: images in ``ISIC-2017_Validation_Data``.
    num_test: images in ``ISIC-2017_Test_v2_Data``.
    num_unlabeled: images in ``ISIC-2017_Unlabeled_Data`` (no labels, no CSV).
    workers: rendering threads (numpy and PIL release the GIL); default the CPU
      count (at most 8). Does not change the output.

  Returns:
    ``out_dir`` as a Path.

  Raises:
    FileExistsError: ``out_dir`` exists and is not empty, or another process
      completed it while this one was generating.
  """
  out_dir = pathlib.Path(out_dir).expanduser().absolute()
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f"synthetic set: {out_dir} exists and is not empty")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    counts = {
        "train": num_train,
        "validation": num_val,
        "test": num_test,
        "unlabeled": num_unlabeled,
    }
    jobs, first_number = [], 0
    summary = {}
    for split, n in counts.items():
      folder = tmp / (isic.SPLITS[split][0] if split in isic.SPLITS else UNLABELED_DIR)
      if split == "unlabeled" and n == 0:
        continue
      folder.mkdir()
      labels = split_labels(seed, split, n)
      ids = [_image_id(first_number + i) for i in range(n)]
      first_number += n
      jobs += [(seed, split, i, int(labels[i]), folder / f"{ids[i]}.jpg") for i in range(n)]
      if split == "unlabeled":
        continue
      with open(tmp / isic.SPLITS[split][1], "w", newline="") as f:
        f.write("image_id,melanoma,seborrheic_keratosis\n")
        for image_id, label in zip(ids, labels):
          f.write(
              f"{image_id},{float(label == render.MELANOMA)},"
              f"{float(label == render.SEBORRHEIC_KERATOSIS)}\n"
          )
      with open(folder / f"{folder.name}_metadata.csv", "w", newline="") as f:
        f.write("image_id,age_approximate,sex\n")
        for i, image_id in enumerate(ids):
          f.write(",".join((image_id,) + _metadata_row(seed, split, i)) + "\n")
      summary[split] = dict(zip(render.CLASS_NAMES, map(int, class_counts(n))))

    start = time.monotonic()
    workers = workers or _default_workers()
    step = max(1, len(jobs) // 10)
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
      for done, _ in enumerate(pool.map(_render_to_file, jobs), start=1):
        if done % step == 0 or done == len(jobs):
          logging.info(
              "synthetic set: %d/%d images rendered (%.1f s)",
              done,
              len(jobs),
              time.monotonic() - start,
          )
    finally:
      # On an error or Ctrl-C, drop the queued images instead of rendering them all.
      pool.shutdown(wait=True, cancel_futures=True)

    marker = {
        "generator_version": render.GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "num_unlabeled": num_unlabeled,
        "class_counts": summary,
    }
    (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    try:
      if out_dir.exists():
        out_dir.rmdir()  # empty (checked above); rename needs it gone
      os.rename(tmp, out_dir)
    except OSError as e:  # e.g. a concurrent generate finished first
      raise FileExistsError(f"synthetic set: {out_dir} appeared while generating") from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def cache_name(
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 150,
    num_test: int = 600,
    num_unlabeled: int = 0,
) -> str:
  """Cache subfolder name: generator version, seed and counts."""
  return (
      f"synthetic_isic2017-v{render.GENERATOR_VERSION}-seed{seed}"
      f"-{num_train}-{num_val}-{num_test}-{num_unlabeled}"
  )


def is_complete(root) -> bool:
  """Whether ``root`` holds a finished synthetic set (completion marker present)."""
  return (pathlib.Path(root) / COMPLETE_MARKER).is_file()


def ensure_synthetic(
    cache_dir=None,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 150,
    num_test: int = 600,
    num_unlabeled: int = 0,
    workers: int | None = None,
) -> pathlib.Path:
  """Returns the root of a cached synthetic set, generating it on first use.

  Args:
    cache_dir: parent folder (`~` expanded); default ``CACHE_SUBDIR`` under the data cache
      root (`paths.cache_root`), where the data sources keep it.
    seed, num_train, num_val, num_test, num_unlabeled: as in :func:`generate`.
    workers: rendering threads for a first generation.

  Returns:
    ``cache_dir / cache_name(...)``, holding a complete set.
  """
  root = pathlib.Path(cache_dir).expanduser() if cache_dir else paths.cache_root() / CACHE_SUBDIR
  counts = dict(
      seed=seed,
      num_train=num_train,
      num_val=num_val,
      num_test=num_test,
      num_unlabeled=num_unlabeled,
  )
  path = root / cache_name(**counts)
  if is_complete(path):
    logging.info("synthetic set: reusing %s", path)
    return path
  if path.exists() and any(path.iterdir()) and not is_complete(path):  # not from a racing call
    raise FileExistsError(
        f"synthetic set: {path} exists without {COMPLETE_MARKER}; delete it to regenerate"
    )
  logging.info(
      "synthetic set: generating into %s (%d train, %d val, %d test, %d unlabeled)",
      path,
      num_train,
      num_val,
      num_test,
      num_unlabeled,
  )
  start = time.monotonic()
  try:
    generate(path, workers=workers, **counts)
  except FileExistsError:
    if not is_complete(path):
      raise
    logging.info("synthetic set: %s was completed by another process", path)
    return path
  logging.info("synthetic set: wrote %s in %.1f s", path, time.monotonic() - start)
  return path
