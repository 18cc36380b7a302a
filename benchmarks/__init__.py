"""Benchmarks of the PIRL implementation: `python -m benchmarks <benchmark>` from the repo root.

  step      images/s of the full train step (ResNet-50 and the default preset), alternating
            repetitions with the PyTorch reference (benchmarks/torch_reference.py) in both its
            layouts; JAX/torch ratios.
  mfu       FLOPs of the compiled step (XLA cost analysis) / step time / peak matmul FLOP/s
            measured in the same run (XLA, NumPy BLAS, torch if installed; the highest is used).
  overhead  full step time / bare trunk forward+backward time on the same shapes.
  pipeline  examples/s of the tf.data jigsaw pipeline vs a per-image PIL/NumPy baseline, and the
            rate at which the step consumes images.
  bank      the memory bank at ImageNet scale sharded over 8 fake CPU devices: bytes per device,
            the largest collective and the collective bytes per step, temporaries, step time of
            sampling + scoring (with the query gradient) + write, the bank kept row-sharded.
  compile   lower / compile / first-call wall seconds of the ResNet-50 step.
  all       all of the above (the bank in a subprocess with 8 fake devices).

Each measurement is one JSON line on stdout (and appended to --results=FILE). docs/benchmarks.md has
the commands and the tables. The suite is not part of the `pirl_jax` package: it imports
`pirl_jax`, never the other way round, and torch is optional (requirements-bench.txt).
"""
