r"""pirl_jax entry point: PIRL pretraining (and, with a finetune config, ISIC 2017 evaluation).

  python main.py --config=configs/pirl.py                 # pretrain on the embedded synthetic set
  python main.py --config=configs/pirl.py:tiny --workdir=/tmp/pirl_tiny
  python main.py --config=configs/pirl.py --config.loss.kind=nce --config.num_epochs=10

The config's `mode` picks the job. A workdir holding checkpoints is resumed from its latest one.
"""

import os
import pathlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/pirl.py:tiny.",
    lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Where checkpoints, logs and TensorBoard summaries go "
                    "(default: runs/<config.name>).")


def _hide_accelerators_from_tensorflow() -> None:
  # TF is only used for tf.data: hidden from accelerators before it initialises, it cannot
  # reserve memory that JAX needs.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pirl.py")
  _hide_accelerators_from_tensorflow()

  import jax
  workdir = FLAGS.workdir or str(pathlib.Path("runs") / config.name)
  logging.info("JAX %s, process %d/%d, %d local / %d global devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices())
  logging.info("Workdir: %s", os.path.abspath(workdir))

  if config.mode == "pretrain":
    from pirl_jax.train import pretrain
    summary = pretrain.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      print(f"\nPretraining finished at step {summary['step']} "
            f"in {summary['wall_seconds'] / 60:.1f} min; final loss "
            f"{summary['metrics'].get('loss', float('nan')):.4f}.")
      print(f"  checkpoints: {summary['checkpoint_dir']}")
      print(f"  logs and TensorBoard: {summary['workdir']}  "
            f"(tensorboard --logdir {summary['workdir']})")
      print("  fine-tune on ISIC 2017 from it:\n"
            f"    python main.py --config=configs/finetune_isic.py "
            f"--config.init.checkpoint={summary['workdir']} --workdir={summary['workdir']}-finetune")
  elif config.mode == "finetune":
    from pirl_jax.eval import finetune
    finetune.train_and_evaluate(config, workdir)
  else:
    raise app.UsageError(f"config.mode={config.mode!r}: expected 'pretrain' or 'finetune'.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
