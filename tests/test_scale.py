"""Scale-out and preemption, end to end: two processes equal one, checkpoints move between device
counts, and a run killed (SIGKILL) or preempted (SIGTERM) resumes bitwise identically."""

import pathlib
import re
import shutil
import signal
import socket

import jax
import numpy as np
import pytest

from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import sharding as sharding_lib
from pirl_jax.tasks import pretrain
from pirl_jax.train import state as state_lib
import main_runs  # tests/main_runs.py
import tree_arrays  # tests/tree_arrays.py

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_IMAGES = 210  # every image of small_isic_root (data.source='folder'); not a multiple of 8 or 4
MULTI_STEPS = 4  # steps of the 8-device reference and of the two-process run

pytestmark = pytest.mark.slow


_flat = tree_arrays.flat


def _max_diff(a, b):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


_item = main_runs.item
_steps = main_runs.steps


def _flags(root, workdir, *extra):
  return [
      "--config=configs/pirl.py:tiny",
      f"--workdir={workdir}",
      "--config.data.source=folder",
      f"--config.data.path={root}",
      *extra,
  ]


def _env(tmp_path, devices=None, compilation_cache=None):
  return main_runs.env(tmp_path / "cache", devices, compilation_cache)


_Run = main_runs.Run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, small_isic_root):
  """One process, 8 devices: MULTI_STEPS steps, checkpoints at every 2 (the reference)."""
  workdir = tmp_path_factory.mktemp("eight_devices") / "run"
  config = pirl_configs.get_config("tiny")
  config.data.source = "folder"
  config.data.path = str(small_isic_root)
  config.data.cache_dir = str(workdir.parent / "cache")
  config.num_train_steps = MULTI_STEPS
  config.checkpoint_every_steps = 2
  summary = pretrain.train_and_evaluate(config, str(workdir))
  assert summary["step"] == MULTI_STEPS and _steps(workdir) == [2, 4]
  return config, workdir


def test_two_processes_equal_one_process_with_eight_devices(
    tmp_path, small_isic_root, eight_device_run
):
  _, reference = eight_device_run
  workdir = tmp_path / "run"
  port = _free_port()
  runs = [
      _Run(
          _flags(
              small_isic_root,
              workdir,
              f"--config.num_train_steps={MULTI_STEPS}",
              "--config.checkpoint_every_steps=2",
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          _env(tmp_path, devices=4),
      )
      for i in range(2)
  ]
  results = []
  try:
    for run in runs:
      results.append(run.finish(timeout=500))
  finally:
    for run in runs:
      if run.proc.poll() is None:
        run.proc.kill()
  for i, (code, _, stderr) in enumerate(results):
    assert code == 0, f"process {i}:\n{stderr[-4000:]}"
    assert f"process {i}/2, 4 local / 8 global device(s)" in stderr
  assert f"Pretraining finished at step {MULTI_STEPS}" in results[0][1]
  assert "Pretraining" not in results[1][1]  # process 1 reports nothing (gloo chats on stdout) ...

  # ... and writes nothing but its share of the checkpoints: one TensorBoard file, one config,
  # one dataset record.
  names = sorted(p.name for p in workdir.iterdir())
  assert [n for n in names if not n.startswith("events.out.tfevents.")] == [
      "checkpoints",
      "config.json",
      "dataset.json",
      "summary.json",
  ]
  assert len(names) == 5
  assert _steps(workdir) == [2, 4]

  mine = checkpointing.load_arrays(_item(workdir, MULTI_STEPS))
  theirs = checkpointing.load_arrays(_item(reference, MULTI_STEPS))
  assert mine["bank"].shape == (216, 128)  # padded for 8 devices, rows written by both processes
  np.testing.assert_array_equal(mine["bank"][NUM_IMAGES:], 0.0)
  # Same 8-way partitioning; only the cross-process collectives (gloo) may order sums differently.
  assert _max_diff(mine, theirs) <= 1e-5


def _restore_on(workdir, step, config, num_devices):
  """Restores checkpoint `step` onto the first `num_devices` devices, as the loop does."""
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  model = state_lib.create_model(config.model)
  tx, _ = state_lib.create_optimizer(config.optim, 0.1, 0, 10)
  abstract, shardings = state_lib.abstract_train_state(config, model, tx, NUM_IMAGES, mesh)
  ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  try:
    return ckpt.restore(step, checkpointing.abstract_like(abstract, shardings), resize=("bank",))
  finally:
    ckpt.close()


def _assert_restored(restored, saved, num_devices):
  rows = -(-NUM_IMAGES // num_devices) * num_devices
  assert restored.bank.shape == (rows, 128)
  assert (
      restored.bank.sharding.spec
      == sharding_lib.bank_sharding(sharding_lib.create_mesh(jax.devices()[:num_devices])).spec
  )
  assert len(restored.bank.sharding.device_set) == num_devices
  restored = jax.device_get(restored)
  np.testing.assert_array_equal(restored.bank[:NUM_IMAGES], saved["bank"][:NUM_IMAGES])
  np.testing.assert_array_equal(restored.bank[NUM_IMAGES:], 0.0)
  for field in ("params", "batch_stats", "opt_state", "step", "rng", "nce_z"):
    assert _max_diff(getattr(restored, field), saved[field]) == 0.0, field


def test_checkpoints_restore_across_device_counts(tmp_path, eight_device_run):
  """8 -> 1, 8 -> 4 and 1 -> 8 devices: rows < N bitwise, the bank's padding trimmed or added
  (216 rows on 8 devices, 212 on 4, 210 on 1), and training continues."""
  config, reference = eight_device_run
  saved = checkpointing.load_arrays(_item(reference, 2))
  assert saved["bank"].shape == (216, 128)
  for n in (1, 4):
    _assert_restored(_restore_on(reference, 2, config, n), saved, n)

  # The loop resumes an 8-device checkpoint on 1 device and ends where 8 devices did.
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(MULTI_STEPS))
  config = config.copy_and_resolve_references()
  config.num_devices = 1
  summary = pretrain.train_and_evaluate(config, str(workdir))
  assert summary["step"] == MULTI_STEPS
  one = checkpointing.load_arrays(_item(workdir, MULTI_STEPS))
  eight = checkpointing.load_arrays(_item(reference, MULTI_STEPS))
  assert one["bank"].shape == (NUM_IMAGES, 128)
  # Different device counts sum in a different order: equal up to float32 rounding.
  for field in ("params", "batch_stats", "opt_state"):
    assert _max_diff(one[field], eight[field]) < 1e-4, field
  np.testing.assert_allclose(one["bank"], eight["bank"][:NUM_IMAGES], atol=1e-4)

  # And the 1-device checkpoint it wrote restores on 8 devices (padding rows added).
  _assert_restored(_restore_on(workdir, MULTI_STEPS, config, 8), one, 8)


def test_sigkill_and_sigterm_resume_bitwise_identical(tmp_path, small_isic_root):
  total, every = 30, 5
  jax_cache = tmp_path / "jax_cache"
  env = _env(tmp_path, compilation_cache=jax_cache)  # one device

  def command(workdir):
    return _flags(
        small_isic_root,
        workdir,
        f"--config.num_train_steps={total}",
        f"--config.checkpoint_every_steps={every}",
        "--config.log_every_steps=1",
    )

  code, _, log = _Run(command(tmp_path / "straight"), env).finish()
  assert code == 0, log[-4000:]

  workdir = tmp_path / "interrupted"
  ckpt_dir = workdir / "checkpoints"
  # 1. SIGKILL once a checkpoint is complete and a later step has run.
  run = _Run(command(workdir), env)
  run.wait_until(
      lambda: _steps(workdir) and run.logged_step() > max(_steps(workdir)),
      what="a checkpoint and a step after it",
  )
  run.proc.send_signal(signal.SIGKILL)
  code, _, log = run.finish()
  assert code == -signal.SIGKILL
  resume_from = max(_steps(workdir))
  assert resume_from < total
  # An async save cut short leaves '<step>.orbax-checkpoint-tmp' (renamed only when complete):
  # it must never be taken for the latest checkpoint.
  partial = ckpt_dir / f"{resume_from + every}.orbax-checkpoint-tmp"
  if not partial.exists():
    shutil.copytree(ckpt_dir / str(resume_from), partial)
    (partial / "commit_success.txt").unlink(missing_ok=True)

  # 2. The same command resumes; SIGTERM a few steps later: it checkpoints and exits 0.
  run = _Run(command(workdir), env)
  run.wait_until(lambda: run.logged_step() >= resume_from + 3, what="steps after resuming")
  run.proc.send_signal(signal.SIGTERM)
  code, stdout, log = run.finish()
  assert code == 0, log[-4000:]
  assert f"Resumed from {ckpt_dir} at step {resume_from} " in log
  assert not partial.exists()  # orbax removed the incomplete save
  stopped = int(re.search(rf"stopped by SIGTERM at step (\d+) of {total}", stdout).group(1))
  assert resume_from + 3 <= stopped < total
  assert stopped in _steps(workdir)

  # 3. And again: it finishes.
  code, stdout, log = _Run(command(workdir), env).finish()
  assert code == 0, log[-4000:]
  assert f"Resumed from {ckpt_dir} at step {stopped} " in log
  assert f"Pretraining finished at step {total}" in stdout

  straight = checkpointing.load_arrays(_item(tmp_path / "straight", total))
  resumed = checkpointing.load_arrays(_item(workdir, total))
  assert _max_diff(straight, resumed) == 0.0  # bitwise: params, opt_state, bank, rng, ...
