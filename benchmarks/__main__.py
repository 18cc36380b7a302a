"""CLI: `python -m benchmarks <benchmark> [flags]`; see benchmarks/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys

BENCHMARKS = ("step", "mfu", "overhead", "pipeline", "bank", "compile", "all")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="PIRL benchmarks; each measurement is printed as one JSON line.",
  )
  p.add_argument("benchmark", choices=BENCHMARKS)
  p.add_argument(
      "--quick",
      action="store_true",
      help="smoke sizes: the tiny preset (resnet_tiny, 32 px), few repetitions, a "
      "small bank; well under a minute",
  )
  p.add_argument("--results", default="", help="also append each JSON line to this file")
  p.add_argument(
      "--setting",
      default="",
      help="comma-separated step settings: resnet50, imagenet, default, tiny "
      "(default: resnet50,default; tiny with --quick; imagenet is for an "
      "accelerator host)",
  )
  p.add_argument(
      "--devices",
      type=int,
      default=0,
      help="devices of the step's mesh (0 = all, as config.num_devices)",
  )
  p.add_argument(
      "--reps",
      type=int,
      default=None,
      help="timed repetitions, the median is reported (default 5; resnet50 step: 3; " "--quick: 3)",
  )
  p.add_argument(
      "--warmup",
      type=int,
      default=None,
      help="untimed warm-up steps/calls (default 2; resnet50 step: 1; --quick: 1)",
  )
  p.add_argument(
      "--steps",
      type=int,
      default=None,
      help="steps per timed repetition (default 3; resnet50 step: 2; --quick: 2)",
  )
  p.add_argument(
      "--torch",
      choices=("auto", "none"),
      default="auto",
      help="auto: the PyTorch reference if `import torch` works; none: skip it",
  )
  p.add_argument(
      "--torch_script",
      default="",
      help="the PyTorch reference script to run (default: " "benchmarks/torch_reference.py)",
  )
  p.add_argument(
      "--torch_layouts",
      default="batched_cl,published",
      help="comma-separated: batched_cl (--layout batched --channels-last), published",
  )
  p.add_argument(
      "--torch_warmup",
      type=int,
      default=1,
      help="the torch reference's --warmup (untimed steps in each of its runs)",
  )
  p.add_argument("--torch_threads", type=int, default=0, help="torch --threads (0: its default)")
  p.add_argument("--matmul_size", type=int, default=None, help="mfu: n of the n^3 peak matmul")
  p.add_argument(
      "--compile_setting",
      default="",
      help="compile: settings to compile (default resnet50; tiny with --quick)",
  )
  p.add_argument(
      "--compile_cache",
      action="store_true",
      help="compile: keep the persistent compilation cache on (a warm compile when "
      "JAX_COMPILATION_CACHE_DIR holds the program)",
  )
  # pipeline
  p.add_argument("--batches", type=int, default=None, help="pipeline: batches per repetition")
  p.add_argument(
      "--pipeline_images",
      type=int,
      default=None,
      help="pipeline: use only the first N images, prepared uncached (0 = the whole "
      "source, as pretrain.py builds it)",
  )
  p.add_argument(
      "--data_path",
      default="",
      help="pipeline: an ISIC-layout folder instead of the cached synthetic set",
  )
  p.add_argument(
      "--no_pil", dest="pil", action="store_false", help="pipeline: skip the PIL/NumPy baseline"
  )
  p.add_argument(
      "--step_rate",
      default="",
      help="pipeline: images/s the step consumes, e.g. default=850,resnet50=2.1",
  )
  p.add_argument(
      "--measure_step_rate",
      action="store_true",
      help="pipeline: measure the JAX step for the same setting",
  )
  # bank
  p.add_argument("--bank_rows", type=int, default=None, help="bank: N (default 1,281,167)")
  p.add_argument("--bank_negatives", type=int, default=None, help="bank: K (default 32000)")
  p.add_argument("--bank_batch", type=int, default=None, help="bank: global batch (default 256)")
  p.add_argument("--bank_devices", type=int, default=8, help="bank: devices the bank is split over")
  p.add_argument(
      "--bank_chunk", type=int, default=None, help="bank: columns scored at a time (default 256)"
  )
  p.add_argument(
      "--bank_reps",
      type=int,
      default=None,
      help="bank: timed steps per path, after one warm-up step (default 3)",
  )
  p.add_argument(
      "--bank_memory_fraction",
      type=float,
      default=0.7,
      help="bank: skip timing a path whose memory_analysis total (all devices) "
      "exceeds this fraction of MemAvailable",
  )
  p.add_argument(
      "--bank_force", action="store_true", help="bank: time every path whatever its memory need"
  )
  p.add_argument("--no_reexec", action="store_true", help=argparse.SUPPRESS)
  opts = p.parse_args(argv)
  opts.passthrough = [
      a for a in (sys.argv[1:] if argv is None else argv) if a not in BENCHMARKS
  ] + ["--no_reexec"]
  quick = opts.quick
  # reps/steps/warmup stay None when not given: train_step.plan() picks per-setting defaults.
  defaults = dict(
      matmul_size=1024 if quick else 2048,
      batches=2 if quick else 10,
      pipeline_images=48 if quick else 0,
      bank_rows=4096 if quick else 1_281_167,
      bank_negatives=255 if quick else 32000,
      bank_batch=32 if quick else 256,
      bank_chunk=64 if quick else 256,
  )
  for k, v in defaults.items():
    if getattr(opts, k) is None:
      setattr(opts, k, v)
  opts.other_reps = opts.reps if opts.reps is not None else (3 if quick else 5)
  opts.other_warmup = opts.warmup if opts.warmup is not None else (1 if quick else 2)
  if opts.bank_reps is None:
    opts.bank_reps = opts.reps if opts.reps is not None else 3
  opts.settings = [
      s for s in (opts.setting or ("tiny" if quick else "resnet50,default")).split(",") if s
  ]
  opts.compile_settings = [
      s for s in (opts.compile_setting or ("tiny" if quick else "resnet50")).split(",") if s
  ]
  opts.torch_layouts = [s for s in opts.torch_layouts.split(",") if s]
  return opts


def run(opts, emit) -> list[dict]:
  """Runs `opts.benchmark` ('all': each in turn, the bank last), emitting records."""
  from benchmarks import bank  # pylint: disable=g-import-not-at-top
  from benchmarks import pipeline  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top

  table = {
      "step": train_step.bench_step,
      "mfu": train_step.bench_mfu,
      "overhead": train_step.bench_overhead,
      "pipeline": pipeline.bench_pipeline,
      "compile": train_step.bench_compile,
      "bank": bank.bench_bank,
  }
  names = [b for b in BENCHMARKS if b != "all"] if opts.benchmark == "all" else [opts.benchmark]
  out = []
  for name in names:
    out += table[name](opts, emit)
  return out


def main(argv=None) -> None:
  opts = parse_args(argv)
  if opts.benchmark == "bank" and "jax" not in sys.modules:
    # XLA reads this when jax starts its backend: it must be set before jax is imported.
    flag = f"--xla_force_host_platform_device_count={opts.bank_devices}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  emit = common.Emitter(opts.results or None)
  run(opts, emit)


if __name__ == "__main__":
  main()
