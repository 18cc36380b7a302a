"""Test setup: 8 fake CPU devices, so multi-device equals single-device can be checked in-process.

XLA reads the flag when jax initialises its backend, so it is set before any test imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, shared with the CLI subprocesses: the tiny
# preset's step is compiled once instead of in every test that trains.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pirl_jax_test_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def small_isic_root(tmp_path_factory):
  """A small synthetic set in the ISIC 2017 layout, generated once per test session."""
  from pirl_jax.data import synthetic
  root = tmp_path_factory.mktemp("small_isic")
  synthetic.generate(root, seed=0, num_train=120, num_val=30, num_test=60)
  return root
