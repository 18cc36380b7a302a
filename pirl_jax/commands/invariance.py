r"""How invariant representations are to the pretext transforms (the PIRL paper's Fig. 7).

  python -m pirl_jax.commands.invariance --checkpoint=runs/pirl [--checkpoint=runs/other] \
      [--out=runs/pirl/invariance] [--num_images=500]

For each held-out image I (the query split of the probes, on the data the first checkpoint was
trained on) and a transform t, the score is the L2 distance between the unit-norm representations
of I and of t(I), divided by the mean distance between the unit-norm representations of two
different held-out images: 0 means invariant, 1 means t(I) is as far from I as another image is.

Representations and transforms, each pass evaluated with its own BatchNorm running statistics
(the trunk and g on tiles with the tile pass's, `TrainState.tile_batch_stats`; the trunk and f on
images with the image pass's; a checkpoint written before the state kept tile statistics, or of a
method without a tile pass, uses its image statistics for both):
  * `trunk/tiles`: what PIRL's trunk actually sees, compared: the mean of the trunk's pooled
    features of the image's nine tiles (the deterministic eval tiles) against the trunk's
    features of the image, divided by the mean distance of an image's tile features to the
    features of *another* image. Below 1: the tiles' features point at their own image. Defined
    for any trunk (PIRL, the covariant Jigsaw model, NPID, a random trunk).
  * `trunk/rotation`: the trunk's features of the image against those of the image rotated by
    90, 180 or 270 degrees, relative to another image (as above).
  * `embedding/jigsaw` (PIRL pretraining checkpoints): the paper's Fig. 7, the L2 distance between
    the image head's unit-norm f(v_I) and the jigsaw head's unit-norm g(v_It) of the image's nine
    tiles in a shuffled order, not normalised (0 to 2), as in the paper's figure: f and g are
    different heads, so another image's f is no yardstick for g.

Every view is deterministic (centre crops, one permutation and one rotation per image drawn from
`--seed`), so checkpoints are scored on the same inputs. Writes `invariance.json` (every score's
mean, median, standard deviation and histogram), `invariance.md` (the table) and
`invariance.png` (the histograms).
"""

from __future__ import annotations

import io
import json
import pathlib
import sys

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from pirl_jax import checkpointing
from pirl_jax import inference
from pirl_jax import storage
from pirl_jax import trunk_init
from pirl_jax import user_errors
from pirl_jax.commands import probe as probe_command
from pirl_jax.eval import probe
from pirl_jax.train import state as state_lib

GRID = 3
HISTOGRAM_BINS = np.linspace(0.0, 2.0, 41)


# --- Transforms (NumPy, on (H, W, C) images) ------------------------------------------------------


def cell_slices(size: int, grid: int = GRID) -> list[tuple[slice, slice]]:
  """The grid's cells in row-major order: `size // grid` px each, from the top-left corner."""
  cell = size // grid
  return [
      (slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
      for r in range(grid)
      for c in range(grid)
  ]


def rotate(image: np.ndarray, quarter_turns: int) -> np.ndarray:
  """The image rotated counter-clockwise by 90 degrees `quarter_turns` times."""
  return np.rot90(image, k=quarter_turns, axes=(0, 1)).copy()


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
  """Short side resized to `size` (bilinear), then the centre `size` x `size` crop; uint8."""
  height, width = image.shape[:2]
  scale = size / min(height, width)
  new = (max(size, round(width * scale)), max(size, round(height * scale)))
  resized = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
  top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
  return resized[top : top + size, left : left + size]


def centre_tiles(image: np.ndarray, tile_size: int, grid: int = GRID) -> np.ndarray:
  """(grid**2, T, T, C): the centre `tile_size` square of each cell, in row-major order."""
  tiles = []
  for rows, cols in cell_slices(image.shape[0], grid):
    cell = image[rows, cols]
    top = (cell.shape[0] - tile_size) // 2
    left = (cell.shape[1] - tile_size) // 2
    tiles.append(cell[top : top + tile_size, left : left + tile_size])
  return np.stack(tiles)


# --- The score ------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def normalised_distances(originals: np.ndarray, transformed: np.ndarray) -> np.ndarray:
  """(N,) ||u(a_i) - u(b_i)|| / mean_{i != j} ||u(a_i) - u(a_j)||, u = x / ||x||.

  Args:
    originals: (N, F) representations of the images, N >= 2.
    transformed: (N, F) representations of their transformed versions.
  """
  a, b = _unit(originals), _unit(transformed)
  if len(a) < 2:
    raise ValueError("normalised distances need at least two images.")
  # ||u - v||^2 = 2 - 2 <u, v> for unit vectors.
  pairwise = np.sqrt(np.maximum(2.0 - 2.0 * (a @ a.T), 0.0))
  n = len(a)
  between = pairwise.sum() / (n * (n - 1))  # the diagonal is 0
  return distances(originals, transformed) / between


def cross_normalised_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N,) ||u(a_i) - u(b_i)|| / mean_{i != j} ||u(a_i) - u(b_j)||, u = x / ||x||.

  For two representations of the same images (e.g. the tiles' and the image's): 1 means a_i is
  as far from b_i as from another image's b.
  """
  a, b = _unit(a), _unit(b)
  if len(a) < 2:
    raise ValueError("normalised distances need at least two images.")
  pairwise = np.sqrt(np.maximum(2.0 - 2.0 * (a @ b.T), 0.0))
  n = len(a)
  between = (pairwise.sum() - np.trace(pairwise)) / (n * (n - 1))
  return np.diag(pairwise) / between


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N,) ||u(a_i) - u(b_i)||, u = x / ||x||: from 0 (same direction) to 2 (opposite)."""
  return np.linalg.norm(_unit(a) - _unit(b), axis=1)


def summarize(scores: np.ndarray) -> dict:
  counts, _ = np.histogram(np.clip(scores, HISTOGRAM_BINS[0], HISTOGRAM_BINS[-1]), HISTOGRAM_BINS)
  return dict(
      mean=float(np.mean(scores)),
      median=float(np.median(scores)),
      std=float(np.std(scores)),
      num_images=int(len(scores)),
      histogram=counts.tolist(),
      bin_edges=HISTOGRAM_BINS.tolist(),
  )


# --- Views of the held-out images -----------------------------------------------------------------


def held_out_images(saved: dict, num_images: int, cache_dir: str = "") -> list[np.ndarray]:
  """Up to `num_images` decoded held-out images (the probes' query split), uint8 RGB."""
  data_cfg = probe_command.data_config(saved, {"cache_dir": cache_dir or None})
  probe_cfg = probe_command.default_probe_config()
  saved_probe = saved.get("probe", {})
  for key in ("index_split", "query_split", "labels", "tfds_name"):
    if saved_probe.get(key):
      probe_cfg[key] = saved_probe[key]
  sets = probe.probe_sets(data_cfg, probe_cfg)
  if sets is None:
    raise user_errors.UserError(
        f"The run's data ({data_cfg.source} {data_cfg.path}) has no held-out labelled split to "
        "measure invariance on; give the run a probe.labels CSV."
    )
  encoded = sets.query.encoded[:num_images]
  return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded]


def make_views(
    images, image_size: int, jigsaw_crop_size: int, tile_size: int, seed: int
) -> dict[str, np.ndarray]:
  """The deterministic inputs every checkpoint is scored on (normalised float32)."""
  rng = np.random.default_rng(seed)
  squares = np.stack([centre_square(im, image_size) for im in images])
  permutations = np.stack([rng.permutation(GRID * GRID) for _ in images])
  turns = rng.integers(1, 4, len(images))
  jigsaw_squares = np.stack([centre_square(im, jigsaw_crop_size) for im in images])
  tiles = np.stack([centre_tiles(sq, tile_size) for sq in jigsaw_squares])
  normalize = inference.normalize_images
  return dict(
      image=normalize(squares),
      rotation=normalize(np.stack([rotate(sq, t) for sq, t in zip(squares, turns)])),
      tiles=normalize(tiles),  # row-major: the tile bag does not depend on the order
      shuffled_tiles=normalize(np.stack([t[p] for t, p in zip(tiles, permutations)])),
  )


def score_checkpoint(variables: dict, model_cfg: dict, views: dict, with_heads: bool) -> dict:
  """Scores of one set of variables: a trunk's {'params', 'batch_stats'} (with_heads=False) or
  a whole PIRL model's (with_heads=True); either may carry 'tile_batch_stats' (the trunk's
  statistics for tiles; default: its 'batch_stats')."""
  model = state_lib.create_model(ml_collections.ConfigDict(model_cfg))
  tile_stats = variables.get("tile_batch_stats")
  if with_heads:
    trunk_vars = {c: variables[c][trunk_init.TRUNK] for c in ("params", "batch_stats")}
  else:
    trunk_vars = {c: variables[c] for c in ("params", "batch_stats")}
  tile_trunk_vars = dict(trunk_vars, batch_stats=tile_stats or trunk_vars["batch_stats"])
  embed = lambda v, x: inference.embed(model.trunk, v, x, normalize=False)
  image = embed(trunk_vars, np.concatenate([views["image"], views["rotation"]]))
  image, rotated = np.split(image, 2)
  tiles = views["tiles"]
  tile_features = embed(tile_trunk_vars, tiles.reshape((-1,) + tiles.shape[2:]))
  tile_bag = tile_features.reshape(tiles.shape[:2] + (-1,)).mean(axis=1)
  scores = {
      "trunk/tiles": summarize(cross_normalised_distances(tile_bag, image)),
      "trunk/rotation": summarize(normalised_distances(image, rotated)),
  }
  if with_heads:
    image_vars = {c: variables[c] for c in ("params", "batch_stats")}
    tile_vars = dict(image_vars)
    if tile_stats is not None:
      tile_vars["batch_stats"] = {**variables["batch_stats"], trunk_init.TRUNK: tile_stats}
    f_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, method="embed_images"))
    g_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, method="embed_tiles"))
    f_hat = np.concatenate(
        [
            np.asarray(f_fn(image_vars, views["image"][i : i + 128]))
            for i in range(0, len(views["image"]), 128)
        ]
    )
    g_hat = np.concatenate(
        [
            np.asarray(g_fn(tile_vars, views["shuffled_tiles"][i : i + 128]))
            for i in range(0, len(views["image"]), 128)
        ]
    )
    scores["embedding/jigsaw"] = summarize(distances(f_hat, g_hat))
  return scores


def _random_model_variables(model_cfg: dict, views: dict, seed: int) -> dict:
  model = state_lib.create_model(ml_collections.ConfigDict(model_cfg))
  variables = model.init(
      jax.random.PRNGKey(seed),
      jnp.asarray(views["image"][:1]),
      jnp.asarray(views["tiles"][:1]),
      train=False,
  )
  return jax.device_get(variables)


def run_analysis(
    checkpoints: list[str], *, num_images: int = 500, seed: int = 0, cache_dir: str = ""
) -> dict:
  """Scores every checkpoint and a random model of the first one's architecture.

  Returns:
    {'data': ..., 'num_images': N, 'results': {row name: {measure: summary}}}.
  """
  if not checkpoints:
    raise user_errors.UserError("--checkpoint is required (a pretraining workdir).")
  resolved = [trunk_init.resolve_init(c, field="--checkpoint") for c in checkpoints]
  for given, init in zip(checkpoints, resolved):
    if not (init.source_config or {}).get("model"):
      raise checkpointing.CheckpointMismatchError(
          f"--checkpoint={given}: no config.json of the run that wrote it was found, so its "
          "architecture is unknown."
      )
  first = resolved[0].source_config
  views_cfg = first.get("data", {}).get("views", {})
  image_size = views_cfg.get("image_size") or first.get("augment", {}).get("image_size")
  jigsaw_crop_size = views_cfg.get("jigsaw_crop_size", image_size)
  tile_size = views_cfg.get("tile_size", image_size // GRID)
  images = held_out_images(first, num_images, cache_dir)
  views = make_views(images, image_size, jigsaw_crop_size, tile_size, seed)
  logging.info(
      "Invariance on %d held-out images (%d px, tiles %d px).", len(images), image_size, tile_size
  )

  results = {}
  pirl_model_cfg = None
  for given, init in zip(checkpoints, resolved):
    saved = init.source_config
    # A PIRL pretraining state has both heads; an NPID one only the image head.
    is_pirl = (
        saved.get("mode") == "pretrain"
        and init.item_dir is not None
        and saved.get("method", "pirl") == "pirl"
    )
    name = f"{given} (step {init.step})" if init.step is not None else given
    arrays = (
        checkpointing.load_arrays(init.item_dir)
        if saved.get("mode") == "pretrain" and init.item_dir is not None
        else {}
    )
    tile_stats = arrays.get("tile_batch_stats", {}).get(trunk_init.TRUNK)
    if is_pirl:
      variables = {"params": arrays["params"], "batch_stats": arrays["batch_stats"]}
      model_cfg = dict(saved["model"])
      pirl_model_cfg = pirl_model_cfg or model_cfg
    else:
      loaded = inference.restore(given)
      variables = dict(loaded.variables)
      model_cfg = dict(
          saved.get("model", {}), trunk=loaded.name, width_multiplier=loaded.width_multiplier
      )
    if tile_stats is not None:
      variables["tile_batch_stats"] = tile_stats
    results[name] = score_checkpoint(variables, model_cfg, views, with_heads=is_pirl)
    logging.info("%s: %s", name, describe(results[name]))
  first_is_pretraining = resolved[0].source_config.get("mode") == "pretrain"
  if pirl_model_cfg is None and first_is_pretraining:
    pirl_model_cfg = dict(resolved[0].source_config["model"])
  if pirl_model_cfg is not None:
    # The same random model whatever the methods: a PIRL network's initialisation at `seed`.
    random_vars = _random_model_variables(pirl_model_cfg, views, seed)
    results["random init"] = score_checkpoint(random_vars, pirl_model_cfg, views, with_heads=True)
  else:
    trunk = trunk_init.trunk_from_config(resolved[0].source_config["model"])
    random_vars = jax.device_get(
        trunk.init(jax.random.PRNGKey(seed), jnp.asarray(views["image"][:1]), train=False)
    )
    results["random init"] = score_checkpoint(
        random_vars, resolved[0].source_config["model"], views, with_heads=False
    )
  return dict(
      num_images=len(images), image_size=image_size, tile_size=tile_size, seed=seed, results=results
  )


def describe(scores: dict) -> str:
  return ", ".join(f"{k} {v['mean']:.3f}" for k, v in scores.items())


def markdown_table(result: dict) -> str:
  measures = sorted({m for scores in result["results"].values() for m in scores})
  lines = [
      "| representation | " + " | ".join(f"{m} (mean ± std)" for m in measures) + " |",
      "|---" * (len(measures) + 1) + "|",
  ]
  for name, scores in result["results"].items():
    cells = [
        f"{scores[m]['mean']:.3f} ± {scores[m]['std']:.3f}" if m in scores else "—"
        for m in measures
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def short_name(name: str) -> str:
  """A legend's name of a run: its folder's name, not the whole path ('runs/pirl-s0 (step 620)'
  -> 'pirl-s0 (step 620)')."""
  path, sep, step = name.partition(" (step ")
  folder = pathlib.PurePath(path.rstrip("/"))
  if folder.name in ("checkpoints", "default") or folder.name.isdigit():
    folder = next(
        (
            p
            for p in folder.parents
            if p.name not in ("checkpoints", "default", "") and not p.name.isdigit()
        ),
        folder,
    )
  return f"{folder.name or path}{sep}{step}"


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  measures = sorted({m for scores in result["results"].values() for m in scores})
  fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4), squeeze=False)
  for ax, measure in zip(axes[0], measures):
    for name, scores in result["results"].items():
      if measure in scores:
        s = scores[measure]
        ax.stairs(s["histogram"], s["bin_edges"], label=f"{short_name(name)} ({s['mean']:.2f})")
    ax.set_title(measure)
    ax.set_xlabel(
        "distance, f to g"
        if measure.startswith("embedding")
        else "distance to the transformed image / to another image"
    )
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top

  flags.DEFINE_multi_string(
      "checkpoint",
      None,
      "A pretraining (or fine-tuning) workdir, its "
      "checkpoints/ folder or one step folder; repeat to compare.",
  )
  flags.DEFINE_string(
      "out", "", "Where invariance.{json,md,png} go (default " "<first checkpoint>/invariance)."
  )
  flags.DEFINE_integer("num_images", 500, "Held-out images scored (at most).")
  flags.DEFINE_integer("seed", 0, "Seed of the permutations, rotations and the random model.")
  flags.DEFINE_string(
      "cache_dir", "", "Prepared-image cache (default $PIRL_JAX_CACHE or " "~/.cache/pirl_jax)."
  )
  flags.mark_flag_as_required("checkpoint")

  def run(_):
    f = flags.FLAGS
    result = run_analysis(f.checkpoint, num_images=f.num_images, seed=f.seed, cache_dir=f.cache_dir)
    if jax.process_index() != 0:
      return
    out = (
        storage.path(f.out, absolute=False)
        if f.out
        else storage.path(f.checkpoint[0]) / "invariance"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "invariance.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(result)
    text = (
        f"Invariance on {result['num_images']} held-out images. trunk/tiles: distance of "
        "the mean trunk features of an image's tiles to the trunk features of the image, "
        "over their distance to another image's; trunk/rotation: distance to the rotated "
        "image over the distance to another image (0: invariant, 1: as far as another "
        "image); embedding/jigsaw: the L2 distance of unit-norm f(v_I) and g(v_It) (0 to 2)"
        f"\n\n{table}\n"
    )
    (out / "invariance.md").write_text(text)
    plot(result, out / "invariance.png")
    print(f"\n{text}\nWritten to {out}/invariance.{{json,md,png}}.")

  return program.run_program(run, argv or sys.argv)


if __name__ == "__main__":
  sys.exit(main())
