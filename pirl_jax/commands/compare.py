r"""Scratch vs PIRL (vs a supervised checkpoint) on ISIC 2017 under one recipe and the same seeds.

  python -m pirl_jax.commands.compare --pirl=runs/pirl --seeds=0,1,2 --label_fraction=0.1
  python -m pirl_jax.commands.compare --pirl=runs/pirl --uda    # + scratch+UDA, PIRL+UDA
  python -m pirl_jax.commands.compare --pirl=runs/pirl --supervised=runs/supervised/checkpoints \
      --config=configs/finetune_isic.py:linear --workdir=runs/compare-linear
  python -m pirl_jax.commands.compare --config=configs/finetune_isic.py:isic \
      --config.data.path=/data/isic2017 --pirl=runs/pirl-isic \
      --supervised=resnet50_imagenet.safetensors   # scratch / PIRL / ImageNet, ResNet-50

Every arm runs `finetune.train_and_evaluate` with the same config (`--config`, default
configs/finetune_isic.py, with any `--config.<field>=...` override), the same trunk (the PIRL run's,
from its config.json), the same label subset and seed; only the initialisation differs (and, for
the '+ UDA' arms of `--uda`, `uda.enabled`: the config's `uda` block is their recipe). Runs go to
`<workdir>/<arm>/seed<k>/`; a run that already finished there (metrics.json present) is reused,
so an interrupted comparison picks up where it stopped. Prints a Markdown table of test AUCs
(mean ± sample standard deviation over the seeds) and writes it to `<workdir>/compare.md`, with all
numbers in `<workdir>/compare.json`.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from pirl_jax import storage
from pirl_jax import user_errors

FLAGS = flags.FLAGS


class Preempted(Exception):
  """A run stopped by SIGTERM (its checkpoint written): the comparison stops there too, and the
  same command resumes it."""


def stop_if_preempted(summary: dict, what: str) -> None:
  """Raises Preempted when a run's summary says SIGTERM stopped it."""
  if summary.get("preempted"):
    raise Preempted(
        f"{what} stopped by SIGTERM at step {summary['step']} of "
        f"{summary['total_steps']} (checkpoint written); run the same command again "
        "to resume the comparison."
    )


def define_flags() -> None:
  """The command's flags; defined when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config",
      "configs/finetune_isic.py",
      "The evaluation recipe shared by every arm (a configs/finetune_isic.py preset).",
      lock_config=True,
  )
  flags.DEFINE_string("pirl", None, "PIRL pretraining workdir (or checkpoint folder).")
  flags.DEFINE_string(
      "supervised",
      None,
      "Optional: the same trunk trained with labels (the 'ImageNet transfer' "
      "arm): a checkpoint, or a torchvision-layout weights file (.safetensors; "
      ".pth with torch installed).",
  )
  flags.DEFINE_bool(
      "uda",
      False,
      "Also run every arm with semi-supervised fine-tuning (UDA, the config's "
      "`uda` block with uda.enabled=True): arms scratch+UDA, PIRL+UDA, ...",
  )
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each arm runs once per seed.")
  flags.DEFINE_float("label_fraction", 0.1, "Fraction of the training labels (stratified subset).")
  flags.DEFINE_alias("label-fraction", "label_fraction")
  flags.DEFINE_string("workdir", None, "Where the runs and the table go (default: runs/compare).")


ARM_TITLES = {
    "scratch": "scratch",
    "pirl": "PIRL (self-supervised)",
    "supervised": "supervised checkpoint",
    "scratch_uda": "scratch + UDA",
    "pirl_uda": "PIRL + UDA",
    "supervised_uda": "supervised checkpoint + UDA",
}
UDA_SUFFIX = "_uda"
METRICS = (
    ("auc_melanoma", "test AUC melanoma"),
    ("auc_seborrheic_keratosis", "test AUC seb. keratosis"),
    ("auc_mean", "test mean AUC"),
)


def arm_config(base, arm: str, checkpoint: str, seed: int, label_fraction: float, trunk: tuple):
  """The config of one run: the shared recipe with this arm's init and this seed.

  An arm named '<init>_uda' is '<init>' with semi-supervised fine-tuning (`uda.enabled`); any
  other arm runs with it off, whatever the recipe says.
  """
  config = ml_collections.ConfigDict(base.to_dict())
  config.seed = seed
  config.label_fraction = label_fraction
  use_uda = arm.endswith(UDA_SUFFIX)
  if "uda" in config:
    config.uda.enabled = use_uda
  arm = arm.removesuffix(UDA_SUFFIX)
  config.init.kind = arm if arm != "supervised" else ""  # a checkpoint or a weights file
  config.init.checkpoint = checkpoint
  config.init.inherit_trunk = False  # every arm uses the PIRL run's trunk, set here
  config.model.trunk, config.model.width_multiplier = trunk
  return config


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return float(np.mean(values)), std


def markdown_table(results: dict[str, list[dict]], label_fraction: float, protocol: str) -> str:
  """| init | test AUC melanoma | ... | with mean ± std over seeds, then the per-seed values."""
  seeds = {arm: [r["seed"] for r in runs] for arm, runs in results.items()}
  header = "| initialisation | " + " | ".join(t for _, t in METRICS) + " | seeds |"
  lines = [
      f"ISIC 2017 Part 3 test AUC, {protocol}, label_fraction={label_fraction:g} "
      "(mean ± std over seeds)",
      "",
      header,
      "|" + "---|" * (len(METRICS) + 2),
  ]
  for arm, runs in results.items():
    cells = []
    for key, _ in METRICS:
      mean, std = _mean_std([r["test"][key] for r in runs])
      cells.append(f"{mean:.3f} ± {std:.3f}")
    lines.append(
        f"| {ARM_TITLES[arm]} | " + " | ".join(cells) + f" | {','.join(map(str, seeds[arm]))} |"
    )
  lines += paired_comparison(results)
  lines += ["", "Per seed (test melanoma / SK / mean AUC; selected by validation mean AUC):", ""]
  for arm, runs in results.items():
    per_seed = "; ".join(
        f"seed {r['seed']}: {r['test']['auc_melanoma']:.3f} / "
        f"{r['test']['auc_seborrheic_keratosis']:.3f} / {r['test']['auc_mean']:.3f}"
        for r in runs
    )
    lines.append(f"- {ARM_TITLES[arm]}: {per_seed}")
  return "\n".join(lines)


def paired_comparison(results: dict[str, list[dict]], baseline: str = "scratch") -> list[str]:
  """Per metric, each arm minus the baseline over the seeds they share, and each '+ UDA' arm
  minus the same arm without it: mean ± std and a paired t-test (two-sided,
  scipy.stats.ttest_rel)."""
  pairs = [(arm, baseline) for arm in results if arm != baseline and baseline in results]
  pairs += [
      (arm, arm.removesuffix(UDA_SUFFIX))
      for arm in results
      if arm.endswith(UDA_SUFFIX)
      and arm.removesuffix(UDA_SUFFIX) in results
      and arm.removesuffix(UDA_SUFFIX) != baseline
  ]
  lines = []
  for arm, base_arm in pairs:
    lines += _paired_lines(results[arm], results[base_arm], arm, base_arm)
  if not lines:
    return []
  return ["", "Paired differences (same seeds and label subsets):", ""] + lines


def _paired_lines(runs: list[dict], base_runs: list[dict], arm: str, base_arm: str) -> list[str]:
  from scipy import stats  # pylint: disable=g-import-not-at-top

  base = {r["seed"]: r for r in base_runs}
  shared = [r for r in runs if r["seed"] in base]
  if len(shared) < 2:
    return []
  lines = []
  for key, title in METRICS:
    diff = np.array([r["test"][key] - base[r["seed"]]["test"][key] for r in shared])
    t, p = stats.ttest_rel(
        [r["test"][key] for r in shared], [base[r["seed"]]["test"][key] for r in shared]
    )
    ahead = int(np.sum(diff > 0))
    lines.append(
        f"- {ARM_TITLES[arm]} − {ARM_TITLES[base_arm]}, {title}: "
        f"{np.mean(diff):+.3f} ± {np.std(diff, ddof=1):.3f} over {len(diff)} seeds "
        f"(ahead on {ahead}), paired t = {t:.2f}, p = {p:.3g}"
    )
  return lines


def run_comparison(
    base_config,
    workdir: str,
    pirl: str,
    supervised: str | None,
    seeds: list[int],
    label_fraction: float,
    uda: bool = False,
) -> tuple[dict, str]:
  """Runs (or reuses) every arm x seed and returns (results per arm, Markdown table).

  With `uda`, every initialisation is also fine-tuned with UDA (arm '<init>_uda').
  """
  from pirl_jax.tasks import finetune
  from pirl_jax import trunk_init

  if not pirl:
    raise user_errors.UserError("--pirl is required: the PIRL pretraining workdir to compare.")
  probe = ml_collections.ConfigDict(base_config.to_dict())
  probe.init.kind, probe.init.checkpoint = "pirl", pirl
  # The PIRL run's trunk (from its config.json, with init.inherit_trunk) is every arm's trunk.
  resolved = trunk_init.inherit_trunk(probe, trunk_init.resolve_init(pirl, "pirl"))
  trunk = (resolved.model.trunk, float(resolved.model.width_multiplier))
  arms = {"scratch": "", "pirl": pirl}
  if supervised:
    # A supervised checkpoint of another architecture fails now, not after the other arms ran.
    model = trunk_init.trunk_from_config({"trunk": trunk[0], "width_multiplier": trunk[1]})
    trunk_init.check_trunk(
        trunk_init.resolve_init(supervised, field="--supervised"),
        trunk_init.abstract_trunk_variables(model, base_config.augment.image_size),
        f"the PIRL run's trunk {trunk[0]} at width {trunk[1]:g}",
    )
    arms["supervised"] = supervised
  if uda:
    arms.update({f"{arm}{UDA_SUFFIX}": checkpoint for arm, checkpoint in list(arms.items())})
  root = storage.path(workdir)
  logging.info(
      "Comparing %s on trunk %s x%g, seeds %s, label_fraction %g, in %s.",
      ", ".join(arms),
      trunk[0],
      trunk[1],
      seeds,
      label_fraction,
      root,
  )
  results: dict[str, list[dict]] = {arm: [] for arm in arms}
  for seed in seeds:
    for arm, checkpoint in arms.items():
      run_dir = root / arm / f"seed{seed}"
      metrics_path = run_dir / "metrics.json"
      if metrics_path.is_file():
        logging.info("Reusing the finished run %s.", run_dir)
      else:  # a new run, or the resumption of an interrupted one
        config = arm_config(base_config, arm, checkpoint, seed, label_fraction, trunk)
        stop_if_preempted(
            finetune.train_and_evaluate(config, str(run_dir)), f"Fine-tuning {arm}, seed {seed},"
        )
      metrics = json.loads(metrics_path.read_text())
      results[arm].append(
          dict(
              seed=seed,
              test=metrics["test"],
              validation=metrics["validation"],
              workdir=str(run_dir),
          )
      )
  table = markdown_table(results, label_fraction, base_config.protocol)
  root.mkdir(parents=True, exist_ok=True)
  (root / "compare.md").write_text(table + "\n")
  (root / "compare.json").write_text(
      json.dumps(
          dict(
              label_fraction=label_fraction,
              seeds=seeds,
              trunk=list(trunk),
              protocol=base_config.protocol,
              pirl=pirl,
              supervised=supervised,
              uda=base_config.uda.to_dict() if uda else None,
              results=results,
          ),
          indent=2,
      )
  )
  return results, table


def _main(argv):
  if len(argv) > 1:
    raise user_errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  seeds = [int(s) for s in FLAGS.seeds]
  workdir = FLAGS.workdir or "runs/compare"
  try:
    _, table = run_comparison(
        FLAGS.config,
        workdir,
        FLAGS.pirl,
        FLAGS.supervised,
        seeds,
        FLAGS.label_fraction,
        uda=FLAGS.uda,
    )
  except Preempted as stopped:
    print(f"\n{stopped}")
    return
  print("\n" + table + f"\n\n(written to {storage.path(workdir) / 'compare.md'})")


def main(argv=None) -> int:
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top

  define_flags()
  return program.run_program(_main, argv or sys.argv)


if __name__ == "__main__":
  sys.exit(main())
