"""Where the data layer reads and writes: paths from the config, and the cache root."""

from __future__ import annotations

import os
import pathlib

from pirl_jax.data import errors

CACHE_ENV_VAR = "PIRL_JAX_CACHE"


def user_path(path: str | os.PathLike) -> str:
  """A path from the config or the command line with `~` expanded; '' stays ''."""
  return os.path.expanduser(os.fspath(path)) if path else ""


def cache_root(cache_dir: str | os.PathLike = "") -> pathlib.Path:
  """The data cache: `data.cache_dir`, else `$PIRL_JAX_CACHE`, else `~/.cache/pirl_jax`.

  `~` is expanded in all three. The cache is each machine's own: a local folder, not a URL.
  """
  given = os.fspath(cache_dir or os.environ.get(CACHE_ENV_VAR) or "")
  if "://" in given:
    raise errors.ConfigFieldError(
        f"data.cache_dir (or ${CACHE_ENV_VAR}) = {given!r}: the prepared-image cache is a local "
        "folder on each machine, not a URL; the data itself (data.path) may be gs://."
    )
  return pathlib.Path(
      cache_dir or os.environ.get(CACHE_ENV_VAR) or pathlib.Path.home() / ".cache" / "pirl_jax"
  ).expanduser()
