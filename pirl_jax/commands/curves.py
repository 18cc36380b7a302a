r"""Learning curves: the probes' scores against the pretraining step, for one or more runs.

  python -m pirl_jax.commands.curves runs/pirl runs/pirl-quality --out=curves.png \
      [--random=0.54,0.59]   # the random trunk's kNN and linear AUC, drawn as dashed lines

Reads each workdir's summary.json (`evaluation_history`, written by the probes that run every
`config.eval_every_steps`), plots kNN and linear-probe mean AUC against the step, and prints the
points as a Markdown table.
"""

from __future__ import annotations

import json
import pathlib
import sys

from pirl_jax import storage

PANELS = (("knn_auc_mean", "kNN mean AUC"), ("linear_auc_mean", "linear-probe mean AUC"))


def read_curve(workdir: str | pathlib.Path) -> list[dict]:
  """[{step, knn_auc_mean, linear_auc_mean, ...}] of a pretraining workdir, in step order."""
  path = storage.path(workdir, absolute=False) / "summary.json"
  if not path.is_file():
    from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

    raise user_errors.UserError(
        f"{path} does not exist: is {workdir} a finished pretraining " "workdir?"
    )
  history = json.loads(path.read_text()).get("evaluation_history", [])
  return [dict(step=h["step"], **h["probe"]) for h in history if "probe" in h]


def plot(
    curves: dict[str, list[dict]],
    out: str | pathlib.Path,
    random: tuple[float, float] | None = None,
) -> None:
  """Two panels (kNN, linear), one line per run; `random` draws the random trunk's level."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(9.0, 3.6), dpi=110)
  FigureCanvasAgg(fig)
  for i, (key, title) in enumerate(PANELS):
    ax = fig.add_subplot(1, 2, i + 1)
    for name, points in curves.items():
      ax.plot([p["step"] for p in points], [p[key] for p in points], marker="o", ms=3, label=name)
    if random is not None:
      ax.axhline(random[i], ls="--", color="grey", lw=1, label="random trunk")
    ax.set(xlabel="pretraining step", ylabel=title, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  storage.save_figure(fig, out)


def markdown(curves: dict[str, list[dict]]) -> str:
  lines = ["| run | step | kNN mean AUC | linear mean AUC |", "|---|---|---|---|"]
  for name, points in curves.items():
    lines += [
        f"| {name} | {p['step']} | {p['knn_auc_mean']:.4f} | {p['linear_auc_mean']:.4f} |"
        for p in points
    ]
  return "\n".join(lines)


def _random_levels(text: str) -> tuple[float, float] | None:
  if not text:
    return None
  try:
    knn, linear = (float(v) for v in text.split(","))
  except ValueError:
    from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

    raise user_errors.UserError(
        f"--random={text!r}: expected the random trunk's kNN and linear "
        "mean AUC, e.g. --random=0.55,0.60."
    ) from None
  return knn, linear


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="pretraining workdirs (name=path to label)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--random", default="", help="random trunk's kNN,linear mean AUC")
  args = parser.parse_args(argv)
  from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

  try:
    curves = {}
    for spec in args.workdirs:
      name, _, path = spec.rpartition("=")
      curves[name or pathlib.Path(path).name] = read_curve(path)
    random = _random_levels(args.random)
  except user_errors.UserError as e:
    parser.exit(2, f"error: {e}\n")
  plot(curves, args.out, random)
  print(markdown(curves))
  print(f"\nWritten to {args.out}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
