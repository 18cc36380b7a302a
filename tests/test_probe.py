"""Frozen-trunk probes: kNN and logistic regression equal sklearn's, labels CSVs are checked, the
probes run during pretraining, and the probe command judges a checkpoint against a random trunk."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as sk_metrics
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from configs import pirl as pirl_configs
from pirl_jax.data import probe_data
from pirl_jax.eval import probes

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixed_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16))
  labels = rng.integers(0, 3, size=300)
  feats = centres[labels] + 1.5 * rng.normal(size=(300, 16))
  return feats[:200], labels[:200], feats[200:], labels[200:]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_probabilities_equal_sklearn_with_the_same_weighting(fixed_features, k):
  index, index_labels, query, _ = fixed_features
  tau = 0.07
  ours = probes.knn_probabilities(index, index_labels, query, 3, k=k, temperature=tau)
  reference = KNeighborsClassifier(
      n_neighbors=k,
      metric="cosine",
      algorithm="brute",
      weights=lambda distance: np.exp((1.0 - distance) / tau),
  ).fit(index, index_labels)
  np.testing.assert_allclose(ours, reference.predict_proba(query), atol=1e-9)


def test_linear_probe_equals_sklearn_logistic_regression(fixed_features):
  index, index_labels, query, _ = fixed_features
  ours = probes.linear_probe_probabilities(index, index_labels, query, 3, regularization=0.5)
  scaler = StandardScaler().fit(index)
  reference = LogisticRegression(C=0.5, max_iter=1000, class_weight="balanced").fit(
      scaler.transform(index), index_labels
  )
  np.testing.assert_allclose(ours, reference.predict_proba(scaler.transform(query)), atol=1e-6)


def test_linear_probe_gives_absent_classes_zero_probability(fixed_features):
  index, index_labels, query, _ = fixed_features
  keep = index_labels != 1
  probs = probes.linear_probe_probabilities(index[keep], index_labels[keep], query, 3)
  assert probs.shape == (len(query), 3)
  assert np.all(probs[:, 1] == 0)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_classification_metrics_are_sklearn_auc_and_accuracy(fixed_features):
  index, index_labels, query, query_labels = fixed_features
  probs = probes.knn_probabilities(index, index_labels, query, 3, k=10)
  names = ("a", "b", "c")
  got = probes.classification_metrics(query_labels, probs, names, mean_over=("a", "b"))
  for c, name in enumerate(names):
    assert got[f"auc_{name}"] == pytest.approx(
        sk_metrics.roc_auc_score(query_labels == c, probs[:, c])
    )
  assert got["auc_mean"] == pytest.approx((got["auc_a"] + got["auc_b"]) / 2)
  assert got["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == query_labels))
  binary = probes.classification_metrics(query_labels == 2, probs[:, [0, 2]] / 1.0, ("rest", "c"))
  assert binary["auc_mean"] == binary["auc_c"]


def test_features_that_separate_the_classes_score_higher_than_noise():
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1], 60)
  separated = np.eye(2)[labels] * 3 + rng.normal(size=(120, 2))
  noise = rng.normal(size=(120, 2))
  scores = {}
  for name, feats in (("separated", separated), ("noise", noise)):
    probs = probes.knn_probabilities(feats[::2], labels[::2], feats[1::2], 2, k=5)
    scores[name] = probes.classification_metrics(labels[1::2], probs, ("x", "y"))["auc_mean"]
  assert scores["separated"] > 0.9 > 0.7 > scores["noise"]


# --- Labels CSV ---------------------------------------------------------------------------------


def _stripes(vertical: bool, seed: int, size: int = 40) -> Image.Image:
  rng = np.random.default_rng(seed)
  phase = rng.integers(0, 8)
  line = ((np.arange(size) + phase) // 4 % 2 * 200 + 20).astype(np.uint8)
  image = np.tile(
      line[None, :] if vertical else line[:, None], (size, 1) if vertical else (1, size)
  )
  image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(np.stack([image] * 3, axis=-1))


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
  """12 images of vertical and 12 of horizontal stripes, in subfolders, with a labels CSV."""
  root = tmp_path_factory.mktemp("labelled_folder")
  rows = ["file,label"]
  for i in range(24):
    vertical = i % 2 == 0
    name = f"{'v' if vertical else 'h'}/img_{i:02d}.png"
    (root / name).parent.mkdir(exist_ok=True)
    _stripes(vertical, i).save(root / name)
    rows.append(f"{name},{'vertical' if vertical else 'horizontal'}")
  (root / "unlabelled.png").parent.mkdir(exist_ok=True)
  _stripes(True, 99).save(root / "unlabelled.png")
  csv_path = root.parent / "labels.csv"
  csv_path.write_text("\n".join(rows) + "\n")
  return root, csv_path


def test_labels_csv_rows_are_read_and_checked(labelled_folder):
  root, csv_path = labelled_folder
  rows = probe_data.read_labels_csv(csv_path, root)
  assert len(rows) == 24
  assert rows[0] == ("v/img_00.png", "vertical", None)


@pytest.mark.parametrize(
    "line,message",
    [
        ("v/missing.png,vertical", r"labels\.csv line 2: 'v/missing\.png' is not an image in"),
        ("v/img_00.png,", r"labels\.csv line 2: 'v/img_00\.png' has no label"),
        ("v/img_00.png,vertical,validation", r"line 2: split 'validation' is not one of"),
        ("v/img_00.png", r"line 2: expected 'file,label' or 'file,label,split'"),
    ],
)
def test_labels_csv_errors_name_the_file_and_line(labelled_folder, tmp_path, line, message):
  root, _ = labelled_folder
  bad = tmp_path / "labels.csv"
  bad.write_text(f"file,label\n{line}\nh/img_01.png,horizontal\n")
  with pytest.raises(probe_data.LabelsCsvError, match=message):
    probe_data.read_labels_csv(bad, root)


def test_labels_csv_with_one_class_only_is_an_error(labelled_folder, tmp_path):
  root, _ = labelled_folder
  bad = tmp_path / "one_class.csv"
  bad.write_text("v/img_00.png,vertical\nv/img_02.png,vertical\n")
  with pytest.raises(
      probe_data.LabelsCsvError,
      match=r"one_class\.csv: 2 labelled image\(s\) "
      r"with only the label 'vertical'; a probe needs at least two classes",
  ):
    probe_data.read_labels_csv(bad, root)


def test_labels_csv_written_by_a_spreadsheet_with_a_byte_order_mark_is_read(
    labelled_folder, tmp_path
):
  root, csv_path = labelled_folder
  with_bom = tmp_path / "labels_bom.csv"
  with_bom.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes().replace(b"\n", b"\r\n"))
  assert probe_data.read_labels_csv(with_bom, root) == probe_data.read_labels_csv(csv_path, root)


def test_class_subfolders_label_a_folder_without_a_csv(labelled_folder, tmp_path):
  root, _ = labelled_folder
  # The fixture's folder has a loose image at the top: not the layout; without it, it is.
  with pytest.raises(probe_data.LabelsCsvError, match="need labels: a labels CSV .* subfolder"):
    probe_data.load_folder(str(root), "", pirl_configs.get_config("tiny").data)
  folder = tmp_path / "classes"
  shutil.copytree(root / "v", folder / "vertical")
  shutil.copytree(root / "h", folder / "horizontal")
  assert probe_data.has_labels(str(folder), "") and not probe_data.has_labels(str(root), "")
  data_cfg = pirl_configs.get_config("tiny").data
  data_cfg.cache_dir = str(tmp_path / "cache")
  sets = probe_data.load_folder(str(folder), "", data_cfg, query_fraction=0.5, seed=0)
  assert sets.class_names == ("horizontal", "vertical")
  assert sorted(sets.index.names + sets.query.names) == sorted(
      f"{c}/{p.name}" for c in ("vertical", "horizontal") for p in (folder / c).iterdir()
  )
  for images in (sets.index, sets.query):
    expected = [sets.class_names.index(n.split("/")[0]) for n in images.names]
    assert images.label.tolist() == expected
  assert sorted(np.bincount(sets.query.label).tolist()) == [6, 6]
  assert "labelled by its class subfolders" in sets.description


def _probe_sets(index_labels, query_labels, class_names=("a", "b", "c")):
  def images(labels):
    return probe_data.LabelledImages(
        names=[f"{i}.png" for i in range(len(labels))],
        encoded=[b""] * len(labels),
        label=np.asarray(labels),
    )

  return probe_data.ProbeSets(
      index=images(index_labels),
      query=images(query_labels),
      class_names=class_names,
      scored=("a", "b"),
      description="test set",
  )


@pytest.mark.parametrize(
    "index,query,knn_k,message",
    [
        (
            [0, 1, 2] * 3,
            [0, 1, 2],
            20,
            r"config\.probe\.knn_k=20 is larger than the probe's index, 9 labelled images",
        ),
        ([0] * 30, [0, 1, 2], 5, r"The probe's index images hold only 'a' \(30 images"),
        ([0, 1, 2] * 10, [2, 2, 2], 5, r"The probe's query images hold only 'c'"),
        (
            [0, 1, 2] * 10,
            [0, 2, 2],
            5,
            r"queries \(3 images in the probe's data \(test set\)\) have "
            r"no examples of 'b': its ROC AUC is undefined",
        ),
    ],
)
def test_probes_that_would_be_clamped_or_nan_are_refused(index, query, knn_k, message):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top
  from pirl_jax.eval import probe  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict({"knn_k": knn_k})
  with pytest.raises(user_errors.UserError, match=message):
    probe.ProbeEvaluator(
        _probe_sets(index, query), trunk=None, image_size=8, mesh=None, probe_cfg=cfg
    )


def test_stratified_split_keeps_every_class_on_both_sides():
  labels = np.repeat([0, 1, 2], [10, 3, 2])
  index, query = probe_data.split_positions(labels, 0.5, seed=0)
  assert sorted(np.concatenate([index, query]).tolist()) == list(range(15))
  for c in range(3):
    assert (labels[index] == c).any() and (labels[query] == c).any()
  again = probe_data.split_positions(labels, 0.5, seed=0)
  np.testing.assert_array_equal(query, again[1])


# --- Probes during pretraining and the probe command ---------------------------------------------


def test_probes_run_during_pretraining_and_at_the_end(tiny_pretraining):
  history = tiny_pretraining.summary["evaluation_history"]
  assert [h["step"] for h in history] == [2, 4]
  for h in history:
    probe = h["probe"]
    for key in (
        "knn_auc_mean",
        "knn_accuracy",
        "linear_auc_mean",
        "linear_accuracy",
        "knn_auc_melanoma",
        "linear_auc_seborrheic_keratosis",
    ):
      assert 0.0 <= probe[key] <= 1.0
  assert tiny_pretraining.summary["evaluations"]["probe"] == history[-1]["probe"]
  written = json.loads((tiny_pretraining.workdir / "summary.json").read_text())
  assert written["evaluations"]["probe"]["knn_auc_mean"] == pytest.approx(
      history[-1]["probe"]["knn_auc_mean"]
  )


def _probe_command(args, tmp_path, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PIRL_JAX_CACHE"] = str(tmp_path / "cache")
  return subprocess.run(
      [sys.executable, "-m", "pirl_jax.commands.probe", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


@pytest.mark.slow
def test_probe_command_on_a_labelled_folder(tiny_pretraining, labelled_folder, tmp_path):
  root, csv_path = labelled_folder
  out = tmp_path / "out"
  result = _probe_command(
      [
          f"--checkpoint={tiny_pretraining.workdir}",
          f"--data={root}",
          f"--labels={csv_path}",
          f"--output_dir={out}",
          "--knn_k=5",
      ],
      tmp_path,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / "probe.json").read_text())
  rows = report["results"]
  assert set(rows) == {"checkpoint (step 4)", "random init (seed 0)"}
  for metrics in rows.values():
    assert 0.0 <= metrics["knn_auc_mean"] <= 1.0 and 0.0 <= metrics["linear_accuracy"] <= 1.0
  assert report["class_names"] == ["horizontal", "vertical"]
  table = (out / "probe.md").read_text()
  assert "| checkpoint (step 4) |" in table and "| random init (seed 0) |" in table
  assert "kNN AUC mean" in result.stdout
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_probe_command_reports_a_bad_labels_csv_in_one_line(
    tiny_pretraining, labelled_folder, tmp_path
):
  root, _ = labelled_folder
  bad = tmp_path / "labels.csv"
  bad.write_text("v/img_00.png,vertical\nnot_there.png,horizontal\n")
  result = _probe_command(
      [f"--checkpoint={tiny_pretraining.workdir}", f"--data={root}", f"--labels={bad}"], tmp_path
  )
  assert result.returncode == 2
  assert "line 2: 'not_there.png' is not an image in" in result.stderr
  assert "Traceback" not in result.stderr


def test_learning_curve_plot_and_table_from_a_workdir(tiny_pretraining, tmp_path):
  from pirl_jax.commands import curves  # pylint: disable=g-import-not-at-top

  points = curves.read_curve(tiny_pretraining.workdir)
  assert [p["step"] for p in points] == [2, 4]
  out = tmp_path / "curves.png"
  curves.plot({"tiny": points}, out, random=(0.5, 0.5))
  assert Image.open(out).size[0] > 0
  table = curves.markdown({"tiny": points})
  assert f"| tiny | 4 | {points[1]['knn_auc_mean']:.4f} |" in table
  with pytest.raises(Exception, match="summary.json does not exist"):
    curves.read_curve(tmp_path)
