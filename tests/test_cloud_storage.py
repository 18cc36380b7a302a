"""Runs whose data, workdir and checkpoints are on Cloud Storage (`gs://`), against a local
emulator.

The emulator (tests/gcs_emulator.py) starts once per session; these tests are skipped, saying
why, when it cannot. The pretraining here has the config of the `tiny_pretraining` fixture
(conftest.py) but reads a copy of its images from the bucket, is stopped by SIGTERM after step 2
and resumed through the command line, so its results must equal that uninterrupted local run's
bit for bit.
"""

import json
import logging
import signal

import numpy as np
import pytest

from configs import finetune_isic
from configs import pirl as pirl_configs
from pirl_jax import checkpointing
from pirl_jax import preflight
from pirl_jax import storage
from pirl_jax import trunk_init
from pirl_jax.commands import curves
from pirl_jax.commands import export
from pirl_jax.data import isic
from pirl_jax.data import pipeline
from pirl_jax.data import sources
from pirl_jax.models import torch_weights
from pirl_jax.tasks import finetune
from pirl_jax.tasks import pretrain
from cli_in_process import main_in_process  # tests/cli_in_process.py
import tree_arrays  # tests/tree_arrays.py


def _pretraining_overrides(tiny_pretraining):
  """The `tiny_pretraining` fixture's overrides of the tiny preset, as config fields."""
  keys = (
      "data.source",
      "data.path",
      "data.cache_dir",
      "num_train_steps",
      "checkpoint_every_steps",
      "log_every_steps",
      "eval_every_steps",
  )
  config = tiny_pretraining.config
  return {k: config[k.split(".")[0]][k.split(".")[1]] if "." in k else config[k] for k in keys}


@pytest.fixture(scope="module")
def gs_pretraining(gcs, tiny_pretraining, capsys_module):
  """The tiny pretraining into gs://bucket/pretrain: stopped by SIGTERM after step 2 (in-process
  call), then resumed by `python main.py --workdir=gs://...` (in-process command line)."""
  workdir = f"gs://{gcs.bucket}/pretrain"
  data = f"gs://{gcs.bucket}/isic"
  local_data = tiny_pretraining.config.data.path
  _upload(local_data, data)
  overrides = dict(_pretraining_overrides(tiny_pretraining), **{"data.path": data})
  config = pirl_configs.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  original = pipeline.PretrainInput.iterate

  def iterate(self, start_step=0):
    for step, batch in enumerate(original(self, start_step), start=start_step + 1):
      if step == 2:
        signal.raise_signal(signal.SIGTERM)  # as a preemption would, during step 2
      yield batch

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipeline.PretrainInput, "iterate", iterate)
    stopped = pretrain.train_and_evaluate(config, workdir)
  with pytest.MonkeyPatch.context() as patch:
    status, out, err = main_in_process(
        [
            "--config=configs/pirl.py:tiny",
            f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()),
        ],
        capsys_module,
        patch,
    )
  return dict(
      workdir=workdir,
      data=data,
      local_data=local_data,
      stopped=stopped,
      status=status,
      out=out,
      err=err,
  )


@pytest.fixture(scope="module")
def capsys_module():
  """What `main_in_process` reads the output from, for a module-scoped run (no capture here:
  absl's log goes to the real stderr and the printed summary is checked from summary.json)."""

  class _Capture:

    def readouterr(self):
      return type("Captured", (), {"out": "", "err": ""})()

  return _Capture()


def test_pretraining_to_gs_resumes_as_if_uninterrupted(gs_pretraining, tiny_pretraining):
  stopped = gs_pretraining["stopped"]
  assert stopped["preempted"] and not stopped["complete"] and stopped["step"] == 2
  assert gs_pretraining["status"] in (0, None), gs_pretraining["err"][-3000:]
  workdir = storage.path(gs_pretraining["workdir"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["complete"] and summary["step"] == 4
  assert summary["workdir"] == gs_pretraining["workdir"]
  assert summary["checkpoint_dir"] == gs_pretraining["workdir"] + "/checkpoints"
  assert [e["step"] for e in summary["evaluation_history"]] == [4]  # steps 1-2 not redone
  assert summary["evaluations"] == tiny_pretraining.summary["evaluations"]
  assert summary["metrics"]["loss"] == tiny_pretraining.summary["metrics"]["loss"]
  # The final state equals the uninterrupted local run's, bit for bit.
  item, step = checkpointing.resolve_checkpoint(gs_pretraining["workdir"])
  local_item, local_step = checkpointing.resolve_checkpoint(tiny_pretraining.workdir)
  assert step == local_step == 4 and str(item).startswith("gs://")
  got = tree_arrays.flat(checkpointing.load_arrays(item))
  expected = tree_arrays.flat(checkpointing.load_arrays(local_item))
  assert got.keys() == expected.keys()
  for name, array in expected.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_gs_outputs_are_readable_back(gs_pretraining, tiny_pretraining):
  workdir = storage.path(gs_pretraining["workdir"])
  names = {p.name for p in workdir.iterdir()}
  assert {"config.json", "summary.json", "dataset.json", "checkpoints"} <= names, names
  assert any(n.startswith("events.out.tfevents") for n in names), names  # TensorBoard
  assert not any(n.startswith(".preflight") for n in names)  # the marker object was deleted
  local = tiny_pretraining.workdir
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["path"] == gs_pretraining["data"]
  assert config == json.loads(
      (local / "config.json")
      .read_text()
      .replace(gs_pretraining["local_data"], gs_pretraining["data"])
  )
  # The same images.
  got = json.loads((workdir / "dataset.json").read_text())
  expected = json.loads((local / "dataset.json").read_text())
  assert got.keys() == expected.keys()
  for key in expected:
    assert got[key] == expected[key], (key, str(got[key])[:300], str(expected[key])[:300])
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert steps == sorted(p.name for p in (local / "checkpoints").iterdir()) == ["2", "4"]
  # On object storage Orbax marks a finished step with a commit file (no rename there).
  assert all((workdir / "checkpoints" / s / "commit_success.txt").is_file() for s in steps)
  # Nothing was written to a local folder named after the URL.
  assert not storage.path("gs:").exists()


def test_tensorboard_events_and_learning_curves_from_gs(gs_pretraining, tmp_path):
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top

  workdir = storage.path(gs_pretraining["workdir"])
  steps = {}
  for event_file in sorted(p for p in workdir.iterdir() if p.name.startswith("events.out")):
    local = tmp_path / event_file.name
    local.write_bytes(event_file.read_bytes())
    for event in event_file_loader.EventFileLoader(str(local)).Load():
      for value in event.summary.value:
        steps.setdefault(value.tag, set()).add(event.step)
  # Probes at step 2 from the stopped run and at step 4 from the resumed one; the loss is logged
  # every 4 steps, so once, by the resumed run, over a window the stop at step 2 cut in two.
  assert steps["probe/knn_auc_mean"] == {2, 4}, steps
  assert steps["loss"] == {4}, steps
  curve = curves.read_curve(gs_pretraining["workdir"])
  assert [p["step"] for p in curve] == [4]
  out = f"{gs_pretraining['workdir']}/curves.png"
  curves.plot({"run": curve}, out)
  assert storage.path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fine_tuning_from_a_gs_checkpoint_into_gs(
    gcs, gs_pretraining, tiny_pretraining, shared_cache_dir
):
  """Data, initial checkpoint and workdir all in the bucket."""
  init = trunk_init.resolve_init(gs_pretraining["workdir"])
  assert init.kind == "pirl" and init.step == 4  # its config.json says pretraining
  config = finetune_isic.get_config("tiny")
  config.update_from_flattened_dict(
      {
          "data.source": "isic",
          "data.path": gs_pretraining["data"],
          "data.cache_dir": str(shared_cache_dir),
          "init.checkpoint": gs_pretraining["workdir"],
          "num_train_steps": 2,
          "eval_every_steps": 2,
      }
  )
  workdir = f"gs://{gcs.bucket}/finetune"
  summary = finetune.train_and_evaluate(config, workdir)
  assert summary["complete"] and summary["step"] == 2
  out = storage.path(workdir)
  metrics = json.loads((out / "metrics.json").read_text())
  for split in finetune.EVAL_SPLITS:
    assert metrics[split]["predictions_csv"] == f"{workdir}/predictions_{split}.csv"
    assert metrics[split]["ground_truth_csv"].startswith(gs_pretraining["data"] + "/")
    rows = (out / f"predictions_{split}.csv").read_text().splitlines()
    assert rows[0].startswith("image_id") and len(rows) == metrics[split]["num_images"] + 1
  assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert checkpointing.resolve_checkpoint(out / "best")[1] == 2
  # The trunk it started from is the pretrained one: the same as restored from the local run.
  local = trunk_init.resolve_init(str(tiny_pretraining.workdir))
  got = tree_arrays.flat(checkpointing.load_arrays(init.item_dir)["params"])
  expected = tree_arrays.flat(checkpointing.load_arrays(local.item_dir)["params"])
  for name, array in expected.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_preflight_on_object_storage(gcs, caplog, capsys, monkeypatch):
  # A bucket that does not exist: the error names the path ...
  with pytest.raises(
      preflight.PreflightError,
      match=r"The workdir gs://no-such-bucket/run is not a writable location",
  ):
    preflight.check_workdir_writable("gs://no-such-bucket/run")
  # ... and the command says so in one line, exit status 2, before reading any data.
  status, _, err = main_in_process(
      [
          "--config=configs/pirl.py:tiny",
          "--workdir=gs://no-such-bucket/run",
          "--config.data.source=folder",
          "--config.data.path=/nonexistent",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2, err[-3000:]
  assert "The workdir gs://no-such-bucket/run is not a writable location" in err
  preflight.check_workdir_writable(f"gs://{gcs.bucket}/preflight")
  assert not storage.path(f"gs://{gcs.bucket}/preflight").exists()  # the marker was deleted
  with caplog.at_level(logging.INFO):
    preflight.check_free_disk(f"gs://{gcs.bucket}/preflight/checkpoints", 1 << 40, 3)
  assert "skipped the free-disk check for gs://bucket/preflight/checkpoints" in caplog.text


def test_export_from_gs_to_gs_equals_the_local_export(
    gcs, gs_pretraining, tiny_pretraining, tmp_path
):
  out = f"gs://{gcs.bucket}/export/trunk.safetensors"
  written = export.export(gs_pretraining["workdir"], out)
  assert written["out"] == out and written["source"] == gs_pretraining["workdir"]
  export.export(str(tiny_pretraining.workdir), str(tmp_path / "trunk.safetensors"))
  got, expected = torch_weights.read(out), torch_weights.read(tmp_path / "trunk.safetensors")
  assert got.keys() == expected.keys()
  for name, array in expected.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)


def _upload(local_root, url):
  for path in storage.files_under(storage.path(local_root)):
    storage.path(f"{url}/{path.relative_to(local_root).as_posix()}").write_bytes(path.read_bytes())


def test_readers_and_weights_files_on_gs(gcs, tmp_path):
  """The ISIC reader (flat, nested and zip layouts), the folder source and weights files read
  from the bucket give what they give from a local copy."""
  import isic_fixtures  # pylint: disable=g-import-not-at-top

  for layout in ("flat", "nested", "zip"):
    local = isic_fixtures.write_tree(tmp_path / layout, layout)
    url = f"gs://{gcs.bucket}/readers/{layout}"
    _upload(local, url)
    for split in ("train", "test"):
      expected, got = isic.read_split(str(local), split), isic.read_split(url, split)
      assert got.image_ids == expected.image_ids, layout
      np.testing.assert_array_equal(got.label, expected.label)
      assert [load() for _, load in got.items()] == [load() for _, load in expected.items()]
  local_items = sources.folder_items(str(tmp_path / "flat"))
  gs_items = sources.folder_items(f"gs://{gcs.bucket}/readers/flat")
  assert [n.rsplit("/flat/", 1)[1] for n, _ in gs_items] == [
      n.rsplit("/flat/", 1)[1] for n, _ in local_items
  ]
  assert [load() for _, load in gs_items] == [load() for _, load in local_items]

  weights = {"conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)}
  url = f"gs://{gcs.bucket}/weights/trunk.safetensors"
  torch_weights.write(weights, url, {"source": "test"})
  np.testing.assert_array_equal(torch_weights.read(url)["conv1.weight"], weights["conv1.weight"])


def _finished_steps(workdir: str) -> list[int]:
  folder = storage.path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(
      int(p.name)
      for p in folder.iterdir()
      if p.name.isdigit() and (p / "commit_success.txt").is_file()
  )


@pytest.mark.slow
def test_sigkill_and_resume_from_gs_bitwise_identical(gcs, tmp_path, small_isic_root):
  """`main.py --workdir=gs://...` killed (SIGKILL) after a checkpoint resumes from it, past an
  unfinished step folder (no commit file, as a save cut short leaves), to the uninterrupted
  local run's final state."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import test_scale  # pylint: disable=g-import-not-at-top  (tests/test_scale.py: _Run, _env)

  total, every = 12, 3
  env = test_scale._env(tmp_path, compilation_cache=tmp_path / "jax_cache")  # one device

  def command(workdir):
    return test_scale._flags(
        small_isic_root,
        workdir,
        f"--config.num_train_steps={total}",
        f"--config.checkpoint_every_steps={every}",
        "--config.log_every_steps=1",
    )

  code, _, log = test_scale._Run(command(tmp_path / "straight"), env).finish()
  assert code == 0, log[-4000:]

  workdir = f"gs://{gcs.bucket}/killed"
  run = test_scale._Run(command(workdir), env)
  run.wait_until(
      lambda: run.logged_step() > 0
      and (steps := _finished_steps(workdir))
      and run.logged_step() > max(steps),
      what="a checkpoint and a step after it",
  )
  run.proc.send_signal(signal.SIGKILL)
  code, _, log = run.finish()
  assert code == -signal.SIGKILL
  resume_from = max(_finished_steps(workdir))
  assert resume_from < total
  fs = fsspec.filesystem("gcs")
  unfinished = f"{gcs.bucket}/killed/checkpoints/{resume_from + every}"
  if not fs.exists(unfinished):
    fs.copy(f"{gcs.bucket}/killed/checkpoints/{resume_from}", unfinished, recursive=True)
  for name in fs.find(unfinished):
    if name.endswith("/commit_success.txt"):
      fs.rm(name)

  code, stdout, log = test_scale._Run(command(workdir), env).finish()
  assert code == 0, log[-4000:]
  assert f"Resumed from {workdir}/checkpoints at step {resume_from} " in log
  assert f"Pretraining finished at step {total}" in stdout
  assert _finished_steps(workdir)[-1] == total
  straight = tree_arrays.flat(
      checkpointing.load_arrays(test_scale._item(tmp_path / "straight", total))
  )
  resumed = tree_arrays.flat(checkpointing.load_arrays(f"{workdir}/checkpoints/{total}/default"))
  assert straight.keys() == resumed.keys()
  for name, array in straight.items():
    np.testing.assert_array_equal(resumed[name], array, err_msg=name)
