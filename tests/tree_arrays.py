"""Pytrees of arrays as flat {dotted path: numpy array} dicts, for comparing states in tests."""

import jax
import numpy as np


def flat(tree) -> dict[str, np.ndarray]:
  """Dotted path -> array; a restored optax state (namedtuples) and a loaded one (dicts, lists)
  get the same names."""

  def name(key):
    return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

  return {
      ".".join(map(name, path)): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
