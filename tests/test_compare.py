"""Scratch vs PIRL comparison (pirl_jax/commands/compare.py): the table, the paired statistics,
resuming an interrupted comparison, and a weights file as the supervised arm."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from scipy import stats

from configs import finetune_isic
from pirl_jax import checkpointing
from pirl_jax.commands import compare
from pirl_jax.commands import export
from pirl_jax.models import resnet
from pirl_jax.models import torch_weights
from pirl_jax.tasks import finetune


def _run(seed, mel, sk=0.5):
  return dict(
      seed=seed, test=dict(auc_melanoma=mel, auc_seborrheic_keratosis=sk, auc_mean=(mel + sk) / 2)
  )


def test_compare_table():
  table = compare.markdown_table(
      {"scratch": [_run(0, 0.5), _run(1, 0.7)], "pirl": [_run(0, 0.8), _run(1, 0.8)]},
      0.1,
      "finetune",
  )
  assert "| scratch | 0.600 ± 0.141 | 0.500 ± 0.000 | 0.550 ± 0.071 | 0,1 |" in table
  assert "| PIRL (self-supervised) | 0.800 ± 0.000 |" in table
  assert "label_fraction=0.1" in table
  assert "Paired differences (same seeds" in table  # the paired comparison follows it


_LINE = re.compile(
    r"- PIRL \(self-supervised\) − scratch, (?P<title>[^:]+): "
    r"(?P<mean>[+-]\d+\.\d+) ± (?P<std>\d+\.\d+) over (?P<n>\d+) seeds "
    r"\(ahead on (?P<ahead>\d+)\), paired t = (?P<t>-?\d+\.\d+), "
    r"p = (?P<p>[-+.\de]+)$"
)


def test_paired_comparison_equals_scipy_ttest_rel():
  scratch = {0: (0.60, 0.50), 1: (0.65, 0.70), 2: (0.55, 0.60), 3: (0.70, 0.58)}
  pirl = {
      0: (0.70, 0.52),
      1: (0.66, 0.75),
      2: (0.62, 0.59),
      3: (0.71, 0.66),
      4: (0.99, 0.99),
  }  # seed 4 has no scratch run: not paired, not counted
  results = {
      "scratch": [_run(s, *v) for s, v in scratch.items()],
      "pirl": [_run(s, *v) for s, v in pirl.items()],
  }
  lines = [line for line in compare.paired_comparison(results) if line.startswith("- ")]
  assert len(lines) == len(compare.METRICS)
  for line, (key, title) in zip(lines, compare.METRICS):
    match = _LINE.match(line)
    assert match, line
    ours = [r["test"][key] for r in results["pirl"][:4]]
    base = [r["test"][key] for r in results["scratch"]]
    diff = np.subtract(ours, base)
    t, p = stats.ttest_rel(ours, base)
    assert match["title"] == title and int(match["n"]) == 4
    assert int(match["ahead"]) == int(np.sum(diff > 0))
    assert float(match["mean"]) == pytest.approx(np.mean(diff), abs=5e-4)
    assert float(match["std"]) == pytest.approx(np.std(diff, ddof=1), abs=5e-4)
    assert float(match["t"]) == pytest.approx(t, abs=5e-3)
    assert float(match["p"]) == pytest.approx(p, rel=1e-2)
  # With fewer than two shared seeds there is nothing to test.
  one = {"scratch": results["scratch"][:1], "pirl": results["pirl"][:1]}
  assert not [line for line in compare.paired_comparison(one) if line.startswith("- ")]
  assert compare.paired_comparison({"pirl": results["pirl"]}) == []


def _pretraining_workdir(path, trunk, width):
  """A stand-in PIRL workdir: config.json and one small checkpoint (the arms are faked below, so
  nothing is restored from it)."""
  path.mkdir(parents=True)
  (path / "config.json").write_text(
      json.dumps({"mode": "pretrain", "model": {"trunk": trunk, "width_multiplier": width}})
  )
  saver = checkpointing.Checkpointer(path / "checkpoints", keep=1, async_save=False)
  saver.save(2, {"params": {"trunk": {"kernel": np.zeros((3,), np.float32)}}})
  saver.close()
  return path


def test_run_comparison_resumes_an_interrupted_arm_and_reuses_finished_ones(tmp_path, monkeypatch):
  pirl = _pretraining_workdir(tmp_path / "pirl_run", "resnet18", 0.5)
  root = tmp_path / "compare"
  finished = root / "scratch" / "seed0"
  finished.mkdir(parents=True)
  (finished / "metrics.json").write_text(
      json.dumps(dict(test=_run(0, 0.5)["test"], validation=_run(0, 0.4)["test"]))
  )
  interrupted = root / "pirl" / "seed1"  # stopped mid-run: checkpoints, no metrics.json
  (interrupted / "checkpoints" / "2").mkdir(parents=True)
  (interrupted / "checkpoints" / "2" / "state").write_text("the state at step 2")

  calls = []

  def fake_train_and_evaluate(config, workdir):
    calls.append(
        dict(
            arm=config.init.kind,
            seed=config.seed,
            workdir=workdir,
            checkpoint=config.init.checkpoint,
            label_fraction=config.label_fraction,
            trunk=(config.model.trunk, config.model.width_multiplier),
            kept=(interrupted / "checkpoints" / "2" / "state").is_file(),
        )
    )
    mel = 0.6 + 0.1 * config.seed + (0.05 if config.init.kind == "pirl" else 0.0)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / "metrics.json").write_text(
        json.dumps(
            dict(test=_run(config.seed, mel)["test"], validation=_run(config.seed, mel)["test"])
        )
    )
    return {}

  monkeypatch.setattr(finetune, "train_and_evaluate", fake_train_and_evaluate)
  base = finetune_isic.get_config("tiny")
  results, table = compare.run_comparison(base, str(root), str(pirl), None, [0, 1], 0.1)
  ran = {(c["arm"], c["seed"]): c for c in calls}
  assert sorted(ran) == [("pirl", 0), ("pirl", 1), ("scratch", 1)]  # scratch/seed0 reused
  assert ran[("pirl", 1)]["workdir"] == str(interrupted) and ran[("pirl", 1)]["kept"]
  assert ran[("pirl", 0)]["checkpoint"] == str(pirl)
  assert ran[("scratch", 1)]["checkpoint"] == ""
  # Every arm: the PIRL run's trunk (its config.json, not the recipe's), the same label fraction.
  assert {c["trunk"] for c in calls} == {("resnet18", 0.5)}
  assert {c["label_fraction"] for c in calls} == {0.1}
  assert [r["seed"] for r in results["scratch"]] == [0, 1]
  assert results["scratch"][0]["test"]["auc_melanoma"] == 0.5  # read from the finished run
  written = (root / "compare.md").read_text()
  assert written == table + "\n" and "paired t = " in written
  assert json.loads((root / "compare.json").read_text())["seeds"] == [0, 1]


@pytest.mark.slow
def test_a_weights_file_is_the_supervised_arm(
    tmp_path, tiny_pretraining, small_isic_root, shared_cache_dir
):
  """The PIRL run's trunk exported to .safetensors as the supervised arm: that arm is the PIRL
  arm run again, so its results are the PIRL arm's."""
  weights = tmp_path / "trunk.safetensors"
  export.export(str(tiny_pretraining.workdir), str(weights))
  base = finetune_isic.get_config("tiny")
  base.update_from_flattened_dict(
      {
          "data.source": "isic",
          "data.path": str(small_isic_root),
          "data.cache_dir": str(shared_cache_dir),
          "num_train_steps": 2,
          "eval_every_steps": 2,
      }
  )
  results, table = compare.run_comparison(
      base, str(tmp_path / "compare"), str(tiny_pretraining.workdir), str(weights), [0], 0.5
  )

  def scores(arm):
    return [{k: v for k, v in r["test"].items() if not k.endswith("_csv")} for r in results[arm]]

  assert scores("supervised") == scores("pirl")
  assert "| supervised checkpoint |" in table
  metrics = json.loads((tmp_path / "compare" / "supervised" / "seed0" / "metrics.json").read_text())
  assert metrics["init"]["kind"] == "weights"


def test_a_supervised_file_of_another_architecture_fails_before_any_arm_runs(
    tmp_path, tiny_pretraining, monkeypatch
):
  trunk = resnet.get_trunk("resnet_tiny_bottleneck")
  variables = jax.device_get(
      trunk.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  )
  weights = tmp_path / "bottleneck.safetensors"
  torch_weights.write(torch_weights.to_state_dict(variables), weights)
  monkeypatch.setattr(finetune, "train_and_evaluate", lambda *a: pytest.fail("an arm ran"))
  with pytest.raises(torch_weights.WeightsError, match="layer1.0.conv3.weight"):
    compare.run_comparison(
        finetune_isic.get_config("tiny"),
        str(tmp_path / "compare"),
        str(tiny_pretraining.workdir),
        str(weights),
        [0],
        0.1,
    )
