"""main.py as a user types it, in a subprocess."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the user's environment: one CPU device
  env["PIRL_JAX_CACHE"] = str(tmp_path / "cache")
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pretrain_cli_tiny_preset(tmp_path, small_isic_root):
  workdir = tmp_path / "run"
  result = _run(["--config=configs/pirl.py:tiny", f"--workdir={workdir}",
                 "--config.data.source=isic", f"--config.data.path={small_isic_root}",
                 "--config.num_train_steps=4", "--config.loss.kind=nce"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Pretraining finished at step 4" in result.stdout
  assert f"--config.init.checkpoint={workdir}" in result.stdout
  assert (workdir / "checkpoints" / "4").is_dir()
  assert (workdir / "checkpoints" / "3").is_dir()
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["loss"]["kind"] == "nce" and saved["num_train_steps"] == 4
  assert list(workdir.glob("events.out.tfevents.*"))
  assert "ETA" in result.stderr  # the progress line


def test_cli_rejects_unknown_config_field(tmp_path):
  result = _run(["--config=configs/pirl.py:tiny", f"--workdir={tmp_path / 'run'}",
                 "--config.loss.num_negativs=10"], tmp_path, timeout=120)
  assert result.returncode != 0
  assert "num_negativs" in result.stderr


def test_cli_rejects_unknown_preset(tmp_path):
  result = _run(["--config=configs/pirl.py:imagenett"], tmp_path, timeout=120)
  assert result.returncode != 0
  assert "Unknown preset 'imagenett'" in result.stderr


def test_cli_rejects_too_many_negatives(tmp_path, small_isic_root):
  result = _run(["--config=configs/pirl.py:tiny", f"--workdir={tmp_path / 'run'}",
                 "--config.data.source=isic", f"--config.data.path={small_isic_root}",
                 "--config.loss.num_negatives=5000"], tmp_path, timeout=300)
  assert result.returncode != 0
  assert "config.loss.num_negatives=5000 must be < the dataset size N=120" in result.stderr
