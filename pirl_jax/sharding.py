"""The device mesh and the shardings of the train state and the batch.

One mesh over all devices with a single 'data' axis; one device is a mesh of one. The axis is
`Auto` so that XLA propagates shardings through the memory bank's gathers and scatters (under
explicit axes every scatter into the row-sharded bank would need an `out_sharding`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def bank_sharding(mesh: Mesh) -> NamedSharding:
  """Memory-bank rows split over the data axis; each device holds N_padded / devices rows."""
  return NamedSharding(mesh, P(DATA_AXIS, None))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of the batch into global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
