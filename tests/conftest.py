"""Test setup: 8 fake CPU devices, so multi-device equals single-device can be checked in-process.

XLA reads the flag when jax initialises its backend, so it is set before any test imports jax.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests compile many small programs and run each a few steps: XLA's optimisation passes cost more
# than they save here (the suite takes about half the time without them). Tests that inspect a
# compiled program's collectives turn them back on (`optimized_compiles`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
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


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
  """One prepared-image cache for the session's in-process runs."""
  return tmp_path_factory.mktemp("prepared_cache")


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory, small_isic_root, shared_cache_dir):
  """One short pretraining run (tiny preset, the 8 fake devices, probes at steps 2 and 4),
  shared by every test that only reads its outputs. Tests must not write into its workdir."""
  import types  # pylint: disable=g-import-not-at-top
  from configs import pirl as pirl_configs  # pylint: disable=g-import-not-at-top
  from pirl_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top

  config = pirl_configs.get_config("tiny")
  config.update_from_flattened_dict(
      {
          "data.source": "isic",
          "data.path": str(small_isic_root),
          "data.cache_dir": str(shared_cache_dir),
          "num_train_steps": 4,
          "checkpoint_every_steps": 2,
          "log_every_steps": 4,
          "eval_every_steps": 2,
      }
  )
  workdir = tmp_path_factory.mktemp("tiny_pretraining") / "run"
  summary = pretrain.train_and_evaluate(config, str(workdir))
  return types.SimpleNamespace(config=config, workdir=workdir, summary=summary)


@pytest.fixture(scope="session")
def tiny_finetuning(tmp_path_factory, tiny_pretraining, small_isic_root, shared_cache_dir):
  """One short fine-tuning run from `tiny_pretraining` (tiny preset, 4 steps, validation at
  steps 2 and 4), shared by every test that only reads its outputs. Tests must not write into
  its workdir."""
  import types  # pylint: disable=g-import-not-at-top
  from configs import finetune_isic  # pylint: disable=g-import-not-at-top
  from pirl_jax.tasks import finetune  # pylint: disable=g-import-not-at-top

  config = finetune_isic.get_config("tiny")
  config.update_from_flattened_dict(
      {
          "data.source": "isic",
          "data.path": str(small_isic_root),
          "data.cache_dir": str(shared_cache_dir),
          "init.checkpoint": str(tiny_pretraining.workdir),
          "num_train_steps": 4,
          "eval_every_steps": 2,
      }
  )
  workdir = tmp_path_factory.mktemp("tiny_finetuning") / "run"
  summary = finetune.train_and_evaluate(config, str(workdir))
  return types.SimpleNamespace(config=config, workdir=workdir, summary=summary)


@pytest.fixture(scope="session")
def gcs():
  """A local Cloud Storage emulator with one bucket, the clients pointed at it
  (tests/gcs_emulator.py); the tests that use it are skipped, saying why, when it cannot start."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  try:
    emulator = gcs_emulator.start()
  except RuntimeError as e:
    pytest.skip(f"no Cloud Storage emulator: {e}")
  yield emulator
  emulator.stop()


def pytest_terminal_summary(terminalreporter):
  """The fault-injection suite's outcome counts (tests/test_faults.py), when it ran."""
  faults = sys.modules.get("test_faults")
  if faults is not None and faults.OUTCOMES:
    terminalreporter.write_sep("=", "fault-injection outcomes (trial / outcome: count)")
    for name, count in sorted(faults.OUTCOMES.items()):
      terminalreporter.write_line(f"{name}: {count}")
