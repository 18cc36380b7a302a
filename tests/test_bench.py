"""Smoke tests of the benchmark suite (`python -m benchmarks`), at --quick sizes.

Checks the JSON-lines schema, that measured values are positive and finite, that --results appends,
and that the PyTorch side is skipped cleanly when torch is missing. No timing thresholds.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import __main__ as cli
from benchmarks import common
from benchmarks import train_step
from pirl_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]

REQUIRED = (
    "benchmark",
    "name",
    "value",
    "unit",
    "status",
    "settings",
    "jax",
    "jaxlib",
    "flax",
    "torch",
    "platform",
    "device_count",
    "timestamp",
)
SENTINEL = {"sentinel": "written before the run"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """`all --quick` in-process (the tests' 8 fake devices; the step on one), torch hidden."""
  root = tmp_path_factory.mktemp("bench_data") / "set"
  synthetic.generate(root, seed=0, num_train=48, num_val=3, num_test=3)
  results = tmp_path_factory.mktemp("bench") / "results.jsonl"
  results.write_text(json.dumps(SENTINEL) + "\n")
  argv = [
      "all",
      "--quick",
      "--devices=1",
      "--reps=2",
      f"--results={results}",
      f"--data_path={root}",
      "--pipeline_images=0",
      "--compile_cache",
  ]
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    mp.setattr(train_step, "_MEASURED", {})
    opts = cli.parse_args(argv)
    records = cli.run(opts, common.Emitter(str(results)))
  return records, results


@pytest.mark.slow
def test_every_benchmark_reports(quick_run):
  records, _ = quick_run
  assert {r["benchmark"] for r in records} == {
      "step",
      "mfu",
      "overhead",
      "pipeline",
      "bank",
      "compile",
  }
  names = {(r["benchmark"], r["name"]) for r in records}
  for expected in [
      ("step", "jax_images_per_s"),
      ("mfu", "mfu"),
      ("mfu", "peak_matmul_xla"),
      ("mfu", "peak_matmul_numpy"),
      ("overhead", "step_over_trunk"),
      ("pipeline", "tfdata_examples_per_s"),
      ("pipeline", "pil_examples_per_s"),
      ("pipeline", "step_consumes_images_per_s"),
      ("bank", "bank_bytes_per_device"),
      ("bank", "sharded_step_s"),
      ("bank", "sharded_largest_collective_bytes"),
      ("bank", "sharded_collective_bytes_per_step"),
      ("bank", "sharded_gathered_peak_bytes_per_term"),
      ("compile", "compile_s"),
      ("compile", "first_call_s"),
  ]:
    assert expected in names


@pytest.mark.slow
def test_schema_and_values(quick_run):
  records, _ = quick_run
  for r in records:
    for key in REQUIRED:
      assert key in r, (key, r)
    json.dumps(r)
    assert isinstance(r["settings"], dict)
    if r["status"].startswith("ok"):
      assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r
      for v in r.get("values", []):
        assert math.isfinite(v) and v > 0, r
    else:
      assert r["value"] is None, r
      assert r["status"].startswith(("skipped", "unavailable")), r


@pytest.mark.slow
def test_bank_bytes_per_device(quick_run):
  records, _ = quick_run
  (r,) = [r for r in records if r["name"] == "bank_bytes_per_device"]
  assert len(r["per_device"]) == r["settings"]["devices"] == 8
  assert sum(r["per_device"].values()) == r["total_bytes"] == r["settings"]["padded_rows"] * 128 * 4
  (largest,) = [r for r in records if r["name"] == "sharded_largest_collective_bytes"]
  assert largest["value"] < max(r["per_device"].values())  # no collective moves a bank shard


@pytest.mark.slow
def test_results_file_appends(quick_run):
  records, results = quick_run
  lines = results.read_text().splitlines()
  assert json.loads(lines[0]) == SENTINEL
  assert [json.loads(l) for l in lines[1:]] == json.loads(json.dumps(records))


@pytest.mark.slow
def test_torch_skipped_when_missing(quick_run):
  records, _ = quick_run
  torch_lines = [r for r in records if r["benchmark"] == "step" and "torch" in r["name"]]
  assert len(torch_lines) == 4  # images/s and ratio, for each of the two layouts
  (peak,) = [r for r in records if r["name"] == "peak_matmul_torch"]
  for r in torch_lines + [peak]:
    assert r["value"] is None and r["status"] == common.TORCH_MISSING


def test_torch_args_match_the_presets():
  args, status = train_step.torch_args(train_step.get_config("default"), 2000)
  assert status == "ok"
  flags = dict(zip(args[::2], args[1::2]))
  assert flags == {
      "--arch": "resnet18",
      "--width": "16",
      "--batch": "64",
      "--image": "64",
      "--tile": "19",
      "--bank": "2000",
      "--negatives": "1000",
  }
  args, _ = train_step.torch_args(train_step.get_config("resnet50"), 2000)
  flags = dict(zip(args[::2], args[1::2]))
  assert (
      flags["--arch"],
      flags["--width"],
      flags["--batch"],
      flags["--image"],
      flags["--tile"],
  ) == ("resnet50", "64", "8", "224", "64")
  args, status = train_step.torch_args(train_step.get_config("tiny"), 256)
  assert args is None and status.startswith("skipped")


def test_cli_help():
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks", "--help"],
      capture_output=True,
      text=True,
      check=True,
      cwd=REPO,
  )
  assert "--results" in out.stdout and "--quick" in out.stdout


def test_torch_reference_is_in_the_repo():
  script = pathlib.Path(train_step.default_torch_script())
  assert script == REPO / "benchmarks" / "torch_reference.py" and script.is_file()


def test_package_does_not_import_benchmarks():
  for path in (REPO / "pirl_jax").rglob("*.py"):
    for line in path.read_text(encoding="utf-8").splitlines():
      words = line.split()
      if words[:1] in (["import"], ["from"]) and len(words) > 1:
        assert words[1].split(".")[0] != "benchmarks", (path, line)


def test_imagenet_setting_is_the_presets_step_at_batch_256():
  config = train_step.get_config("imagenet")
  assert config.model.trunk == "resnet50" and config.data.views.image_size == 224
  assert config.loss.kind == "nce" and config.loss.num_negatives == 32000
  assert config.global_batch_size == 256
  assert train_step.SETTINGS["imagenet"]["num_examples"] == 1_281_167
