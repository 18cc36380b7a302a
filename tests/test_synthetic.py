"""Tests of the embedded synthetic dermoscopy set (pirl_jax.data.synthetic, synthetic_render)."""

import concurrent.futures
import csv
import io
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

import cli_in_process
from pirl_jax.commands import synthetic as synthetic_command
from pirl_jax.data import isic
from pirl_jax.data import paths
from pirl_jax.data import synthetic
from pirl_jax.data import synthetic_render as render

SMALL = dict(num_train=24, num_val=9, num_test=15, num_unlabeled=6)
# Large enough for stable AUCs (60 melanomas in test), small enough to render in ~20-30 s CPU.
MEDIUM = dict(seed=0, num_train=640, num_val=20, num_test=320)
# 48 px rather than 64 keeps the CNN test near half a minute on 2 CPU cores; the margins
# measured at 64 px (docs/synthetic_numbers.md) are similar.
SIZE = 48
IMAGE_NAME = re.compile(r"ISIC_\d{7}\.jpg")


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _labels(root: pathlib.Path, split: str) -> tuple[list[str], np.ndarray]:
  """Image ids and labels (0 melanoma, 1 SK, 2 nevus) from a ground-truth CSV."""
  _, rows = _read_csv(root / isic.SPLITS[split][1])
  labels = [0 if mel == "1.0" else 1 if sk == "1.0" else 2 for _, mel, sk in rows]
  return [r[0] for r in rows], np.array(labels)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic") / "small"
  return synthetic.generate(root, seed=3, **SMALL)


@pytest.fixture(scope="module")
def medium_arrays(tmp_path_factory):
  """Train/test images of a medium set resized to SIZE x SIZE (uint8) and their labels."""
  root = synthetic.generate(tmp_path_factory.mktemp("synthetic") / "medium", **MEDIUM)
  out = {}
  for split in ("train", "test"):
    ids, labels = _labels(root, split)
    folder = root / isic.SPLITS[split][0]
    images = np.stack(
        [
            np.asarray(
                Image.open(folder / f"{i}.jpg")
                .convert("RGB")
                .resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            )
            for i in ids
        ]
    )
    out[split] = (images, labels)
  return out


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(small_set, tmp_path):
  # One worker here (the fixture used the default pool): the output must not depend on it.
  again = synthetic.generate(tmp_path / "again", seed=3, workers=1, **SMALL)
  first, second = _files(small_set), _files(again)
  assert sorted(first) == sorted(second)
  assert all(first[name] == second[name] for name in first)
  assert sum(name.endswith(".jpg") for name in first) == sum(SMALL.values())


def test_different_seed_gives_different_images(small_set, tmp_path):
  other = synthetic.generate(tmp_path / "other", seed=4, **SMALL)
  first, second = _files(small_set), _files(other)
  assert sorted(first) == sorted(second)  # same names: ids do not depend on the seed
  jpgs = [name for name in first if name.endswith(".jpg")]
  assert all(first[name] != second[name] for name in jpgs)
  # The label order is shuffled by the seed too.
  assert _labels(small_set, "train")[1].tolist() != _labels(other, "train")[1].tolist()


def test_render_jpeg_depends_only_on_its_arguments():
  a = render.render_jpeg(5, "test", 7, render.MELANOMA)
  render.render_jpeg(5, "test", 8, render.NEVUS)  # no hidden state between calls
  assert render.render_jpeg(5, "test", 7, render.MELANOMA) == a
  assert render.render_jpeg(5, "train", 7, render.MELANOMA) != a


# ---------------------------------------------------------------------------------------------
# Layout, names and CSV format
# ---------------------------------------------------------------------------------------------


def test_layout_matches_isic_2017(small_set):
  entries = sorted(p.name for p in small_set.iterdir())
  # The names the reader looks for: folders and ground-truth CSVs of isic.SPLITS.
  assert entries == sorted(
      [name for names in isic.SPLITS.values() for name in names]
      + [synthetic.UNLABELED_DIR, synthetic.COMPLETE_MARKER]
  )
  counts = {"train": SMALL["num_train"], "validation": SMALL["num_val"], "test": SMALL["num_test"]}
  all_ids = []
  for split, (folder_name, _) in isic.SPLITS.items():
    folder = small_set / folder_name
    names = sorted(p.name for p in folder.iterdir())
    images = [n for n in names if n.endswith(".jpg")]
    assert names == sorted(images + [f"{folder_name}_metadata.csv"])  # flat, nothing else
    assert all(IMAGE_NAME.fullmatch(n) for n in images)
    assert len(images) == counts[split]
    all_ids += [n[:-4] for n in images]

    ids, labels = _labels(small_set, split)
    assert ids == sorted(n[:-4] for n in images)  # one row per image, sorted like the real CSVs
    assert np.bincount(labels, minlength=3).tolist() == list(synthetic.class_counts(len(ids)))

    header, rows = _read_csv(folder / f"{folder_name}_metadata.csv")
    assert header == ["image_id", "age_approximate", "sex"]
    assert [r[0] for r in rows] == ids
    assert all(r[1] == "unknown" or (r[1].isdigit() and int(r[1]) % 5 == 0) for r in rows)
    assert {r[2] for r in rows} <= {"male", "female", "unknown"}

  unlabeled = sorted(p.name for p in (small_set / synthetic.UNLABELED_DIR).iterdir())
  assert len(unlabeled) == SMALL["num_unlabeled"]
  assert all(IMAGE_NAME.fullmatch(n) for n in unlabeled)  # images only, no CSV
  all_ids += [n[:-4] for n in unlabeled]
  assert len(set(all_ids)) == len(all_ids)  # unique across splits

  marker = json.loads((small_set / synthetic.COMPLETE_MARKER).read_text())
  assert marker["generator_version"] == render.GENERATOR_VERSION
  assert marker["seed"] == 3 and marker["num_unlabeled"] == SMALL["num_unlabeled"]


def test_ground_truth_csv_format(small_set):
  for split, (_, name) in isic.SPLITS.items():
    text = (small_set / name).read_text()
    assert text.endswith("\n") and "\r" not in text
    header, rows = _read_csv(small_set / name)
    assert header == ["image_id", "melanoma", "seborrheic_keratosis"], split
    for image_id, mel, sk in rows:
      assert re.fullmatch(r"ISIC_\d{7}", image_id)
      assert mel in ("0.0", "1.0") and sk in ("0.0", "1.0")
      assert not (mel == sk == "1.0")


def test_class_counts_follow_isic_2017_training_priors():
  assert synthetic.class_counts(2000) == (374, 254, 1372)
  assert synthetic.class_counts(600) == (112, 76, 412)  # 600 * 374/2000 = 112.2, * 254/2000 = 76.2
  assert synthetic.class_counts(150) == (28, 19, 103)
  assert synthetic.class_counts(0) == (0, 0, 0)
  for n in (1, 7, 33, 999):
    assert sum(synthetic.class_counts(n)) == n
  labels = synthetic.split_labels(0, "train", 2000)
  assert np.bincount(labels).tolist() == [374, 254, 1372]
  assert labels[:374].tolist() != [0] * 374  # shuffled, not sorted by class


def test_images_vary_in_size_aspect_and_are_valid_jpegs(small_set):
  sizes = []
  for path in small_set.rglob("*.jpg"):
    with Image.open(path) as im:
      assert im.format == "JPEG" and im.mode == "RGB"
      sizes.append(im.size)
  w, h = np.array(sizes).T
  assert w.min() >= 160 and h.min() >= 160 and w.max() <= 400 and h.max() <= 400
  assert np.all((h / w >= 3 / 4 - 0.01) & (h / w <= 4 / 3 + 0.01))
  assert len(set(sizes)) > len(sizes) // 2
  assert (h != w).mean() > 0.5


# ---------------------------------------------------------------------------------------------
# Atomicity, caching, CLI
# ---------------------------------------------------------------------------------------------


def test_interrupted_generate_leaves_no_complete_looking_output(tmp_path, monkeypatch):
  calls = []
  real = synthetic._render_to_file

  def flaky(job):
    calls.append(job)
    if len(calls) == 5:
      raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
    real(job)

  monkeypatch.setattr(synthetic, "_render_to_file", flaky)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate(tmp_path / "out", num_train=8, num_val=3, num_test=3, workers=1)
  assert not (tmp_path / "out").exists()
  assert list(tmp_path.iterdir()) == []  # the temporary folder is cleaned up too


def test_generate_refuses_a_non_empty_folder_but_accepts_an_empty_one(tmp_path):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    synthetic.generate(tmp_path / "full", num_train=3, num_val=1, num_test=1)
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
  (tmp_path / "empty").mkdir()
  root = synthetic.generate(tmp_path / "empty", num_train=3, num_val=1, num_test=1)
  assert synthetic.is_complete(root)


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, monkeypatch):
  counts = dict(seed=1, num_train=6, num_val=2, num_test=3, num_unlabeled=2)
  monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "cache"))
  root = synthetic.ensure_synthetic(**counts)
  assert root == tmp_path / "cache" / synthetic.CACHE_SUBDIR / synthetic.cache_name(**counts)
  assert f"v{render.GENERATOR_VERSION}" in root.name and "seed1" in root.name
  assert synthetic.is_complete(root)
  before = _files(root)

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a complete cached set")

  monkeypatch.setattr(synthetic, "generate", fail)
  assert synthetic.ensure_synthetic(**counts) == root
  assert _files(root) == before
  # Another seed is another folder (and would need generating).
  with pytest.raises(AssertionError, match="regenerated"):
    synthetic.ensure_synthetic(**{**counts, "seed": 2})


def test_ensure_synthetic_explicit_cache_dir_and_incomplete_folder(tmp_path):
  counts = dict(num_train=4, num_val=1, num_test=2)
  stale = tmp_path / synthetic.cache_name(**counts)
  stale.mkdir()
  (stale / "ISIC_0000000.jpg").write_bytes(b"half-written")
  with pytest.raises(FileExistsError, match=synthetic.COMPLETE_MARKER):
    synthetic.ensure_synthetic(tmp_path, **counts)
  (stale / "ISIC_0000000.jpg").unlink()
  assert synthetic.ensure_synthetic(tmp_path, **counts) == stale
  assert synthetic.is_complete(stale)


def test_concurrent_ensure_synthetic_calls_agree(tmp_path):
  counts = dict(seed=5, num_train=6, num_val=2, num_test=3)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    roots = list(
        pool.map(lambda _: synthetic.ensure_synthetic(tmp_path, workers=1, **counts), range(3))
    )
  assert roots == [tmp_path / synthetic.cache_name(**counts)] * 3
  assert synthetic.is_complete(roots[0])
  assert [p.name for p in tmp_path.iterdir()] == [roots[0].name]  # no temporary folders left


def test_the_command_writes_the_set_and_reports_where_and_how_long(tmp_path, capsys, monkeypatch):
  out = tmp_path / "cli"
  counts = ["--num_train=5", "--num_val=2", "--num_test=3", "--num_unlabeled=4"]
  code, printed, _ = cli_in_process.command_in_process(
      synthetic_command.main,
      ["synthetic.py", f"--out={out}", "--seed=2", *counts],
      capsys,
      monkeypatch,
  )
  assert code == 0
  assert str(out) in printed and re.search(r"in \d+\.\d s", printed)
  assert synthetic.is_complete(out)
  assert len(list(out.rglob("*.jpg"))) == 14
  assert json.loads((out / synthetic.COMPLETE_MARKER).read_text())["seed"] == 2
  in_process = synthetic.generate(
      tmp_path / "api", seed=2, num_train=5, num_val=2, num_test=3, num_unlabeled=4
  )
  assert _files(out) == _files(in_process)


@pytest.mark.parametrize(
    "args,message",
    [([], "--out is required"), (["--out={nonempty}"], "is not empty; give a new or empty folder")],
)
def test_the_command_names_a_missing_or_used_out_folder(args, message, tmp_path, capsys, monkeypatch):
  nonempty = tmp_path / "used"
  nonempty.mkdir()
  (nonempty / "notes.txt").write_text("mine")
  argv = ["synthetic.py", *(a.format(nonempty=nonempty) for a in args)]
  code, _, err = cli_in_process.command_in_process(
      synthetic_command.main, argv, capsys, monkeypatch
  )
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
  assert (nonempty / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# The ISIC reader accepts the output
# ---------------------------------------------------------------------------------------------


def test_isic_reader_accepts_the_synthetic_set(small_set):
  for split in isic.SPLITS:
    data = isic.read_split(small_set, split, strict=True)
    ids, labels = _labels(small_set, split)
    assert list(data.image_ids) == ids
    np.testing.assert_array_equal(data.label, labels)
    np.testing.assert_array_equal(data.melanoma, (labels == 0).astype(np.int32))
    np.testing.assert_array_equal(data.seborrheic_keratosis, (labels == 1).astype(np.int32))
    first = Image.open(io.BytesIO(data.read_bytes(0)))
    assert first.format == "JPEG"


# ---------------------------------------------------------------------------------------------
# Learnability: colour statistics near chance, a small CNN well above
# ---------------------------------------------------------------------------------------------


def _colour_histograms(images: np.ndarray, bins: int = 16) -> np.ndarray:
  """Per-channel colour histograms (bins x 3), normalised to sum 1 per channel."""
  feats = [
      np.concatenate([np.histogram(img[..., c], bins=bins, range=(0, 256))[0] for c in range(3)])
      for img in images
  ]
  return np.array(feats, np.float32) / (images.shape[1] * images.shape[2])


def _histogram_auc(medium_arrays) -> float:
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  (x_train, y_train), (x_test, y_test) = medium_arrays["train"], medium_arrays["test"]
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  clf.fit(_colour_histograms(x_train), y_train == render.MELANOMA)
  scores = clf.predict_proba(_colour_histograms(x_test))[:, 1]
  return roc_auc_score(y_test == render.MELANOMA, scores)


@pytest.mark.slow  # renders 980 images; runs with the trained CNN it is measured against
def test_colour_histograms_do_not_reveal_melanoma(medium_arrays):
  auc = _histogram_auc(medium_arrays)
  assert auc < 0.70, f"colour-histogram logistic regression reaches melanoma AUC {auc:.3f}"


def _train_small_cnn(x_train, y_train, x_test, *, epochs, seed=0, batch=64):
  """A 4-layer flax CNN (BatchNorm) trained with Adam and flip/rot90 augmentation.

  Returns the test-set class probabilities (N, 3).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  class SmallCNN(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      for i, features in enumerate((16, 32, 64, 64)):
        x = nn.Conv(features, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        if i < 3:
          x = nn.max_pool(x, (2, 2), (2, 2))
      return nn.Dense(3)(x.mean(axis=(1, 2)))

  def normalise(x):
    return (x.astype(np.float32) / 255.0 - 0.5) / 0.25

  net = SmallCNN()
  variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + x_train.shape[1:]), False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  steps_per_epoch = len(x_train) // batch
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, epochs * steps_per_epoch))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = net.apply(
          {"params": p, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, changes), updates["batch_stats"], opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for b in range(steps_per_epoch):
      idx = order[b * batch : (b + 1) * batch]
      xb = np.rot90(x_train[idx], rng.integers(4), axes=(1, 2))  # lesions have no orientation
      if rng.random() < 0.5:
        xb = xb[:, :, ::-1]
      params, batch_stats, opt_state = step(
          params, batch_stats, opt_state, normalise(np.ascontiguousarray(xb)), y_train[idx]
      )
  predict = jax.jit(lambda v, x: jax.nn.softmax(net.apply(v, x, False)))
  variables = {"params": params, "batch_stats": batch_stats}
  return np.concatenate(
      [
          np.asarray(predict(variables, normalise(x_test[i : i + 160])))
          for i in range(0, len(x_test), 160)
      ]
  )


@pytest.mark.slow
def test_small_cnn_beats_colour_histograms_on_melanoma(medium_arrays):
  from sklearn.metrics import roc_auc_score

  (x_train, y_train), (x_test, y_test) = medium_arrays["train"], medium_arrays["test"]
  probs = _train_small_cnn(x_train, y_train, x_test, epochs=CNN_EPOCHS)
  cnn_mel = roc_auc_score(y_test == render.MELANOMA, probs[:, render.MELANOMA])
  cnn_sk = roc_auc_score(
      y_test == render.SEBORRHEIC_KERATOSIS, probs[:, render.SEBORRHEIC_KERATOSIS]
  )
  hist_mel = _histogram_auc(medium_arrays)
  assert cnn_mel >= hist_mel + CNN_MARGIN, (cnn_mel, hist_mel)
  assert cnn_sk >= 0.75, cnn_sk


CNN_EPOCHS = 20
CNN_MARGIN = 0.2
