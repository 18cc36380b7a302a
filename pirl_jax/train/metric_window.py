"""The training loop's metric window, kept on device between logs: the sums of each step's
metrics, the count of finite steps, and the first step at which a watched quantity was not
finite; and its JSON form, saved with a checkpoint written between two logs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEVER = np.iinfo(np.int32).max
WATCHED = ("loss", "grad_norm")  # a step with either non-finite is an error (or skipped)


@jax.jit
def empty(metrics):
  return {
      "sums": jax.tree.map(jnp.zeros_like, metrics),
      "count": jnp.zeros((), jnp.int32),
      "first_bad": {k: jnp.full((), NEVER, jnp.int32) for k in WATCHED},
  }


def record(window, steps: int) -> dict:
  """A fetched log window as JSON, saved with a checkpoint written between two logs."""
  return {
      "steps": steps,
      "count": int(window["count"]),
      "sums": {k: [float(v), str(np.asarray(v).dtype)] for k, v in window["sums"].items()},
      "first_bad": {k: int(v) for k, v in window["first_bad"].items()},
  }


def from_record(record: dict | None):
  """(window, steps) from `record`'s JSON; (None, 0) for None or another layout."""
  try:
    window = {
        "sums": {k: np.asarray(v, dtype) for k, (v, dtype) in record["sums"].items()},
        "count": np.asarray(record["count"], np.int32),
        "first_bad": {k: np.asarray(record["first_bad"][k], np.int32) for k in WATCHED},
    }
    return window, int(record["steps"])
  except (TypeError, KeyError, ValueError):
    return None, 0


@jax.jit
def accumulate(window, metrics, step):
  """Adds one step's metrics to the log window, on device.

  Sums only finite steps (so means stay meaningful when steps are skipped) and records, per
  watched quantity, the first step at which it was not finite. The host reads the window only
  at log and checkpoint steps, and a checkpoint is written only after that read, so a poisoned
  state is never saved.
  """
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  sums = jax.tree.map(lambda a, m: a + jnp.where(ok, m, jnp.zeros_like(m)), window["sums"], metrics)
  first_bad = {
      k: jnp.where(jnp.isfinite(metrics[k]), v, jnp.minimum(v, step))
      for k, v in window["first_bad"].items()
  }
  return {"sums": sums, "count": window["count"] + ok.astype(jnp.int32), "first_bad": first_bad}
