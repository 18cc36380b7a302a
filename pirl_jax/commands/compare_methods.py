r"""PIRL against the pretext tasks it improves on: every method pretrained with the same budget,
evaluated with the same protocol.

  python -m pirl_jax.commands.compare_methods --seeds=0,1,2 --workdir=runs/methods
  python -m pirl_jax.commands.compare_methods --methods=pirl,jigsaw --seeds=0,1,2 \
      --pretrain_config=configs/pirl.py:quality --label_fraction=0.1

For every method (`pirl_jax.methods`) and seed, the pretraining config (`--pretrain_config`, default
configs/pirl.py, any `--pretrain_config.<field>=...` override) runs with `method` and `seed` set and
nothing else changed: the same trunk, views, steps, batch and optimizer. Each run is scored by:

* its final kNN and linear probes (mean AUC on the held-out split, from the run's summary);
* fine-tuning at `--label_fraction` with `--finetune_config` (default configs/finetune_isic.py)
  from its trunk, with the seed's label subset (test mean and melanoma AUC, the best validation
  state); `--label_fraction=0` skips fine-tuning.

Reference rows: a random trunk of the same architecture (probes, one per seed) and training from
scratch (fine-tuning, one per seed). Runs go to `<workdir>/<method>/seed<k>/` (and `-finetune`);
a finished run there is reused, so an interrupted comparison picks up where it stopped. All
pretraining runs go first, then the fine-tuning runs, arm by arm (scratch, then `--methods` in
order). Writes `<workdir>/methods.md` (the table,
paired differences against PIRL, per-seed values), `methods.json` and `methods.png`.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from pirl_jax import methods as methods_lib
from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.commands import compare

FLAGS = flags.FLAGS

TITLES = {
    "pirl": "PIRL (jigsaw)",
    "pirl_rotation": "PIRL (rotation)",
    "npid": "NPID",
    "moco_v2": "MoCo v2",
    "simclr": "SimCLR",
    "jigsaw": "Jigsaw",
    "rotation": "RotNet",
    "relative_patch": "Relative patch",
    "random": "random trunk",
    "scratch": "scratch",
}
# (key in a row's scores, column title); probes from pretraining, test AUCs from fine-tuning.
COLUMNS = (
    ("knn", "kNN mean AUC"),
    ("linear", "linear mean AUC"),
    ("finetune_mean", "fine-tune mean AUC"),
    ("finetune_melanoma", "fine-tune melanoma AUC"),
)


def define_flags() -> None:
  """The command's flags; defined when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file(
      "pretrain_config",
      "configs/pirl.py",
      "The pretraining recipe every method shares (a configs/pirl.py preset).",
      lock_config=True,
  )
  config_flags.DEFINE_config_file(
      "finetune_config",
      "configs/finetune_isic.py",
      "The fine-tuning recipe every trunk is evaluated with.",
      lock_config=True,
  )
  flags.DEFINE_list("methods", list(methods_lib.METHODS), "Methods to compare.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each method runs once per seed.")
  flags.DEFINE_float(
      "label_fraction", 0.1, "Fraction of the training labels for fine-tuning (0: no fine-tuning)."
  )
  flags.DEFINE_string("workdir", None, "Where the runs and the table go (default: runs/methods).")


def pretrain_config(base, method: str, seed: int) -> ml_collections.ConfigDict:
  """The shared pretraining recipe with this method and seed."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.method, config.seed = method, seed
  return config


def finetune_config(
    base, checkpoint: str, seed: int, label_fraction: float, trunk: tuple[str, float]
) -> ml_collections.ConfigDict:
  """The shared fine-tuning recipe from `checkpoint` ('' = scratch) with this seed's labels."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.seed, config.label_fraction = seed, label_fraction
  config.init.kind = "pirl" if checkpoint else "scratch"
  config.init.checkpoint = checkpoint
  config.init.inherit_trunk = False
  config.model.trunk, config.model.width_multiplier = trunk
  return config


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_seconds(scores_by_seed: dict) -> str:
  seconds = [s["seconds"] for s in scores_by_seed.values() if "seconds" in s]
  return f"{np.mean(seconds):.0f}" if seconds else "—"


def markdown_table(rows: dict[str, dict[int, dict]], header: str) -> str:
  """One line per method (mean ± std over seeds), paired differences against PIRL, per seed."""

  def cell(scores_by_seed, key):
    values = [s[key] for s in scores_by_seed.values() if key in s]
    if not values:
      return "—"
    mean, std = _mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"

  lines = [
      header,
      "",
      "| method | kind | final pretext loss | "
      + " | ".join(t for _, t in COLUMNS)
      + " | pretraining time (s) | seeds |",
      "|" + "---|" * (len(COLUMNS) + 5),
  ]
  for name, by_seed in rows.items():
    kind = (
        "invariant"
        if name in methods_lib.BANK_METHODS + methods_lib.TWO_VIEW_METHODS
        else "covariant"
        if name in methods_lib.CLASSIFICATION_METHODS
        else "reference"
    )
    lines.append(
        f"| {TITLES[name]} | {kind} | {cell(by_seed, 'loss')} | "
        + " | ".join(cell(by_seed, key) for key, _ in COLUMNS)
        + f" | {_mean_seconds(by_seed)} | "
        f"{','.join(str(s) for s in sorted(by_seed))} |"
    )
  lines += paired_differences(rows)
  lines += ["", "Per seed (kNN / linear / fine-tune mean AUC):", ""]
  for name, by_seed in rows.items():
    per_seed = "; ".join(
        f"seed {seed}: "
        + " / ".join(f"{s[k]:.3f}" if k in s else "—" for k in ("knn", "linear", "finetune_mean"))
        for seed, s in sorted(by_seed.items())
    )
    lines.append(f"- {TITLES[name]}: {per_seed}")
  return "\n".join(lines)


def paired_differences(rows: dict[str, dict[int, dict]], baseline: str = "pirl") -> list[str]:
  """Each row minus PIRL over the seeds both have: mean ± std, seeds ahead, paired t-test."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  if baseline not in rows:
    return []
  lines = [
      "",
      f"Paired differences against {TITLES[baseline]} (same seeds; scratch and the "
      "random trunk are compared where they have the score):",
      "",
  ]
  base = rows[baseline]
  for name, by_seed in rows.items():
    if name == baseline:
      continue
    for key, title in COLUMNS:
      seeds = [s for s in by_seed if s in base and key in by_seed[s] and key in base[s]]
      if len(seeds) < 2:
        continue
      ours = np.array([by_seed[s][key] for s in seeds])
      theirs = np.array([base[s][key] for s in seeds])
      diff = ours - theirs
      t, p = stats.ttest_rel(ours, theirs)
      lines.append(
          f"- {TITLES[name]} − {TITLES[baseline]}, {title}: {np.mean(diff):+.3f} ± "
          f"{np.std(diff, ddof=1):.3f} over {len(seeds)} seeds (ahead on "
          f"{int(np.sum(diff > 0))}), paired t = {t:.2f}, p = {p:.3g}"
      )
  return lines


def plot(rows: dict[str, dict[int, dict]], path, title: str) -> None:
  """One panel per score: mean ± std bars per method, each seed a dot."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [
      (k, t)
      for k, t in COLUMNS[:3]
      if any(k in s for by_seed in rows.values() for s in by_seed.values())
  ]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    names = [n for n, by_seed in rows.items() if any(key in s for s in by_seed.values())]
    for x, name in enumerate(names):
      values = [s[key] for s in rows[name].values() if key in s]
      mean, std = _mean_std(values)
      color = (
          "tab:blue"
          if name in methods_lib.BANK_METHODS + methods_lib.TWO_VIEW_METHODS
          else "tab:orange"
          if name in methods_lib.CLASSIFICATION_METHODS
          else "tab:gray"
      )
      ax.bar(x, mean, yerr=std, color=color, alpha=0.7, capsize=3)
      ax.plot([x] * len(values), values, "k.", markersize=4)
    ax.set_xticks(
        range(len(names)), [TITLES[n] for n in names], rotation=40, ha="right", fontsize=8
    )
    ax.set_ylabel(label)
    lows = [s[key] for n in names for s in rows[n].values() if key in s]
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.05))
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(title + "  (blue: invariant, orange: covariant, grey: reference)", fontsize=9)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def _pretraining_scores(summary: dict) -> dict:
  probe = summary.get("evaluations", {}).get("probe", {})
  scores = {
      "loss": float(summary["metrics"]["loss"]),
      "seconds": float(summary.get("wall_seconds", float("nan"))),
  }
  if probe:
    scores.update(knn=probe["knn_auc_mean"], linear=probe["linear_auc_mean"])
  return scores


def _finetune_scores(metrics: dict) -> dict:
  return {
      "finetune_mean": metrics["test"]["auc_mean"],
      "finetune_melanoma": metrics["test"]["auc_melanoma"],
  }


def run_comparison(
    pretrain_base,
    finetune_base,
    workdir: str,
    method_names: list[str],
    seeds: list[int],
    label_fraction: float,
) -> tuple[dict, str]:
  """Runs (or reuses) every method x seed and its evaluations. Returns (rows, Markdown table)."""
  from pirl_jax import configuration  # pylint: disable=g-import-not-at-top
  from pirl_jax.tasks import finetune  # pylint: disable=g-import-not-at-top
  from pirl_jax.commands import probe  # pylint: disable=g-import-not-at-top
  from pirl_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top

  unknown = [m for m in method_names if m not in methods_lib.METHODS]
  if unknown or not method_names:
    raise user_errors.UserError(
        f"--methods={','.join(method_names)}: choose from " f"{', '.join(methods_lib.METHODS)}."
    )
  if not 0.0 <= label_fraction <= 1.0:
    raise user_errors.UserError(f"--label_fraction={label_fraction} must be in [0, 1].")
  if not seeds:
    raise user_errors.UserError("--seeds is empty.")
  # Every config is checked before the first run starts.
  for method in method_names:
    configuration.validate_pretrain_config(pretrain_config(pretrain_base, method, seeds[0]))
  trunk = (pretrain_base.model.trunk, float(pretrain_base.model.width_multiplier))
  if label_fraction > 0:
    configuration.validate_finetune_config(
        finetune_config(finetune_base, "", seeds[0], label_fraction, trunk)
    )

  root = storage.path(workdir)
  rows: dict[str, dict[int, dict]] = {m: {} for m in method_names}
  total = len(method_names) * len(seeds)
  start = time.time()
  for done, (seed, method) in enumerate(((s, m) for s in seeds for m in method_names)):
    run_dir = root / method / f"seed{seed}"
    logging.info(
        "Pretraining %d/%d: %s, seed %d -> %s (%.0f min so far).",
        done + 1,
        total,
        method,
        seed,
        run_dir,
        (time.time() - start) / 60,
    )
    summary = pretrain.train_and_evaluate(
        pretrain_config(pretrain_base, method, seed), str(run_dir)
    )
    compare.stop_if_preempted(summary, f"Pretraining {method}, seed {seed},")
    rows[method][seed] = _pretraining_scores(summary)

  # The random trunk's probes, per seed, on the same data as the runs' probes.
  rows["random"] = {}
  for seed in seeds:
    path = root / "random" / f"seed{seed}" / "probe.json"
    if not path.is_file():
      first = root / method_names[0] / f"seed{seed}"
      result = probe.run_probe(str(first), random_seed=seed)
      random_row = next(v for k, v in result["results"].items() if k.startswith("random"))
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(random_row, indent=2))
    random_row = json.loads(path.read_text())
    rows["random"][seed] = {
        "knn": random_row["knn_auc_mean"],
        "linear": random_row["linear_auc_mean"],
    }

  if label_fraction > 0:
    rows["scratch"] = {}
    # Arm by arm (scratch, then --methods in order), so that the first rows fill up first.
    for name in ["scratch"] + method_names:
      for seed in seeds:
        run_dir = root / name / (f"seed{seed}" if name == "scratch" else f"seed{seed}-finetune")
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file():
          source = "" if name == "scratch" else str(root / name / f"seed{seed}")
          logging.info(
              "Fine-tuning %s, seed %d, label_fraction %g -> %s.",
              name,
              seed,
              label_fraction,
              run_dir,
          )
          compare.stop_if_preempted(
              finetune.train_and_evaluate(
                  finetune_config(finetune_base, source, seed, label_fraction, trunk), str(run_dir)
              ),
              f"Fine-tuning {name}, seed {seed},",
          )
        rows[name].setdefault(seed, {}).update(
            _finetune_scores(json.loads(metrics_path.read_text()))
        )

  steps = pretrain_base.num_train_steps
  length = f"{steps} steps" if steps > 0 else f"{pretrain_base.num_epochs:g} epochs"
  budget = (
      f"{pretrain_base.name}: {trunk[0]} x{trunk[1]:g}, {length}, batch "
      f"{pretrain_base.global_batch_size}"
  )
  header = (
      f"Pretraining methods on the same budget ({budget}); probes on the held-out split, "
      f"fine-tuning at label_fraction={label_fraction:g} (test AUC of the best validation "
      "state); mean ± std over seeds."
  )
  table = markdown_table(rows, header)
  root.mkdir(parents=True, exist_ok=True)
  (root / "methods.md").write_text(table + "\n")
  (root / "methods.json").write_text(
      json.dumps(
          dict(
              methods=method_names,
              seeds=seeds,
              label_fraction=label_fraction,
              pretrain_config=pretrain_base.to_dict(),
              rows={k: {str(s): v for s, v in r.items()} for k, r in rows.items()},
          ),
          indent=2,
          default=str,
      )
  )
  plot(rows, root / "methods.png", f"{budget}, label_fraction={label_fraction:g}")
  return rows, table


def _main(argv):
  if len(argv) > 1:
    raise user_errors.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise user_errors.UserError(f"--seeds={','.join(FLAGS.seeds)}: expected integers.") from None
  workdir = FLAGS.workdir or "runs/methods"
  try:
    _, table = run_comparison(
        FLAGS.pretrain_config,
        FLAGS.finetune_config,
        workdir,
        FLAGS.methods,
        seeds,
        FLAGS.label_fraction,
    )
  except compare.Preempted as stopped:
    print(f"\n{stopped}")
    return
  print("\n" + table + f"\n\n(written to {storage.path(workdir) / 'methods.md'})")


def main(argv=None) -> int:
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top

  define_flags()
  return program.run_program(_main, argv or sys.argv)


if __name__ == "__main__":
  sys.exit(main())
