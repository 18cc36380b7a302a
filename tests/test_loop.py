"""The training loop (pirl_jax/train/loop.py) through PIRL pretraining, and the step it drives.

  * a damaged latest checkpoint: the run resumes from the one before, never from scratch;
  * a dataset changed between a run and its resumption is refused before training;
  * a finished run is not run again, and nothing in its workdir changes (in-process and CLI);
    moved elsewhere, it reports its new place; a forced resume with more steps is not "finished";
  * SIGTERM while the CLI starts up: a message and exit status 0;
  * the jitted step's loss and memory-bank write, against a NumPy float64 reference;
  * model.bn_running_stats: which pass updates the running statistics, training unchanged;
  * the tile pass keeps running statistics of its own (a NumPy EMA of its batch moments);
  * a workdir written before the state kept them restores.

Tests that need a finished run copy the session's `tiny_pretraining` workdir (never write into it).
"""

import functools
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
from PIL import Image
import pytest

from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import configuration
from pirl_jax import memory_bank
from pirl_jax import preflight
from pirl_jax import sharding as sharding_lib
from pirl_jax import signals
from pirl_jax.data import pipeline
from pirl_jax.tasks import pretrain
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib
import helpers  # tests/helpers.py
import tree_arrays  # tests/tree_arrays.py

REPO = pathlib.Path(__file__).resolve().parents[1]
_flat = tree_arrays.flat


def _assert_bitwise_equal(a, b):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _messages(caplog, level=logging.INFO):
  return [r.getMessage() for r in caplog.records if r.levelno >= level]


def _copy_run(tiny_pretraining, destination):
  """A copy of the session's finished tiny run (file contents and mtimes kept)."""
  shutil.copytree(tiny_pretraining.workdir, destination)
  return destination


# --- Resume past a damaged checkpoint -------------------------------------------------------------


@pytest.mark.slow  # two subprocess runs; the tracebacks appear with one device, not in-process
def test_a_truncated_array_file_falls_back_in_one_warning_without_tracebacks(tmp_path):
  """TensorStore's reads still in flight when one fails call back into a closed asyncio loop;
  each of those printed a traceback (about 700 lines) before the restore dropped them."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PIRL_JAX_CACHE"] = str(tmp_path / "cache")
  args = [
      sys.executable,
      "main.py",
      "--config=configs/pirl.py:tiny",
      f"--workdir={tmp_path / 'run'}",
      "--config.num_train_steps=4",
      "--config.checkpoint_every_steps=2",
      "--config.probe.enabled=False",
  ]
  first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  (tmp_path / "run" / "summary.json").unlink()
  for data_file in sorted((helpers.item(tmp_path / "run", 4) / "d").iterdir()):
    data_file.write_bytes(data_file.read_bytes()[:10])
  second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "is damaged" in second.stderr and "Trying the step before it" in second.stderr
  assert (
      "Event loop is closed" not in second.stderr and "Traceback" not in second.stderr
  ), second.stderr[-3000:]


def test_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, tiny_pretraining, caplog):
  """The run was cut off after writing checkpoint 4 and before its summary, and checkpoint 4 is
  damaged: the same command resumes from step 2 (not from scratch), saying which step it skipped,
  and ends bitwise where the uninterrupted run ended."""
  workdir = _copy_run(tiny_pretraining, tmp_path / "run")
  assert helpers.steps(workdir) == [2, 4]
  (helpers.item(workdir, 4) / "_METADATA").unlink()
  (workdir / "summary.json").unlink()
  config = tiny_pretraining.config.copy_and_resolve_references()
  config.probe.enabled = False  # resumable in pretraining; the probes do not touch the state

  with caplog.at_level(logging.INFO, logger="absl"):
    summary = pretrain.train_and_evaluate(config, str(workdir))

  assert summary["complete"] and summary["step"] == 4 and not summary.get("already_complete")
  damaged = workdir / "checkpoints" / "4"
  kept = workdir / "checkpoints" / "4.damaged"
  warnings = _messages(caplog, logging.WARNING)
  assert any(
      f"Checkpoint {damaged} is damaged" in w and "Trying the step before it" in w for w in warnings
  ), warnings
  infos = _messages(caplog)
  assert any(
      m.startswith(
          f"Resumed from {workdir / 'checkpoints'} at step 2 on 8 device(s); "
          f"skipped damaged step 4 ("
      )
      and f"kept as {kept}" in m
      for m in infos
  ), infos
  assert any(m.startswith("Pretraining: steps 2..4 ") for m in infos), infos  # not 0..4
  assert kept.is_dir() and helpers.steps(workdir) == [2, 4]
  _assert_bitwise_equal(
      checkpointing.load_arrays(helpers.item(workdir, 4)),
      checkpointing.load_arrays(helpers.item(tiny_pretraining.workdir, 4)),
  )
  assert summary["metrics"]["loss"] == tiny_pretraining.summary["metrics"]["loss"]


# --- The dataset changed between a run and its resumption ---------------------------------------

NUM_FOLDER_IMAGES = 40


def _write_jpeg(path, seed):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  path.write_bytes(out.getvalue())


def _folder_config(root, cache_dir):
  config = pirl_configs.get_config("tiny")
  config.update_from_flattened_dict(
      {
          "data.source": "folder",
          "data.path": str(root),
          "data.cache_dir": str(cache_dir),
          "probe.enabled": False,
          "loss.num_negatives": 16,
          "num_devices": 1,
          "num_train_steps": 4,
          "checkpoint_every_steps": 2,
          "log_every_steps": 2,
      }
  )
  return config


class _Crash(Exception):
  """Stands for the process dying."""


def _crash_at(monkeypatch, crash_step):
  """Makes the data pipeline fail when the loop asks for training step `crash_step` (1-based)."""
  original = pipeline.PretrainInput.iterate

  def iterate(self, start_step=0):
    for step, batch in enumerate(original(self, start_step), start=start_step + 1):
      if step == crash_step:
        raise _Crash()
      yield batch

  monkeypatch.setattr(pipeline.PretrainInput, "iterate", iterate)


def _swap_in(folder, pristine, change=lambda folder: None):
  """`folder` becomes a copy of `pristine` with `change` applied (same path: data.path)."""
  shutil.rmtree(folder)
  shutil.copytree(pristine, folder)
  change(folder)


@pytest.fixture(scope="module")
def interrupted_folder_run(tmp_path_factory):
  """A run on a folder of 40 JPEGs that died after its step-2 checkpoint (4 steps configured).

  Tests change the folder in place (data.path is part of the experiment), restore it afterwards
  with `_swap_in`, and resume copies of the workdir.
  """
  root = tmp_path_factory.mktemp("folder_run")
  folder, pristine = root / "images", root / "pristine"
  pristine.mkdir()
  for i in range(NUM_FOLDER_IMAGES):
    _write_jpeg(pristine / f"img_{i:02d}.jpg", seed=i)
  shutil.copytree(pristine, folder)
  config = _folder_config(folder, root / "cache")
  workdir = root / "run"
  with pytest.MonkeyPatch.context() as m:
    _crash_at(m, 3)
    with pytest.raises(_Crash):
      pretrain.train_and_evaluate(config, str(workdir))
  assert helpers.steps(workdir) == [2] and not (workdir / "summary.json").exists()
  names = json.loads((workdir / "dataset.json").read_text())["names"]
  assert names == [f"img_{i:02d}.jpg" for i in range(NUM_FOLDER_IMAGES)]
  return types.SimpleNamespace(folder=folder, pristine=pristine, config=config, workdir=workdir)


_CHANGES = {
    "content": (
        lambda f: _write_jpeg(f / "img_07.jpg", seed=1000),
        [r"index 7: img_07\.jpg has other content"],
    ),
    "removed": (
        lambda f: (f / "img_11.jpg").unlink(),
        [r"39 images now, 40 when the run started", r"removed: img_11\.jpg"],
    ),
    # Renamed so that it sorts last: every index from 3 on now holds another image. The message
    # must name the image that went and the one that came.
    "renamed": (
        lambda f: (f / "img_03.jpg").rename(f / "zz_renamed.jpg"),
        [r"img_03\.jpg", r"zz_renamed\.jpg"],
    ),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_changed_dataset_is_refused_before_training(
    tmp_path, interrupted_folder_run, change, monkeypatch
):
  run = interrupted_folder_run
  workdir = tmp_path / "run"
  shutil.copytree(run.workdir, workdir)
  recorded = (workdir / "dataset.json").read_text()

  def nothing_built(*args, **kwargs):
    raise AssertionError("the train state was built before the dataset check")

  monkeypatch.setattr(state_lib, "create_train_state", nothing_built)
  monkeypatch.setattr(state_lib, "abstract_train_state", nothing_built)

  alter, expected = _CHANGES[change]
  _swap_in(run.folder, run.pristine, alter)
  try:
    with pytest.raises(
        preflight.PreflightError, match=r"The dataset changed since .* \(step 2\)"
    ) as raised:
      pretrain.train_and_evaluate(run.config, str(workdir))
  finally:
    _swap_in(run.folder, run.pristine)
  for pattern in expected:
    assert re.search(pattern, str(raised.value)), f"{pattern!r} not in:\n{raised.value}"
  assert helpers.steps(workdir) == [2]
  assert (workdir / "dataset.json").read_text() == recorded


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            "missing",
            r"dataset\.json is missing: it records which image each of the checkpoints' rows "
            r"refers to \(latest step 2\).*--config\.resume=force",
        ),
        ("truncated", r"dataset\.json is damaged \(.*\); it records which images"),
        ("not an object", r"dataset\.json is damaged \(a JSON list, not an object\)"),
    ],
)
def test_a_missing_or_damaged_dataset_record_is_refused(
    tmp_path, interrupted_folder_run, damage, message
):
  run = interrupted_folder_run
  workdir = tmp_path / "run"
  shutil.copytree(run.workdir, workdir)
  record = workdir / "dataset.json"
  if damage == "missing":
    record.unlink()
  elif damage == "truncated":
    record.write_text(record.read_text()[:40])
  else:
    record.write_text("[]")
  # An image replaced meanwhile: without the record nothing else could tell.
  _swap_in(run.folder, run.pristine, _CHANGES["content"][0])
  try:
    with pytest.raises(preflight.PreflightError, match=message):
      pretrain.train_and_evaluate(run.config, str(workdir))
  finally:
    _swap_in(run.folder, run.pristine)
  assert helpers.steps(workdir) == [2]


def test_a_missing_dataset_record_resumes_with_force_and_is_written_again(
    tmp_path, interrupted_folder_run, caplog
):
  run = interrupted_folder_run
  workdir = tmp_path / "run"
  shutil.copytree(run.workdir, workdir)
  recorded = (workdir / "dataset.json").read_text()
  (workdir / "dataset.json").unlink()
  _swap_in(run.folder, run.pristine)
  config = run.config.copy_and_resolve_references()
  config.resume = "force"
  with caplog.at_level(logging.WARNING, logger="absl"):
    summary = pretrain.train_and_evaluate(config, str(workdir))
  assert summary["complete"] and summary["step"] == 4
  assert any("Resuming anyway (config.resume='force')" in m for m in _messages(caplog))
  assert (workdir / "dataset.json").read_text() == recorded


def test_unchanged_dataset_resumes(tmp_path, interrupted_folder_run, caplog):
  run = interrupted_folder_run
  workdir = tmp_path / "run"
  shutil.copytree(run.workdir, workdir)
  _swap_in(run.folder, run.pristine)  # a fresh copy of the same files: not a change
  with caplog.at_level(logging.INFO, logger="absl"):
    summary = pretrain.train_and_evaluate(run.config, str(workdir))
  assert summary["complete"] and summary["step"] == 4
  assert any(
      m.startswith(f"Resumed from {workdir / 'checkpoints'} at step 2 ") for m in _messages(caplog)
  ), _messages(caplog)
  assert helpers.steps(workdir) == [2, 4]


# --- A finished run is not run again ---------------------------------------------------------------


def test_finished_run_is_not_run_again(tmp_path, tiny_pretraining, monkeypatch):
  workdir = _copy_run(tiny_pretraining, tmp_path / "run")
  before = helpers.snapshot(workdir)
  saved_summary = json.loads((workdir / "summary.json").read_text())
  assert saved_summary["complete"] and saved_summary["step"] == 4

  def nothing_built(*args, **kwargs):
    raise AssertionError("a finished run built its train state again")

  monkeypatch.setattr(state_lib, "create_train_state", nothing_built)

  summary = pretrain.train_and_evaluate(
      tiny_pretraining.config.copy_and_resolve_references(), str(workdir)
  )
  assert summary["already_complete"] is True
  places = ("workdir", "checkpoint_dir")  # test_finished_run_moved_elsewhere_reports_its_...
  assert {k: v for k, v in summary.items() if k not in places} == {
      k: v for k, v in dict(saved_summary, already_complete=True).items() if k not in places
  }
  assert helpers.snapshot(workdir) == before  # no file added, removed, rewritten or touched


def test_finished_run_moved_elsewhere_reports_its_new_place(tmp_path, tiny_pretraining):
  """A finished workdir copied or moved (another disk, another machine) and the command run
  there again: the summary, and the CLI's message and next-step commands built from it, name
  where the run is now, not where it was written."""
  workdir = _copy_run(tiny_pretraining, tmp_path / "moved")
  summary = pretrain.train_and_evaluate(
      tiny_pretraining.config.copy_and_resolve_references(), str(workdir)
  )
  assert summary["already_complete"] is True
  assert summary["workdir"] == str(workdir)
  assert summary["checkpoint_dir"] == str(workdir / "checkpoints")


class _WouldTrain(Exception):
  """Raised where the run builds its train state: it is going on to train."""


def test_forced_resume_with_more_steps_is_not_already_complete(
    tmp_path, tiny_pretraining, monkeypatch
):
  """A finished 4-step workdir, resumed with num_train_steps=6 and --config.resume=force, is not
  the run that finished: it goes on to train (it does not report 'already complete')."""
  workdir = _copy_run(tiny_pretraining, tmp_path / "run")
  config = tiny_pretraining.config.copy_and_resolve_references()
  config.update_from_flattened_dict(
      {"num_train_steps": 6, "resume": "force", "probe.enabled": False}
  )

  def would_train(*args, **kwargs):
    raise _WouldTrain()

  monkeypatch.setattr(state_lib, "create_train_state", would_train)
  try:
    summary = pretrain.train_and_evaluate(config, str(workdir))
  except _WouldTrain:
    return
  pytest.fail(
      f"returned without training: already_complete={summary.get('already_complete')}, "
      f"step {summary['step']}/{summary['total_steps']} (6 steps asked for)"
  )


def _cli_env(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the user's environment: one CPU device
  env["JAX_PLATFORMS"] = "cpu"
  env["PIRL_JAX_CACHE"] = str(tmp_path / "cache")
  return env


@pytest.mark.slow
def test_cli_reports_an_already_complete_run(tmp_path, tiny_pretraining, small_isic_root):
  """The tiny run's config from the command line (its other fields are resumable ones)."""
  workdir = _copy_run(tiny_pretraining, tmp_path / "run")
  before = helpers.snapshot(workdir)
  result = subprocess.run(
      [
          sys.executable,
          "main.py",
          "--config=configs/pirl.py:tiny",
          f"--workdir={workdir}",
          "--config.data.source=isic",
          f"--config.data.path={small_isic_root}",
          "--config.num_train_steps=4",
      ],
      cwd=REPO,
      env=_cli_env(tmp_path),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(
      r"Pretraining in \S+ is already complete \(step 4/4, final loss [\d.]+\); "
      r"nothing was changed\.",
      result.stdout,
  ), result.stdout
  assert "Traceback" not in result.stderr
  assert helpers.snapshot(workdir) == before


# --- SIGTERM while the CLI starts up ----------------------------------------------------------------


def test_sigterm_while_a_command_imports_is_a_message_and_exit_status_0(tmp_path):
  # As while TensorFlow loads: fd 2 points at a scratch file (program.import_tensorflow), and
  # the message must still reach the real stderr.
  script = (
      "import os, signal, sys, time\n"
      "import pirl_jax.commands\n"
      f"scratch = os.open({str(tmp_path / 'scratch')!r}, os.O_WRONLY | os.O_CREAT)\n"
      "os.dup2(scratch, 2)\n"
      "os.kill(os.getpid(), signal.SIGTERM)\n"
      "time.sleep(60)\n"
      "sys.exit(7)\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr
  assert result.stderr == (
      "Stopped by SIGTERM while starting up; nothing was written: run the "
      "same command again to start.\n"
  )


@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly(tmp_path, small_isic_root):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [
          sys.executable,
          "main.py",
          "--config=configs/pirl.py:tiny",
          f"--workdir={workdir}",
          "--config.data.source=isic",
          f"--config.data.path={small_isic_root}",
      ],
      cwd=REPO,
      env=_cli_env(tmp_path),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  lines, stdout = [], []
  readers = [
      threading.Thread(target=lambda pipe=pipe, out=out: out.extend(pipe), daemon=True)
      for pipe, out in ((proc.stderr, lines), (proc.stdout, stdout))
  ]
  for reader in readers:
    reader.start()
  started = re.compile(r"JAX \S+, process 0/1, .* workdir ")
  deadline = time.time() + 300
  try:
    while not any(started.search(line) for line in list(lines)):
      assert proc.poll() is None, f"main.py exited ({proc.returncode}):\n{''.join(lines)}"
      assert time.time() < deadline, f"no start-up line:\n{''.join(lines)}"
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  for reader in readers:
    reader.join(timeout=30)
  stderr = "".join(lines)
  assert code == 0, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert "Stopped by SIGTERM outside the training steps" in stderr, stderr[-3000:]
  assert not (workdir / "checkpoints").is_dir() or helpers.steps(workdir) == []


def test_a_startup_sigterm_swallowed_by_a_finalizer_still_stops_before_the_first_step(
    tmp_path, tiny_pretraining, monkeypatch, capsys
):
  """A SIGTERM handled inside a finalizer (Python ignores exceptions there) is not lost: it is
  reported nowhere as a traceback, and the loop stops before its first step."""
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  previous = signal.getsignal(signal.SIGTERM)
  try:
    signals.install_startup_sigterm_handler()

    class SignalsWhenCollected:

      def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the finalizer

    SignalsWhenCollected()  # collected at once; its exception is "ignored"
    assert signals.startup_sigterm_received()
    assert "Traceback" not in capsys.readouterr().err
    config = tiny_pretraining.config.copy_and_resolve_references()
    workdir = tmp_path / "run"
    with pytest.raises(signals.StartupInterrupted):
      pretrain.train_and_evaluate(config, str(workdir))
    assert not (workdir / "checkpoints").is_dir() or helpers.steps(workdir) == []
  finally:
    signal.signal(signal.SIGTERM, previous)
    signals.clear()


# --- The jitted step against a NumPy reference -------------------------------------------------------

# The folder run's numbers (40 examples, K=16, its optimizer, 1 device): the same programs, so
# the session's persistent compilation cache compiles the state's init and the InfoNCE step once.
NUM_EXAMPLES = NUM_FOLDER_IMAGES
_MEMO = {}


def _step_config(loss_kind="infonce", bn_running_stats="images", z_from="both"):
  config = _folder_config("/unused", "/unused")
  config.loss.kind = loss_kind
  config.loss.nce_z_from = z_from
  config.model.bn_running_stats = bn_running_stats
  return config


def _random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  views, b = config.data.views, config.global_batch_size
  return {
      "image": rng.normal(size=(b, views.image_size, views.image_size, 3)).astype(np.float32),
      "tiles": rng.normal(size=(b, 9, views.tile_size, views.tile_size, 3)).astype(np.float32),
      "index": rng.permutation(NUM_EXAMPLES)[:b].astype(np.int32),
  }


def _memo(key, make):
  if key not in _MEMO:
    _MEMO[key] = make()
  return _MEMO[key]


def _start():
  """The initial state on 1 device and a batch (the loss kind and the running statistics option
  change neither). Returns (model, tx, schedule, mesh, host state, shardings, batch)."""

  def make():
    config = _step_config()
    mesh = sharding_lib.create_mesh(jax.devices()[:1])
    model = state_lib.create_model(config.model)
    schedule = configuration.resolve_schedule(config, NUM_EXAMPLES)
    tx, learning_rate = state_lib.create_optimizer(
        config.optim, schedule.learning_rate, schedule.warmup_steps, schedule.total_steps
    )
    state, shardings = state_lib.create_train_state(
        config, model, tx, NUM_EXAMPLES, mesh, config.seed
    )
    return (model, tx, learning_rate, mesh, jax.device_get(state), shardings, _random_batch(config))

  return _memo("start", make)


def _one_step(loss_kind, bn_running_stats="images", z_from="both", method="pirl"):
  """One `jit_train_step` from the fixed state and batch. Returns (config, model, state before,
  batch, state after, metrics), host arrays. NPID steps from the same PIRL state (its jigsaw
  head is there and unused) on the batch without its tiles."""

  def make():
    config = _step_config(loss_kind, bn_running_stats, z_from)
    model, tx, schedule, mesh, before, shardings, batch = _start()
    train_step = step_lib.jit_train_step(
        mesh,
        shardings,
        model=model,
        tx=tx,
        schedule=schedule,
        loss_cfg=config.loss,
        bank_momentum=config.memory_bank.momentum,
        num_examples=NUM_EXAMPLES,
        score_chunk_size=config.memory_bank.score_chunk_size,
        running_stats_from_images=config.model.bn_running_stats == "images",
        method=method,
    )
    state = jax.device_put(before, shardings)  # a fresh copy: the step donates it
    if method == "npid":
      batch = {k: v for k, v in batch.items() if k != "tiles"}
    after, metrics = train_step(state, sharding_lib.global_batch(batch, mesh))
    return config, model, before, batch, jax.device_get(after), jax.device_get(metrics)

  return _memo((loss_kind, bn_running_stats, z_from, method), make)


def _reference_forward():
  """From the initial state, in train mode: f_hat and g_hat, and the running statistics after
  the image pass alone and after the tile pass then the image pass (`PIRLNet.__call__`)."""

  def make():
    model, _, _, _, before, _, batch = _start()
    variables = {"params": before.params, "batch_stats": before.batch_stats}

    @jax.jit
    def forward(variables, image, tiles):
      apply = functools.partial(model.apply, variables, train=True, mutable=["batch_stats"])
      f_hat, image_vars = apply(image, method="embed_images")
      g_hat, _ = apply(tiles, method="embed_tiles")
      _, both_vars = apply(image, tiles)
      return f_hat, g_hat, image_vars["batch_stats"], both_vars["batch_stats"]

    return jax.device_get(forward(variables, batch["image"], batch["tiles"]))

  return _memo("forward", make)


def _logsumexp(x):
  top = x.max(axis=1, keepdims=True)
  return (top + np.log(np.sum(np.exp(x - top), axis=1, keepdims=True)))[:, 0]


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "loss_kind,z_from,method",
    [
        ("infonce", "both", "pirl"),
        ("nce", "both", "pirl"),
        ("nce", "jigsaw", "pirl"),
        ("infonce", "both", "npid"),
        # NCE with NPID: NCE is pinned with PIRL above and NPID with InfoNCE; the slow set runs it.
        pytest.param("nce", "both", "npid", marks=pytest.mark.slow),
    ],
)
def test_step_matches_numpy_reference(loss_kind, z_from, method):
  config, _, before, batch, after, metrics = _one_step(loss_kind, z_from=z_from, method=method)
  loss_cfg, n, k = config.loss, NUM_EXAMPLES, config.loss.num_negatives
  index = batch["index"]

  # The negatives, drawn as the step draws them.
  next_rng, jigsaw_rng, image_rng = jax.random.split(before.rng, 3)
  negatives = {
      name: np.asarray(
          memory_bank.sample_negatives(rng, index, k, n, exclude_positive=loss_cfg.exclude_positive)
      )
      for name, rng in (("jigsaw", jigsaw_rng), ("image", image_rng))
  }
  assert all(np.all(neg != index[:, None]) for neg in negatives.values())

  f_hat, g_hat = (np.asarray(x, np.float64) for x in _reference_forward()[:2])
  old_bank = np.asarray(before.bank, np.float64)

  def scores(query, neg):  # against the old rows; column 0 the positive
    rows = old_bank[np.concatenate([index[:, None], neg], axis=1)]
    return np.einsum("bkd,bd->bk", rows, query) / loss_cfg.temperature

  logits = {
      "jigsaw": scores(g_hat, negatives["jigsaw"]),
      "image": scores(f_hat, negatives["image"]),
  }
  if method == "npid":  # no jigsaw view
    del logits["jigsaw"]
  if loss_kind == "infonce":
    term = {name: float(np.mean(_logsumexp(s) - s[:, 0])) for name, s in logits.items()}
  else:
    # Z = N * mean(exp(s)) over both terms' logits, or the jigsaw term's (estimated at the
    # first step); VISSL's eps in the denominators.
    z_logits = [logits["jigsaw"]] if z_from == "jigsaw" else list(logits.values())
    z = n * np.mean(np.exp(np.concatenate(z_logits)))
    np.testing.assert_allclose(metrics["nce_z"], z, rtol=1e-5)
    noise, eps = k / n, loss_cfg.nce_eps  # K * P_n
    term = {}
    for name, s in logits.items():
      x = np.exp(s) / z
      term[name] = float(
          -np.mean(
              np.log(x[:, 0] / (x[:, 0] + noise + eps))
              + np.sum(np.log(noise / (x[:, 1:] + noise + eps)), axis=1)
          )
      )
  if method == "npid":
    total = term["image"]
    assert "loss_jigsaw" not in metrics
  else:
    lam = loss_cfg.jigsaw_weight
    total = lam * term["jigsaw"] + (1 - lam) * term["image"]
    np.testing.assert_allclose(metrics["loss_jigsaw"], term["jigsaw"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_image"], term["image"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)

  # The bank: only the batch's rows, each normalise(m * old + (1 - m) * f_hat).
  m = config.memory_bank.momentum
  np.testing.assert_allclose(
      after.bank[index], _normalise(m * old_bank[index] + (1 - m) * f_hat), rtol=1e-5, atol=1e-6
  )
  others = np.setdiff1d(np.arange(n), index)
  np.testing.assert_array_equal(after.bank[others], before.bank[others])
  assert int(after.step) == 1
  np.testing.assert_array_equal(after.rng, next_rng)


def test_bn_running_stats_from_the_image_pass_only():
  _, _, _, _, images, images_metrics = _one_step("infonce", "images")
  _, _, _, _, both, both_metrics = _one_step("infonce", "tiles_and_images")
  _, _, image_pass, tiles_then_images = _reference_forward()
  assert set(images.batch_stats) == {"trunk"}

  def close(a, b):
    a, b = _flat(a), _flat(b)
    return set(a) == set(b) and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

  assert close(images.batch_stats, image_pass)  # 'images': the image pass's statistics ...
  assert not close(images.batch_stats, tiles_then_images)
  assert close(both.batch_stats, tiles_then_images)  # ... 'tiles_and_images': both passes
  assert not close(both.batch_stats, image_pass)

  # Training does not depend on the option: same loss, gradients, params and bank.
  for name in ("loss", "loss_jigsaw", "loss_image", "grad_norm"):
    np.testing.assert_allclose(images_metrics[name], both_metrics[name], rtol=1e-6)
  for field in ("params", "opt_state", "bank"):
    a, b = _flat(getattr(images, field)), _flat(getattr(both, field))
    for name in a:
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


def _stem_moments(kernel, x):
  """Per-channel mean and (biased) variance of the stem conv's outputs over a batch, float64."""
  y = jax.lax.conv_general_dilated(
      np.asarray(x, np.float32),
      np.asarray(kernel, np.float32),
      (2, 2),
      ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
  return y.mean(axis=0), y.var(axis=0)


@pytest.mark.parametrize("bn_running_stats", ["images", "tiles_and_images"])
def test_each_pass_keeps_its_own_running_statistics(bn_running_stats):
  """The tile pass's running statistics are an EMA of the tiles' batch moments alone, from the
  state's tile statistics; the image pass's of the images' (after the tiles' with the reference
  order). The state's two sets start apart, so a pass that used the other's would show."""
  config = _step_config("infonce", bn_running_stats)
  model, tx, schedule, mesh, start, shardings, batch = _start()
  shifted = lambda stats: jax.tree.map(lambda x: np.asarray(x) * 0.5 + 0.25, stats)
  before = start.replace(tile_batch_stats={"trunk": shifted(start.batch_stats["trunk"])})
  train_step = step_lib.jit_train_step(
      mesh,
      shardings,
      model=model,
      tx=tx,
      schedule=schedule,
      loss_cfg=config.loss,
      bank_momentum=config.memory_bank.momentum,
      num_examples=NUM_EXAMPLES,
      running_stats_from_images=bn_running_stats == "images",
  )
  after, _ = train_step(jax.device_put(before, shardings), sharding_lib.global_batch(batch, mesh))
  after = jax.device_get(after)

  m = model.trunk.bn_momentum
  kernel = before.params["trunk"]["conv_init"]["kernel"]
  tiles = batch["tiles"].reshape((-1,) + batch["tiles"].shape[2:])
  tile_mean, tile_var = _stem_moments(kernel, tiles)
  image_mean, image_var = _stem_moments(kernel, batch["image"])
  old_tiles = before.tile_batch_stats["trunk"]["bn_init"]
  old_images = before.batch_stats["trunk"]["bn_init"]
  new_tiles = after.tile_batch_stats["trunk"]["bn_init"]
  new_images = after.batch_stats["trunk"]["bn_init"]
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  close(new_tiles["mean"], m * old_tiles["mean"] + (1 - m) * tile_mean)
  close(new_tiles["var"], m * old_tiles["var"] + (1 - m) * tile_var)
  shared_mean, shared_var = old_images["mean"], old_images["var"]
  if bn_running_stats == "tiles_and_images":
    shared_mean = m * shared_mean + (1 - m) * tile_mean
    shared_var = m * shared_var + (1 - m) * tile_var
  close(new_images["mean"], m * shared_mean + (1 - m) * image_mean)
  close(new_images["var"], m * shared_var + (1 - m) * image_var)

  # Every layer: the tile statistics are those of the trunk applied to the tiles alone.
  _, tile_vars = model.trunk.apply(
      {"params": before.params["trunk"], "batch_stats": before.tile_batch_stats["trunk"]},
      tiles,
      train=True,
      mutable=["batch_stats"],
  )
  expected, got = _flat(tile_vars["batch_stats"]), _flat(after.tile_batch_stats["trunk"])
  assert set(expected) == set(got)
  for name in expected:
    close(got[name], expected[name], err_msg=name)


def test_a_workdir_written_before_tile_statistics_restores(tmp_path):
  """A checkpoint of a state without `tile_batch_stats` (as written before the state had them)
  restores into today's state, with the image pass's statistics as the tile statistics."""
  import flax  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class EarlierState:  # the fields of TrainState before tile_batch_stats, in their order
    step: object
    params: object
    batch_stats: object
    opt_state: object
    bank: object
    nce_z: object
    rng: object
    nonfinite_steps: object

  _, _, _, mesh, start, shardings, _ = _start()
  earlier = EarlierState(
      **{name: getattr(start, name) for name in EarlierState.__dataclass_fields__}
  )
  writer = checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False)
  writer.save(0, jax.device_put(earlier))
  writer.close()

  target = checkpointing.abstract_like(start, shardings)
  reader = checkpointing.Checkpointer(tmp_path / "checkpoints")
  with pytest.raises(checkpointing.CheckpointMismatchError, match="tile_batch_stats"):
    reader.restore(0, target)  # without a way to derive it, a missing field is a mismatch
  restored = reader.restore(
      0, target, derive=state_lib.fields_of_earlier_version(_step_config(), target)
  )
  reader.close()
  assert isinstance(restored, state_lib.TrainState)
  restored = jax.device_get(restored)
  for name in EarlierState.__dataclass_fields__:
    a, b = _flat(getattr(restored, name)), _flat(getattr(start, name))
    assert set(a) == set(b), name
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}.{key}")
  # No EMA and no key queue in this method: the placeholders.
  assert np.asarray(restored.ema_params).shape == () and not np.any(restored.key_queue)
  assert restored.key_queue.shape == start.key_queue.shape
  a, b = _flat(restored.tile_batch_stats["trunk"]), _flat(start.batch_stats["trunk"])
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
