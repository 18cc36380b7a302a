"""pirl_jax: PIRL (Misra & van der Maaten, CVPR 2020) in JAX/Flax.

`pirl_jax.load_trunk(checkpoint)` and `pirl_jax.embed(trunk, variables, images)` (from
`pirl_jax.inference`) restore a trained trunk and compute its features; they are imported on
first use, so that `import pirl_jax` stays cheap for the command-line modules.
"""

_PUBLIC = {"load_trunk": "pirl_jax.inference", "embed": "pirl_jax.inference"}


def __getattr__(name):
  if name in _PUBLIC:
    import importlib  # pylint: disable=g-import-not-at-top

    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'pirl_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_PUBLIC))
