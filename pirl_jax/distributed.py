"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or the environment.

Must run before anything else touches JAX's devices: afterwards `jax.devices()` lists the
devices of every process and the mesh spans them all.
"""

from __future__ import annotations

import os

from absl import logging
import jax

MODES = ("flags", "auto", "off")


def _int_or_none(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def initialize(
    mode: str = "flags",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Connects this process to the others, if configured.

  Args:
    mode: 'flags': initialise when a coordinator address is given (argument or
      $JAX_COORDINATOR_ADDRESS), with the process count and id from the arguments or
      $JAX_NUM_PROCESSES / $JAX_PROCESS_ID. 'auto': let JAX detect the cluster (Cloud TPU,
      SLURM, Open MPI, GKE, ...), the arguments overriding what it finds. 'off': one process.
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: number of processes in the job.
    process_id: this process's index, 0 .. num_processes - 1.

  Returns:
    Whether `jax.distributed` was initialised.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is not one of {', '.join(MODES)}.")
  if mode == "off":
    return False
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _int_or_none(os.environ.get("JAX_NUM_PROCESSES"), "$JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_or_none(os.environ.get("JAX_PROCESS_ID"), "$JAX_PROCESS_ID")
  if mode == "flags":
    if coordinator_address is None:
      return False
    missing = [
        name
        for name, value in (
            ("--num_processes (or $JAX_NUM_PROCESSES)", num_processes),
            ("--process_id (or $JAX_PROCESS_ID)", process_id),
        )
        if value is None
    ]
    if missing:
      raise ValueError(
          f"--coordinator_address={coordinator_address} also needs "
          f"{' and '.join(missing)}; or use --distributed=auto where JAX can detect "
          "the cluster."
      )
  logging.info(
      "jax.distributed.initialize(coordinator_address=%s, num_processes=%s, " "process_id=%s)%s",
      coordinator_address,
      num_processes,
      process_id,
      " with cluster auto-detection" if mode == "auto" else "",
  )
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True
