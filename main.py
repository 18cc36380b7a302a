r"""pirl_jax entry point: PIRL pretraining (and, with a finetune config, ISIC 2017 evaluation).

  python main.py --config=configs/pirl.py                 # pretrain on the embedded synthetic set
  python main.py --config=configs/pirl.py:tiny --workdir=/tmp/pirl_tiny
  python main.py --config=configs/pirl.py --config.loss.kind=nce --config.num_epochs=10

The config's `mode` picks the job. A workdir holding checkpoints is resumed from its latest one.

On many hosts, run the same command on every host, adding (README.md, "Running on many hosts"):
  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I  # or $JAX_... variables
  --distributed=auto                                                 # where JAX finds the cluster
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
                    "(default: runs/<config.name>). On many hosts: a folder all of them share.")
flags.DEFINE_enum("distributed", "flags", ["flags", "auto", "off"],
                  "Multi-process start-up. 'flags': jax.distributed.initialize when "
                  "--coordinator_address (or $JAX_COORDINATOR_ADDRESS) is set; 'auto': let JAX "
                  "detect the cluster (Cloud TPU, SLURM, Open MPI, GKE); 'off': one process.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in the job (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (default $JAX_PROCESS_ID).")


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

  # Before anything else uses JAX: afterwards the device list spans every process.
  from pirl_jax import distributed
  try:
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  import jax
  workdir = FLAGS.workdir or str(pathlib.Path("runs") / config.name)
  logging.info("JAX %s, process %d/%d, %d local / %d global devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices())
  logging.info("Workdir: %s", os.path.abspath(workdir))

  if config.mode == "pretrain":
    from pirl_jax.train import pretrain
    summary = pretrain.train_and_evaluate(config, workdir)
    if jax.process_index() == 0 and summary["preempted"]:
      print(f"\nPretraining stopped by SIGTERM at step {summary['step']} of "
            f"{summary['total_steps']}, checkpoint written to {summary['checkpoint_dir']}.\n"
            "  Run the same command again to resume.")
    elif jax.process_index() == 0:
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
    summary = finetune.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      print(finetune.format_summary(summary))
  else:
    raise app.UsageError(f"config.mode={config.mode!r}: expected 'pretrain' or 'finetune'.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
