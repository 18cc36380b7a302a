"""Fingerprints of arrays: one uint32 per array, computed on the devices where it lives.

The fingerprint of an array is the sum over its elements, in wrapping uint32 arithmetic, of
M(b_i ^ k_i) - M(k_i): b_i is element i's bit pattern as uint32 (8- and 16-bit types widened,
64-bit ones split into two words), i its row-major flat index, k_i = M(i + 0x9E3779B9) and M the
32-bit finaliser of MurmurHash3 (a bijection). Why this one:
  * It is a sharded reduction computed where the array lives: only one uint32 per array reaches
    the host, so nothing is gathered, on one host or many.
  * Integer addition is exact and order-free, so the value does not depend on the sharding, the
    device or process count, or the order XLA reduces in.
  * M is a bijection, so changing any one element (a single flipped bit included) changes its
    term and the sum. Mixing in the index keeps changes spread over many elements from cancelling
    systematically, as they do in a plain weighted sum of b_i (64 aligned elements of 1.0 add 0
    to sum b_i * (2i + 1) * c mod 2**32): other damage goes unseen with probability about 2**-32.
  * A zero element adds nothing and a term depends only on the flat index, so an array with zero
    rows appended (the memory bank padded for another device count) has the fingerprint of its
    real rows, and a checkpoint verifies on any device count.
It complements the CRC32C that OCDBT keeps per file: that one catches damage on disk; the
fingerprint, taken on the devices before the save, also catches damage on the way there (host
memory, a faulty copy) and files of another checkpoint swapped in. It is not cryptographic.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

_KEY_OFFSET = 0x9E3779B9  # so that index 0 has a key other than 0
ALGORITHM = "sum M(b_i ^ k_i) - M(k_i) mod 2**32, M = murmur3 fmix32, k_i = M(i + 0x9E3779B9)"


def key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  return ".".join(key_name(k) for k in path)


def named_leaves(tree) -> list[tuple[str, object]]:
  return [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'opt_state.1.0.trace.f_out.bias' -> shape for each array (or array metadata) in `tree`."""
  return {name: tuple(leaf.shape) for name, leaf in named_leaves(tree)}


# --- Fingerprints ---------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
  """The bit patterns of `x` as uint32 (64-bit elements as two words along a new last axis)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2):
    return lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"No fingerprint for dtype {x.dtype}.")


def _host_words(x: np.ndarray) -> np.ndarray:
  """`_words` of a host array, on the host (jax would narrow 64-bit types without x64)."""
  x = np.ascontiguousarray(x)
  flat = x.reshape(-1)
  if x.dtype == np.bool_:
    flat = flat.view(np.uint8)
  size = flat.dtype.itemsize
  if size == 8:
    return flat.view(np.uint32).reshape(x.shape + (2,))
  if size in (1, 2, 4):
    return (
        flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size])
        .astype(np.uint32)
        .reshape(x.shape)
    )
  raise TypeError(f"No fingerprint for dtype {x.dtype}.")


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
    stride *= words.shape[axis]
  keys = _mix(index + np.uint32(_KEY_OFFSET))
  return jnp.sum(_mix(words ^ keys) - _mix(keys), dtype=jnp.uint32)


@jax.jit
def _fingerprint_all(arrays: list) -> jax.Array:
  return jnp.stack([_fingerprint(x) for x in arrays])


def fingerprints(tree) -> dict[str, int]:
  """The 32-bit fingerprint of every array in `tree`, by dotted path (see the module docstring).

  jax Arrays are reduced on their own devices (for arrays spanning processes, every process must
  call this); NumPy arrays on the default device. Leaves that are not arrays are skipped.
  """
  named = [
      (name, leaf)
      for name, leaf in named_leaves(tree)
      if isinstance(leaf, (jax.Array, np.ndarray, np.generic))
  ]
  groups: dict[object, list[int]] = {}  # one jit per device set: jit needs its inputs on one
  inputs = []
  for i, (_, leaf) in enumerate(named):
    if isinstance(leaf, jax.Array):
      groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
      inputs.append(leaf)
    else:
      groups.setdefault(None, []).append(i)
      inputs.append(_host_words(np.asarray(leaf)))
  values = {}
  for indices in groups.values():
    sums = _fingerprint_all([inputs[i] for i in indices])
    # The result is replicated: every process reads its own copy.
    for i, value in zip(indices, np.asarray(sums.addressable_data(0))):
      values[named[i][0]] = int(value)
  return {name: values[name] for name, _ in named}
