r"""The command line: `python main.py --config=...` (or `pirl-jax --config=...` once installed).

  pirl-jax --config=configs/pirl.py                       # pretrain on the embedded synthetic set
  pirl-jax --config=configs/pirl.py:tiny --workdir=/tmp/pirl_tiny
  pirl-jax --config=configs/finetune_isic.py --config.init.checkpoint=runs/pirl

The config's `mode` picks the job (pretraining or fine-tuning). A workdir holding checkpoints is
resumed from its latest intact one; a run that already finished is reported, not run again.

What the terminal shows: progress lines, warnings and results. Library INFO logs (Orbax, absl,
TensorFlow) appear with --verbosity=1. A mistake in the command, the config or the data is one
line naming the field or file, and exit status 2; a SIGTERM during training checkpoints and exits
0, one before the first step exits 0 with a message.

On many hosts, run the same command on every host, adding (docs/scaling.md):
  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I  # or $JAX_... variables
  --distributed=auto                                                 # where JAX finds the cluster
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging

from pirl_jax.commands import program
from pirl_jax.commands.program import FLAGS

# --- pretraining and fine-tuning ----------------------------------------------------------------

_FLAGS_DEFINED = False


def define_flags() -> None:
  """The flags of `main`; defined once, on first use, so that other commands can import cli."""
  global _FLAGS_DEFINED
  if _FLAGS_DEFINED:
    return
  _FLAGS_DEFINED = True
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file, optionally with a preset: configs/pirl.py:tiny.",
      lock_config=True,
  )
  flags.DEFINE_string(
      "workdir",
      None,
      "Where checkpoints, logs and TensorBoard summaries go "
      "(default: runs/<config.name>). On many hosts: a folder all of them share.",
  )
  flags.DEFINE_enum(
      "distributed",
      "flags",
      ["flags", "auto", "off"],
      "Multi-process start-up. 'flags': jax.distributed.initialize when "
      "--coordinator_address (or $JAX_COORDINATOR_ADDRESS) is set; 'auto': let JAX "
      "detect the cluster (Cloud TPU, SLURM, Open MPI, GKE); 'off': one process.",
  )
  flags.DEFINE_string(
      "coordinator_address",
      None,
      "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS).",
  )
  flags.DEFINE_integer("num_processes", None, "Processes in the job (default $JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index (default $JAX_PROCESS_ID).")


def _train(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  if config is None:
    raise user_errors.UserError("--config is required, e.g. --config=configs/pirl.py")

  # Before anything else uses JAX: afterwards the device list spans every process.
  from pirl_jax import distributed  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  except ValueError as e:
    raise user_errors.UserError(str(e)) from e
  import jax  # pylint: disable=g-import-not-at-top
  from pirl_jax import storage  # pylint: disable=g-import-not-at-top

  workdir = str(storage.path(FLAGS.workdir or pathlib.Path("runs") / config.name))
  logging.info(
      "JAX %s, process %d/%d, %d local / %d global device(s); workdir %s.",
      jax.__version__,
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      workdir,
  )

  if config.mode == "pretrain":
    from pirl_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top

    summary = pretrain.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      print(format_pretraining(config, summary))
  elif config.mode == "finetune":
    from pirl_jax.tasks import finetune  # pylint: disable=g-import-not-at-top

    summary = finetune.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      print(finetune.format_summary(summary))
  else:
    raise user_errors.UserError(
        f"config.mode={config.mode!r} is not one of 'pretrain', 'finetune'."
    )


def format_pretraining(config, summary: dict) -> str:
  """What the user reads at the end of a pretraining command."""
  from pirl_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top

  step, total = summary["step"], summary["total_steps"]
  if summary.get("preempted"):
    return (
        f"\nPretraining stopped by SIGTERM at step {step} of {total}, checkpoint written to "
        f"{summary['checkpoint_dir']}.\n  Run the same command again to resume."
    )
  loss = summary.get("metrics", {}).get("loss", float("nan"))
  probe = summary.get("evaluations", {}).get("probe")
  probe_text = (
      f"\n  probe on held-out labels: kNN mean AUC {probe['knn_auc_mean']:.4f}, "
      f"linear mean AUC {probe['linear_auc_mean']:.4f}"
      if probe
      else ""
  )
  if summary.get("already_complete"):
    head = (
        f"\nPretraining in {summary['workdir']} is already complete (step {step}/{total}, "
        f"final loss {loss:.4f}); nothing was changed."
    )
  else:
    head = (
        f"\nPretraining finished at step {step}/{total} in "
        f"{summary['wall_seconds'] / 60:.1f} min; final loss {loss:.4f}."
    )
  return (
      f"{head}{probe_text}\n"
      f"  checkpoints: {summary['checkpoint_dir']}\n"
      f"  logs and TensorBoard: {summary['workdir']}  "
      f"(tensorboard --logdir {summary['workdir']})\n"
      f"{pretrain.next_steps(config, summary)}"
  )


def main(argv=None) -> int:
  """The `pirl-jax` console command and `python main.py`."""
  define_flags()
  flags.mark_flags_as_required(["config"])
  argv = sys.argv if argv is None else argv
  return program.run_program(_train, argv, entry_files=(argv[0],))
