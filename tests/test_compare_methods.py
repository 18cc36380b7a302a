"""The methods comparison (pirl_jax.commands.compare_methods): its table, plot, checks and a tiny run."""

import json

import numpy as np
import pytest

from configs import finetune_isic
from configs import pirl as pirl_configs
from pirl_jax import user_errors
from pirl_jax.commands import compare_methods


def _rows():
  return {
      "pirl": {
          0: dict(
              loss=5.0,
              seconds=100.0,
              knn=0.70,
              linear=0.68,
              finetune_mean=0.72,
              finetune_melanoma=0.70,
          ),
          1: dict(
              loss=5.2,
              seconds=110.0,
              knn=0.66,
              linear=0.70,
              finetune_mean=0.70,
              finetune_melanoma=0.66,
          ),
      },
      "jigsaw": {
          0: dict(
              loss=3.0,
              seconds=80.0,
              knn=0.60,
              linear=0.62,
              finetune_mean=0.69,
              finetune_melanoma=0.65,
          ),
          1: dict(
              loss=3.1,
              seconds=90.0,
              knn=0.64,
              linear=0.60,
              finetune_mean=0.66,
              finetune_melanoma=0.61,
          ),
      },
      "random": {0: dict(knn=0.55, linear=0.57), 1: dict(knn=0.53, linear=0.59)},
      "scratch": {
          0: dict(finetune_mean=0.65, finetune_melanoma=0.60),
          1: dict(finetune_mean=0.67, finetune_melanoma=0.64),
      },
  }


def test_table_has_means_stds_references_and_paired_differences():
  table = compare_methods.markdown_table(_rows(), "header")
  lines = table.splitlines()
  pirl = next(l for l in lines if l.startswith("| PIRL (jigsaw) |"))
  # kNN 0.70, 0.66: mean 0.680, sample std 0.028; time the mean of 100 and 110 s.
  assert "| invariant | 5.100 ± 0.141 | 0.680 ± 0.028 | 0.690 ± 0.014 |" in pirl
  assert "| 105 | 0,1 |" in pirl
  assert next(l for l in lines if l.startswith("| Jigsaw |")).split(" | ")[1] == "covariant"
  random_row = next(l for l in lines if l.startswith("| random trunk |"))
  assert "| reference | — | 0.540 ± 0.014 | 0.580 ± 0.014 | — | — | — |" in random_row
  # Jigsaw − PIRL kNN: -0.10, -0.02 -> mean -0.060, std 0.057, ahead on none.
  assert any(
      l.startswith(
          "- Jigsaw − PIRL (jigsaw), kNN mean AUC: -0.060 ± 0.057 over 2 seeds " "(ahead on 0)"
      )
      for l in lines
  )
  assert any(l.startswith("- scratch − PIRL (jigsaw), fine-tune mean AUC: -0.050") for l in lines)
  assert "- Jigsaw: seed 0: 0.600 / 0.620 / 0.690; seed 1: 0.640 / 0.600 / 0.660" in lines


def test_plot_is_written(tmp_path):
  compare_methods.plot(_rows(), tmp_path / "methods.png", "title")
  assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method_names=["pirl", "exemplar"]), "--methods=pirl,exemplar: choose from pirl, "),
        (dict(label_fraction=1.5), "--label_fraction=1.5"),
        (dict(seeds=[]), "--seeds is empty"),
    ],
)
def test_bad_arguments_are_named_before_anything_runs(tmp_path, kwargs, message):
  args = dict(
      pretrain_base=pirl_configs.get_config("tiny"),
      finetune_base=finetune_isic.get_config("tiny"),
      workdir=str(tmp_path / "m"),
      method_names=["pirl"],
      seeds=[0],
      label_fraction=0.1,
  )
  args.update(kwargs)
  with pytest.raises(user_errors.UserError, match=message.replace("(", r"\(")):
    compare_methods.run_comparison(**args)
  assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_tiny_comparison_runs_and_reuses_finished_runs(tmp_path):
  pretrain = pirl_configs.get_config("tiny")
  pretrain.num_train_steps = 2
  pretrain.jigsaw_permutations = 20
  finetune = finetune_isic.get_config("tiny")
  args = dict(
      pretrain_base=pretrain,
      finetune_base=finetune,
      workdir=str(tmp_path / "m"),
      method_names=["pirl", "rotation"],
      seeds=[0, 1],
      label_fraction=0.1,
  )
  rows, table = compare_methods.run_comparison(**args)
  assert set(rows) == {"pirl", "rotation", "random", "scratch"}
  assert set(rows["rotation"][1]) == {
      "loss",
      "seconds",
      "knn",
      "linear",
      "finetune_mean",
      "finetune_melanoma",
  }
  for name in ("methods.md", "methods.json", "methods.png"):
    assert (tmp_path / "m" / name).is_file()
  saved = json.loads((tmp_path / "m" / "methods.json").read_text())
  assert saved["rows"]["pirl"]["0"]["knn"] == rows["pirl"][0]["knn"]
  stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "m").glob("*/seed*/summary.json")}
  assert len(stamps) == 2 * 2 + 2 * 2 + 2  # pretraining, fine-tuning, scratch
  rows_again, table_again = compare_methods.run_comparison(**args)
  assert table_again == table
  assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing ran again
  assert np.isfinite(rows_again["scratch"][0]["finetune_mean"])


def test_a_run_stopped_by_sigterm_stops_the_comparison(tmp_path, monkeypatch):
  """SIGTERM checkpoints the running pretraining and returns; the comparison must not go on to
  the next method (the same command resumes it)."""
  from pirl_jax.commands import compare  # pylint: disable=g-import-not-at-top
  from pirl_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top

  calls = []

  def stopped(config, workdir):
    calls.append(config.method)
    return {"preempted": True, "step": 3, "total_steps": 6}

  monkeypatch.setattr(pretrain, "train_and_evaluate", stopped)
  with pytest.raises(
      compare.Preempted,
      match="Pretraining pirl, seed 0, stopped by SIGTERM at "
      "step 3 of 6.*run the same command again",
  ):
    compare_methods.run_comparison(
        pirl_configs.get_config("tiny"),
        finetune_isic.get_config("tiny"),
        str(tmp_path / "m"),
        ["pirl", "jigsaw"],
        [0, 1],
        0.1,
    )
  assert calls == ["pirl"]
