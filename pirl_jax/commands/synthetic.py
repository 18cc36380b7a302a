"""Writes the embedded synthetic dermoscopy set in the ISIC 2017 Part 3 layout to a folder.

    python -m pirl_jax.commands.synthetic --out=DIR [--seed=S --num_train=2000
        --num_val=150 --num_test=600 --num_unlabeled=M --workers=N]

The same set the data sources generate into their cache (`pirl_jax.data.synthetic.generate`).
"""

from __future__ import annotations

import sys
import time

from absl import flags

from pirl_jax import user_errors
from pirl_jax.data import synthetic

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined when it runs, so that importing this module defines none."""
  flags.DEFINE_string("out", None, "Destination folder (absent or empty).")
  flags.DEFINE_integer("seed", 0, "Seed of the images and labels.")
  flags.DEFINE_integer("num_train", 2000, "Training images.")
  flags.DEFINE_integer("num_val", 150, "Validation images.")
  flags.DEFINE_integer("num_test", 600, "Test images.")
  flags.DEFINE_integer("num_unlabeled", 0, "Unlabelled images (ISIC-2017_Unlabeled_Data/).")
  flags.DEFINE_integer("workers", None, "Rendering threads (default: CPU count, at most 8).")


def _main(argv):
  if len(argv) > 1:
    raise user_errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.out:
    raise user_errors.UserError("--out is required: the folder to write the set to.")
  start = time.monotonic()
  try:
    out = synthetic.generate(
        FLAGS.out,
        seed=FLAGS.seed,
        num_train=FLAGS.num_train,
        num_val=FLAGS.num_val,
        num_test=FLAGS.num_test,
        num_unlabeled=FLAGS.num_unlabeled,
        workers=FLAGS.workers,
    )
  except FileExistsError as e:
    raise user_errors.UserError(f"--out={FLAGS.out}: {e}; give a new or empty folder.") from None
  total = FLAGS.num_train + FLAGS.num_val + FLAGS.num_test + FLAGS.num_unlabeled
  print(f"wrote {total} synthetic images to {out} in {time.monotonic() - start:.1f} s")


def main(argv=None) -> int:
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top

  define_flags()
  return program.run_program(_main, argv or sys.argv)


if __name__ == "__main__":
  sys.exit(main())
