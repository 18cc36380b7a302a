r"""The probe command: kNN and linear probes of a checkpoint's frozen trunk and a random one.

It judges any checkpoint on any labelled images, next to a randomly initialised trunk of the
same architecture (the evaluator is `pirl_jax.eval.probe.ProbeEvaluator`):

  python -m pirl_jax.commands.probe --checkpoint=runs/pirl   # the data it was trained on
  python -m pirl_jax.commands.probe --checkpoint=runs/pirl --data=/data/imgs --labels=labels.csv
  python -m pirl_jax.commands.probe --checkpoint=runs/pirl-isic --data=isic:/data/isic2017
  python -m pirl_jax.commands.probe --checkpoint=runs/pirl --data=tfds:cifar10 --tfds_data_dir=DIR \
      --index_split=train[:5000] --query_split=test

A labels CSV has lines `file,label` (or `file,label,split`, split `index` or `query`), file
relative to `--data`. The command prints a Markdown table and writes `probe.json` and `probe.md`
to `--output_dir` (default: `<workdir>/probe`).

The protocol is `pirl_jax.eval.probe`'s.
"""

from __future__ import annotations

import json
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from pirl_jax import checkpointing
from pirl_jax import config_blocks
from pirl_jax import sharding as sharding_lib
from pirl_jax import storage
from pirl_jax import trunk_init
from pirl_jax import user_errors
from pirl_jax.commands import program
from pirl_jax.data import pipeline
from pirl_jax.data import probe_data
from pirl_jax.eval import probe
from pirl_jax.eval import tile_pathway
from pirl_jax.train import state as state_lib


def default_probe_config() -> ml_collections.ConfigDict:
  """The `probe` block of configs/pirl.py, with its defaults."""
  return config_blocks.probe_config()


def data_config(saved: dict | None, flags_values: dict) -> ml_collections.ConfigDict:
  """The data block for the probe: the checkpoint's run where known, then the flags."""
  base = dict(
      source="synthetic",
      path="",
      tfds_name="",
      tfds_split="train",
      tfds_data_dir="",
      cache_dir="",
      synthetic_seed=0,
      synthetic_num_unlabeled=0,
      include_unlabeled=True,
      max_image_side=128,
      min_image_side=1,
      on_bad_image="error",
      num_parallel_calls=-1,
      prefetch_batches=2,
  )
  for key in base:
    if saved and key in saved.get("data", {}):
      base[key] = saved["data"][key]
  base.update({k: v for k, v in flags_values.items() if v is not None})
  base["min_image_side"] = 1  # the probe takes the images it is given
  return ml_collections.ConfigDict(base)


def _tile_pathway(
    init,
    saved: dict,
    evaluator: probe.ProbeEvaluator,
    mesh,
    random_seed: int,
    num_parallel_calls: int,
) -> list[dict]:
  """The tile pathway's metrics (`tile_pathway`) of a pretraining checkpoint and of a random
  network of its architecture (in the order of the probe's rows)."""
  config = ml_collections.ConfigDict(saved)
  model = state_lib.create_model(config.model, 1, config.get("jigsaw_permutations", 1000))
  tiles = tile_pathway.TilePathwayEvaluator(
      evaluator,
      model,
      pipeline.view_config(config.data.views),
      mesh,
      retrieval=config.get("method", "pirl") == "pirl",
      num_parallel_calls=num_parallel_calls,
  )
  replicated = sharding_lib.replicated(mesh)
  trained = checkpointing.load_arrays(init.item_dir)
  random = jax.jit(lambda rng: state_lib.init_variables(model, rng, config))(
      jax.random.PRNGKey(random_seed)
  )
  out = []
  for arrays in (trained, random):
    arrays = jax.device_put(
        {k: arrays[k] for k in ("params", "batch_stats", "tile_batch_stats") if k in arrays},
        replicated,
    )
    start = time.time()
    metrics = tiles.run(tile_pathway.state_of_arrays(arrays))
    logging.info("tile pathway: %s (%.0f s)", tiles.describe(metrics), time.time() - start)
    out.append(metrics)
  return out


def markdown_table(results: dict, class_names, scored) -> str:
  header = ["trunk"]
  keys = []
  for kind, title in (("knn", "kNN"), ("linear", "linear")):
    header += [f"{title} AUC mean", f"{title} accuracy"]
    keys += [f"{kind}_auc_mean", f"{kind}_accuracy"]
    if tuple(scored) != tuple(class_names[1:]) or len(class_names) > 2:
      header += [f"{title} AUC {name}" for name in scored]
      keys += [f"{kind}_auc_{name}" for name in scored]
  tile_columns = (
      ("tilebag_knn_auc_mean", "tile bag kNN AUC mean"),
      ("tilebag_linear_auc_mean", "tile bag linear AUC mean"),
      ("retrieval_top1", "g->f top-1"),
      ("retrieval_median_rank", "g->f median rank"),
  )
  for key, title in tile_columns:
    if all(key in metrics for metrics in results.values()):
      header.append(title)
      keys.append(key)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, metrics in results.items():
    lines.append("| " + " | ".join([name] + [f"{metrics[k]:.4f}" for k in keys]) + " |")
  return "\n".join(lines)


def run_probe(
    checkpoint: str,
    *,
    data: str = "",
    labels: str = "",
    tfds_data_dir: str = "",
    index_split: str = "",
    query_split: str = "",
    query_fraction: float = 0.5,
    image_size: int = 0,
    random_seed: int = 0,
    cache_dir: str = "",
    knn_k: int = 0,
    probe_cfg: ml_collections.ConfigDict | None = None,
    mesh=None,
) -> dict:
  """Probes a checkpoint's trunk and a random trunk of the same architecture on one dataset.

  Returns:
    {'checkpoint', 'step', 'data', 'results': {row name: metrics}, 'table': Markdown}.
  """
  init = trunk_init.resolve_init(checkpoint, field="--checkpoint")
  saved = init.source_config or {}
  if "model" not in saved:
    raise trunk_init.checkpointing.CheckpointMismatchError(
        f"--checkpoint={checkpoint}: no config.json of the run that wrote it was found, so the "
        "trunk's architecture is unknown."
    )
  views = saved.get("data", {}).get("views", {})
  size = image_size or views.get("image_size") or saved.get("augment", {}).get("image_size")
  if not size:
    raise user_errors.UserError(
        f"--checkpoint={checkpoint} does not say which image size its trunk was trained at "
        "(a weights file has no config.json): pass --image_size, e.g. 224 for ImageNet weights."
    )
  cfg = probe_cfg or default_probe_config()
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.query_fraction = query_fraction
  saved_probe = saved.get("probe", {})
  cfg.index_split = index_split or saved_probe.get("index_split", cfg.index_split)
  cfg.query_split = query_split or saved_probe.get("query_split", cfg.query_split)
  overrides = {"cache_dir": cache_dir or None, "tfds_data_dir": tfds_data_dir or None}
  if data.startswith("tfds:"):
    cfg.tfds_name = data[len("tfds:") :]
    data_cfg = data_config(saved, overrides)
  elif data.startswith("isic:"):
    data_cfg = data_config(saved, dict(overrides, source="isic", path=data[len("isic:") :]))
  elif data == "synthetic":
    data_cfg = data_config(saved, dict(overrides, source="synthetic", path=""))
  elif data:
    data_cfg = data_config(saved, dict(overrides, source="folder", path=data))
  else:
    data_cfg = data_config(saved, overrides)
  if labels:
    cfg.labels = labels
  elif data_cfg.source == "folder" and not cfg.tfds_name:
    cfg.labels = saved_probe.get("labels", "")
  if (
      data_cfg.source == "folder"
      and not cfg.tfds_name
      and not probe_data.has_labels(data_cfg.path, cfg.labels)
  ):
    raise probe_data.LabelsCsvError(
        f"The images in {data_cfg.path} need labels: pass --labels=CSV with lines 'file,label' "
        "(file relative to --data), or put each class's images in a subfolder of its own."
    )
  if data_cfg.source == "tfds" and not cfg.tfds_name:
    raise probe_data.LabelsCsvError(
        "The checkpoint was pretrained on a tfds dataset: name a labelled one with "
        "--data=tfds:NAME (and --tfds_data_dir)."
    )
  sets = probe.probe_sets(data_cfg, cfg)
  logging.info("Probe data: %s.", probe_data.describe_sets(sets))

  mesh = mesh or sharding_lib.create_mesh()
  trunk = trunk_init.trunk_from_config(saved["model"])
  abstract = trunk_init.abstract_trunk_variables(trunk, size)
  trunk_init.check_trunk(
      init,
      abstract,
      f"{saved['model']['trunk']} x" f"{saved['model'].get('width_multiplier', 1.0)}",
  )
  if knn_k:
    cfg.knn_k = knn_k
  evaluator = probe.ProbeEvaluator(
      sets,
      trunk,
      size,
      mesh,
      cfg,
      num_parallel_calls=data_cfg.num_parallel_calls,
      knn_k_field="--knn_k",
  )
  name = "checkpoint" if init.step is None else f"checkpoint (step {init.step})"
  trunks = {
      name: trunk_init.restore_trunk(init, abstract, sharding=sharding_lib.replicated(mesh)),
      f"random init (seed {random_seed})": jax.jit(
          lambda rng: trunk.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False),
          out_shardings=sharding_lib.replicated(mesh),
      )(jax.random.PRNGKey(random_seed)),
  }
  results = {}
  for name, variables in trunks.items():
    start = time.time()
    results[name] = evaluator.scores(*evaluator.features(variables))
    logging.info("%s: %s (%.0f s)", name, evaluator.describe(results[name]), time.time() - start)
  if cfg.get("tile_pathway", False) and saved.get("mode") == "pretrain" and init.item_dir:
    tile_metrics = _tile_pathway(
        init, saved, evaluator, mesh, random_seed, data_cfg.num_parallel_calls
    )
    for name, metrics in zip(results, tile_metrics):
      results[name].update(metrics)
  return dict(
      checkpoint=init.checkpoint,
      step=init.step,
      data=probe_data.describe_sets(sets),
      class_names=list(sets.class_names),
      scored=list(sets.scored),
      results=results,
      table=markdown_table(results, sets.class_names, sets.scored),
  )


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      "checkpoint",
      None,
      "A pretraining or fine-tuning workdir, its "
      "checkpoints/ folder, one step folder, or a torchvision-layout weights "
      "file (.safetensors; with --image_size and --data).",
  )
  flags.DEFINE_string(
      "data",
      "",
      "'' (the data the checkpoint was trained on), 'synthetic', "
      "'isic:PATH', 'tfds:NAME' or a folder of images (with --labels).",
  )
  flags.DEFINE_string("labels", "", "For a folder: a CSV of 'file,label[,split]' lines.")
  flags.DEFINE_string("tfds_data_dir", "", "For tfds: its data_dir.")
  flags.DEFINE_string("index_split", "", "Labelled examples (ISIC/tfds split; default train).")
  flags.DEFINE_string("query_split", "", "Held-out queries (ISIC/tfds split; default test).")
  flags.DEFINE_float(
      "query_fraction",
      0.5,
      "For a CSV without a split column: the stratified "
      "fraction of each class held out as queries.",
  )
  flags.DEFINE_integer("image_size", 0, "Input size (0: the checkpoint run's image size).")
  flags.DEFINE_integer("knn_k", 20, "Neighbours of the kNN probe (at most the index's size).")
  flags.DEFINE_integer("random_seed", 0, "Seed of the random trunk it is compared with.")
  flags.DEFINE_string(
      "cache_dir", "", "Prepared-image cache (default $PIRL_JAX_CACHE or " "~/.cache/pirl_jax)."
  )
  flags.DEFINE_string(
      "output_dir", "", "Where probe.json and probe.md go (default " "<workdir>/probe)."
  )
  flags.mark_flag_as_required("checkpoint")

  def run(_):
    f = flags.FLAGS
    result = run_probe(
        f.checkpoint,
        data=f.data,
        labels=f.labels,
        tfds_data_dir=f.tfds_data_dir,
        index_split=f.index_split,
        query_split=f.query_split,
        query_fraction=f.query_fraction,
        image_size=f.image_size,
        random_seed=f.random_seed,
        cache_dir=f.cache_dir,
        knn_k=f.knn_k,
    )
    if jax.process_index() != 0:
      return
    out = (
        storage.path(f.output_dir, absolute=False)
        if f.output_dir
        else storage.path(result["checkpoint"], absolute=False) / "probe"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    text = f"Probe of {result['checkpoint']} on {result['data']}\n\n{result['table']}\n"
    (out / "probe.md").write_text(text)
    print(f"\n{text}\nWritten to {out / 'probe.json'} and {out / 'probe.md'}.")

  return program.run_program(run, argv or sys.argv)


if __name__ == "__main__":
  sys.exit(main())
