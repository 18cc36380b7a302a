"""The invariance analysis (pirl_jax/commands/invariance.py): transforms, the score against a
NumPy loop, and the command on a tiny pretraining run."""

import json
import pathlib

import numpy as np
import pytest

import cli_in_process
from pirl_jax.commands import invariance

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ramp(size=64):
  return np.arange(size * size * 3, dtype=np.int64).reshape(size, size, 3)


def test_rotation_turns_counter_clockwise():
  image = np.zeros((4, 4, 3), np.uint8)
  image[0, 3] = 255  # top right
  np.testing.assert_array_equal(np.argwhere(invariance.rotate(image, 1)[..., 0]), [[0, 0]])
  np.testing.assert_array_equal(np.argwhere(invariance.rotate(image, 2)[..., 0]), [[3, 0]])
  np.testing.assert_array_equal(np.argwhere(invariance.rotate(image, 3)[..., 0]), [[3, 3]])


def test_centre_tiles_are_the_middle_of_each_cell():
  image = _ramp(75)  # cells of 25 px, tiles of 19: offset 3
  tiles = invariance.centre_tiles(image, 19)
  assert tiles.shape == (9, 19, 19, 3)
  np.testing.assert_array_equal(tiles[0], image[3:22, 3:22])
  np.testing.assert_array_equal(tiles[5], image[28:47, 53:72])  # row 1, column 2


def test_normalised_distances_equal_a_numpy_loop():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  unit = lambda x: x / np.linalg.norm(x)
  between = np.mean(
      [np.linalg.norm(unit(a[i]) - unit(a[j])) for i in range(7) for j in range(7) if i != j]
  )
  expected = [np.linalg.norm(unit(a[i]) - unit(b[i])) / between for i in range(7)]
  np.testing.assert_allclose(invariance.normalised_distances(a, b), expected, rtol=1e-8)
  np.testing.assert_allclose(invariance.normalised_distances(a, 3 * a), 0.0, atol=1e-7)
  np.testing.assert_allclose(invariance.distances(a, -a), 2.0)
  cross = [
      np.linalg.norm(unit(a[i]) - unit(b[i]))
      / np.mean(
          [np.linalg.norm(unit(a[k]) - unit(b[j])) for k in range(7) for j in range(7) if k != j]
      )
      for i in range(7)
  ]
  np.testing.assert_allclose(invariance.cross_normalised_distances(a, b), cross, rtol=1e-8)
  np.testing.assert_allclose(invariance.cross_normalised_distances(a, 2 * a), 0.0, atol=1e-6)
  summary = invariance.summarize(np.asarray(expected))
  assert sum(summary["histogram"]) == 7 and summary["mean"] == pytest.approx(np.mean(expected))


def test_command_scores_a_pretraining_run_and_a_random_model(
    tmp_path, tiny_pretraining, shared_cache_dir, capsys, monkeypatch
):
  out = tmp_path / "inv"
  code, stdout, err = cli_in_process.command_in_process(
      invariance.main,
      [
          "invariance.py",
          f"--checkpoint={tiny_pretraining.workdir}",
          f"--checkpoint={tiny_pretraining.workdir / 'checkpoints' / '2'}",
          f"--out={out}",
          "--num_images=24",
          f"--cache_dir={shared_cache_dir}",
      ],
      capsys,
      monkeypatch,
  )
  assert code == 0, err[-3000:]
  written = json.loads((out / "invariance.json").read_text())
  assert written["num_images"] == 24
  rows = written["results"]
  assert list(rows) == [
      f"{tiny_pretraining.workdir} (step 4)",
      f"{tiny_pretraining.workdir / 'checkpoints' / '2'} (step 2)",
      "random init",
  ]
  for scores in rows.values():
    assert set(scores) == {"trunk/tiles", "trunk/rotation", "embedding/jigsaw"}
    for summary in scores.values():
      assert sum(summary["histogram"]) == 24 and 0 <= summary["mean"] <= 2
  # Two checkpoints of one run at different steps give different scores on the same inputs.
  first, second, _ = rows.values()
  assert first["trunk/tiles"]["mean"] != second["trunk/tiles"]["mean"]
  assert "| random init |" in (out / "invariance.md").read_text()
  assert (out / "invariance.png").stat().st_size > 0
  assert "| random init |" in stdout


def test_legends_name_runs_by_their_folder():
  from pirl_jax.commands import invariance as command  # pylint: disable=g-import-not-at-top

  assert command.short_name("/work/runs/pirl-s0 (step 620)") == "pirl-s0 (step 620)"
  assert command.short_name("runs/pirl/checkpoints/620") == "pirl"
  assert command.short_name("gs://bucket/runs/jigsaw-s1/ (step 4)") == "jigsaw-s1 (step 4)"
  assert command.short_name("random init") == "random init"
