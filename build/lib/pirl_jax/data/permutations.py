"""The fixed permutation set of the covariant jigsaw pretext (method 'jigsaw').

A jigsaw classifier predicts which of P permutations shuffled the nine tiles. Following Noroozi &
Favaro (2016) and Goyal et al. (2019), the P permutations are chosen greedily to be far apart in
Hamming distance (the number of positions at which two permutations differ), so that no two classes
are near-duplicates: start from one permutation, then repeatedly add the permutation of 9! whose
smallest distance to the chosen ones is largest (ties broken by a seeded random order). Noroozi &
Favaro maximise the average distance instead; the smallest distance is what makes classes
distinguishable, and it is what the tests pin.

The default set (P = 1000, seed 0) is stored with the package (`permutations_1000.npy`), so every run
and every machine uses the same classes without recomputing them; other sizes are generated on the
fly (about a second per 100 permutations).
"""

from __future__ import annotations

import functools
import itertools
import pathlib

import numpy as np

NUM_TILES = 9
DEFAULT_SIZE = 1000
DEFAULT_SEED = 0
_STORED = pathlib.Path(__file__).with_name(f"permutations_{DEFAULT_SIZE}.npy")


@functools.lru_cache(maxsize=1)
def _all_permutations() -> np.ndarray:
  return np.array(list(itertools.permutations(range(NUM_TILES))), dtype=np.int8)


def max_hamming_permutations(num_permutations: int, seed: int = DEFAULT_SEED) -> np.ndarray:
  """`num_permutations` permutations of 9 tiles, greedily maximising the minimum Hamming distance.

  Args:
    num_permutations: P, between 1 and 9! = 362880.
    seed: picks the first permutation and breaks ties.

  Returns:
    int32 (P, 9); row p maps output position k to the cell it takes (row-major cell numbers).
  """
  candidates = _all_permutations()
  if not 1 <= num_permutations <= len(candidates):
    raise ValueError(f"num_permutations={num_permutations} must be in [1, {len(candidates)}].")
  rng = np.random.default_rng(seed)
  # Distances are integers 0..9: a random fraction in [0, 1) only orders equal distances.
  tie_break = rng.random(len(candidates))
  chosen = [int(rng.integers(len(candidates)))]
  nearest = np.full(len(candidates), NUM_TILES + 1, np.int16)
  for _ in range(num_permutations - 1):
    distance = (candidates != candidates[chosen[-1]]).sum(axis=1, dtype=np.int16)
    np.minimum(nearest, distance, out=nearest)
    chosen.append(int(np.argmax(nearest + tie_break)))
  return candidates[chosen].astype(np.int32)


def min_hamming_distance(permutations: np.ndarray) -> int:
  """The smallest Hamming distance between two distinct rows of `permutations`."""
  p = np.asarray(permutations)
  distances = (p[:, None, :] != p[None, :, :]).sum(axis=-1)
  np.fill_diagonal(distances, p.shape[1] + 1)
  return int(distances.min())


def permutation_set(num_permutations: int = DEFAULT_SIZE) -> np.ndarray:
  """The jigsaw classes: the stored default set, or a generated one of another size."""
  if num_permutations == DEFAULT_SIZE and _STORED.exists():
    return np.load(_STORED).astype(np.int32)
  return max_hamming_permutations(num_permutations)


if __name__ == "__main__":
  # Regenerates the stored default set: python -m pirl_jax.data.permutations
  np.save(_STORED, max_hamming_permutations(DEFAULT_SIZE).astype(np.int8))
  print(f"wrote {_STORED}")
