"""Resilience of the pretraining loop, in-process: non-finite steps and preflight checks.

Multi-process runs, restores across device counts and real kills are in test_scale.py.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax.data import pipeline
from pirl_jax.data import sources
from pirl_jax.tasks import pretrain
from pirl_jax.train import loop
from pirl_jax.train import state as state_lib
import helpers  # tests/helpers.py
import tree_arrays  # tests/tree_arrays.py


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("prepared_cache")


def _config(root, cache_dir, source="folder", **overrides):
  config = pirl_configs.get_config("tiny")
  config.data.source = source
  config.data.path = str(root)
  config.data.cache_dir = str(cache_dir)
  config.probe.enabled = False  # the probes watch training; these tests are about the loop
  config.update_from_flattened_dict(overrides)
  return config


_flat = tree_arrays.flat


def _max_diff(a, b, keys=("params", "batch_stats", "opt_state")):
  return max(
      float(np.max(np.abs(x.astype(np.float64) - _flat({k: b[k] for k in keys})[name])))
      for name, x in _flat({k: a[k] for k in keys}).items()
  )


def _inject_nan_at(monkeypatch, bad_step):
  """Makes the batch of training step `bad_step` (1-based, as logged) all-NaN images."""
  original = pipeline.PretrainInput.iterate

  def iterate(self, start_step=0):
    for step, batch in enumerate(original(self, start_step), start=start_step + 1):
      if step == bad_step:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(pipeline.PretrainInput, "iterate", iterate)


@pytest.mark.slow
def test_nonfinite_step_stops_or_is_skipped(tmp_path, small_isic_root, cache_dir, monkeypatch):
  _inject_nan_at(monkeypatch, 5)
  work = tmp_path / "run"
  base = {"num_train_steps": 8, "num_devices": 1, "checkpoint_every_steps": 3, "log_every_steps": 8}
  config = _config(small_isic_root, cache_dir, source="isic", **base)
  # The check happens at the step-6 checkpoint (no log line before step 8).
  with pytest.raises(
      FloatingPointError,
      match=r"Non-finite loss and grad_norm at step 5\. .*latest good checkpoint " r"is step 3",
  ):
    pretrain.train_and_evaluate(config, str(work))
  assert helpers.steps(work) == [3]  # the poisoned state of step 6 was not saved

  # Resuming into the same workdir with another experiment's config is refused ...
  changed = _config(
      small_isic_root, cache_dir, source="isic", **{**base, "optim.base_learning_rate": 0.1}
  )
  with pytest.raises(
      preflight.PreflightError,
      match=r"(?s)latest step 3.*optim\.base_learning_rate: 0\.03 in the workdir, "
      r"0\.1 now.*--config\.resume=force",
  ):
    pretrain.train_and_evaluate(changed, str(work))
  # ... and so is starting over there.
  never = _config(small_isic_root, cache_dir, source="isic", **{**base, "resume": "never"})
  with pytest.raises(
      preflight.PreflightError, match=r"config.resume='never' but .* \(latest step 3\)"
  ):
    pretrain.train_and_evaluate(never, str(work))

  # Turning on skip_nonfinite_steps (a resumable field) gets past the bad step.
  skip = _config(
      small_isic_root,
      cache_dir,
      source="isic",
      **{**base, "skip_nonfinite_steps": True, "checkpoint_every_steps": 1, "keep_checkpoints": 10},
  )
  summary = pretrain.train_and_evaluate(skip, str(work))
  assert summary["step"] == 8 and summary["nonfinite_steps"] == 1
  assert np.isfinite(summary["metrics"]["loss"])
  before, after = (checkpointing.load_arrays(helpers.item(work, s)) for s in (4, 5))
  assert (
      _max_diff(after, before, keys=("params", "batch_stats", "opt_state", "bank", "nce_z")) == 0.0
  )  # step 5 changed nothing ...
  assert (after["step"], after["nonfinite_steps"]) == (5, 1)  # ... but was counted
  assert before["nonfinite_steps"] == 0
  final = checkpointing.load_arrays(helpers.item(work, 8))
  assert all(np.all(np.isfinite(x)) for x in _flat(final).values())


def test_preflight_unwritable_workdir(tmp_path, small_isic_root, cache_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(
      preflight.PreflightError, match=f"The workdir {blocker / 'run'} is not a writable directory"
  ):
    pretrain.train_and_evaluate(_config(small_isic_root, cache_dir), str(blocker / "run"))


def test_preflight_not_enough_disk(tmp_path, small_isic_root, cache_dir, monkeypatch):
  monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 5 << 20)

  def no_compile(*args, **kwargs):
    raise AssertionError("the state was created before the disk check")

  monkeypatch.setattr(state_lib, "create_train_state", no_compile)
  config = _config(small_isic_root, cache_dir, source="isic")
  with pytest.raises(
      preflight.PreflightError,
      match=r"Not enough free disk for checkpoints in .*checkpoints: 5\.0 MiB free, "
      r"about .* MiB needed \(4 checkpoint\(s\)",
  ):
    pretrain.train_and_evaluate(config, str(tmp_path / "run"))
  # The estimate is the state's size from its shapes: params, momentum, bank, scalars.
  model = state_lib.create_model(config.model)
  tx, _ = state_lib.create_optimizer(config.optim, 0.1, 0, 10)
  abstract, _ = state_lib.abstract_train_state(config, model, tx, 120, sharding_lib.create_mesh())
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  assert preflight.state_bytes(abstract) >= 4 * (2 * num_params + 120 * 128)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (
            {"global_batch_size": 128},
            configuration.ConfigError,
            "The dataset has 120 images, fewer than config.global_batch_size=128",
        ),
        (
            {"loss.num_negatives": 120},
            configuration.ConfigError,
            r"config.loss.num_negatives=120 must be < the dataset size N=120",
        ),
        (
            {"num_devices": 3},
            configuration.ConfigError,
            r"config.global_batch_size=16 must be divisible by the number of devices \(3\)",
        ),
        (
            {"num_devices": 9},
            configuration.ConfigError,
            r"config.num_devices=9 must be in \[0, 8\]",
        ),
    ],
)
def test_preflight_config_errors(tmp_path, small_isic_root, cache_dir, overrides, error, message):
  config = _config(small_isic_root, cache_dir, source="isic", **overrides)
  with pytest.raises(error, match=message):
    pretrain.train_and_evaluate(config, str(tmp_path / "run"))


def test_config_differences_ignore_resumable_fields(small_isic_root, cache_dir):
  saved = preflight.config_as_dict(_config(small_isic_root, cache_dir))
  new = _config(
      small_isic_root,
      cache_dir,
      **{
          "log_every_steps": 7,
          "num_devices": 2,
          "keep_checkpoints": 9,
          "resume": "force",
          "skip_nonfinite_steps": True,
          "loss.kind": "nce",
          "data.views.image_size": 48,
      },
  )
  assert preflight.config_differences(saved, preflight.config_as_dict(new)) == [
      "data.views.image_size: 32 in the workdir, 48 now",
      'loss.kind: "infonce" in the workdir, "nce" now',
  ]
  del saved["loss"]["temperature"]
  assert "loss.temperature: (absent) in the workdir, 0.07 now" in preflight.config_differences(
      saved, preflight.config_as_dict(new)
  )


def test_a_workdir_from_before_config_method_resumes_as_pirl(small_isic_root, cache_dir):
  """`method` was added later: a saved config without it ran PIRL."""
  saved = preflight.config_as_dict(_config(small_isic_root, cache_dir))
  del saved["method"]
  pirl = preflight.config_as_dict(_config(small_isic_root, cache_dir))
  assert preflight.config_differences(saved, pirl) == []
  npid = preflight.config_as_dict(_config(small_isic_root, cache_dir, method="npid"))
  assert preflight.config_differences(saved, npid) == ['method: "pirl" in the workdir, "npid" now']


def test_forced_resume_keeps_the_previous_config(tmp_path, tiny_pretraining):
  """Run's preflight and config.json on a copy of a finished run's workdir (checkpoints 2, 4)."""
  workdir = tmp_path / "run"
  shutil.copytree(tiny_pretraining.workdir, workdir)
  saved = (workdir / "config.json").read_text()
  same = tiny_pretraining.config.copy_and_resolve_references()
  changed = same.copy_and_resolve_references()
  changed.loss.kind = "nce"  # resume stays 'auto'

  # Another experiment's config is refused without --config.resume=force ...
  with pytest.raises(
      preflight.PreflightError,
      match=r'(?s)latest step 4.*loss\.kind: "infonce" in the workdir, "nce" now',
  ):
    loop.Run(changed, workdir, pretrain.TASK_NAME)
  # ... the same config rewrites nothing aside ...
  with loop.Run(same, workdir, pretrain.TASK_NAME) as run:
    run.save_config()
  assert (workdir / "config.json").read_text() == saved
  assert not (workdir / "config.1.json").exists()

  # ... and a forced resume keeps the replaced config as config.1.json (then config.2.json).
  def forced_resume(**fields):
    config = same.copy_and_resolve_references()
    config.update_from_flattened_dict({"resume": "force", **fields})
    with loop.Run(config, workdir, pretrain.TASK_NAME) as run:
      assert run.latest == 4
      run.save_config()

  forced_resume(**{"loss.kind": "nce"})
  assert (workdir / "config.1.json").read_text() == saved
  forced_resume(**{"loss.temperature": 0.2})
  saved_configs = [
      json.loads((workdir / name).read_text())
      for name in ("config.1.json", "config.2.json", "config.json")
  ]
  assert [(c["loss"]["kind"], c["loss"]["temperature"]) for c in saved_configs] == [
      ("infonce", 0.07),
      ("nce", 0.07),
      ("infonce", 0.2),
  ]


def test_distributed_initialize_from_flags_or_environment(monkeypatch):
  from pirl_jax import distributed  # pylint: disable=g-import-not-at-top

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.initialize("flags")  # nothing configured: one process
  assert not distributed.initialize("off", "h:1", 2, 0)
  with pytest.raises(ValueError, match=r"--coordinator_address=h:1 also needs --process_id"):
    distributed.initialize("flags", "h:1", 2, None)
  assert distributed.initialize("flags", "h:1", 2, 1)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h0:9")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.initialize("flags")
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  assert distributed.initialize("auto", process_id=2)  # the rest left to JAX's cluster detection
  assert calls == [
      dict(coordinator_address="h:1", num_processes=2, process_id=1),
      dict(coordinator_address="h0:9", num_processes=4, process_id=3),
      dict(coordinator_address=None, num_processes=4, process_id=2),
  ]


@pytest.mark.slow
def test_cli_starts_jax_distributed_before_anything_initialises_jax(tmp_path):
  """main.py with --coordinator_address (here a job of one process) gets past
  jax.distributed.initialize: nothing (a log line included) may initialise JAX's backend first.
  It then stops at the missing data folder, as a user error."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", PIRL_JAX_CACHE=str(tmp_path / "cache"))
  result = subprocess.run(
      [
          sys.executable,
          "main.py",
          "--config=configs/pirl.py:tiny",
          f"--workdir={tmp_path / 'run'}",
          "--config.data.source=folder",
          f"--config.data.path={tmp_path / 'missing'}",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=1",
          "--process_id=0",
      ],
      cwd=pathlib.Path(__file__).resolve().parents[1],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "process 0/1, 1 local / 1 global device(s)" in result.stderr
  assert result.returncode == 2
  assert f"error: Image folder does not exist: {tmp_path / 'missing'}" in result.stderr
