"""The `step`, `mfu`, `overhead` and `compile` benchmarks: the repo's full PIRL train step.

The step is built as `pirl_jax.tasks.pretrain` builds it (create_model / create_optimizer /
create_train_state / jit_train_step on `sharding.create_mesh`) and fed random batches of the
pipeline's shapes: "image" (B, S, S, 3) float32, "tiles" (B, 9, T, T, 3) float32 and "index" (B,)
int32 (distinct dataset indices).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import numpy as np

from benchmarks import common
from pirl_jax import configuration
from pirl_jax import sharding as sharding_lib
from pirl_jax.models import resnet
from pirl_jax.train import state as state_lib
from pirl_jax.train import step as step_lib

# Settings: a configs/pirl.py preset, the overrides applied to it, and the bank size (rows).
SETTINGS: dict[str, dict[str, Any]] = {
    # ResNet-50, batch 8, 224 px image, 64 px tiles (255 px jigsaw crop), K=1000, 2000 rows.
    # Fewer repetitions by default: a step takes seconds on a CPU (the torch "published" layout
    # about a minute on 2 cores).
    "resnet50": dict(
        preset="isic",
        num_examples=2000,
        overrides={"global_batch_size": 8, "loss.num_negatives": 1000},
        reps=3,
        steps=2,
        warmup=1,
    ),
    # configs/pirl.py:default as it is (ResNet-18 x0.25, batch 64, 64/75/19 px, K=1000) on the
    # 2000 images of the synthetic set.
    "default": dict(preset="default", num_examples=2000, overrides={}),
    # The imagenet preset's step for one accelerator host: ResNet-50, 224 px image, 64 px tiles,
    # NCE with K=32000 negatives from a 1.28M-row bank, global batch 256 over the host's devices.
    # Seconds or more per step on a CPU: meant for a GPU or TPU host (docs/cloud.md).
    "imagenet": dict(
        preset="imagenet",
        num_examples=1_281_167,
        overrides={"global_batch_size": 256},
        reps=3,
        steps=2,
        warmup=1,
    ),
    # Smoke size (--quick): the tiny preset.
    "tiny": dict(preset="tiny", num_examples=256, overrides={}),
}
DEFAULT_PLAN = dict(reps=5, steps=3, warmup=2)
QUICK_PLAN = dict(reps=3, steps=2, warmup=1)


def plan(opts, setting: str) -> tuple[int, int, int]:
  """(reps, steps per rep, warm-up steps): the flags where given, else the setting's defaults."""
  base = (
      QUICK_PLAN
      if opts.quick
      else {k: SETTINGS.get(setting, {}).get(k, v) for k, v in DEFAULT_PLAN.items()}
  )
  return tuple(
      getattr(opts, k) if getattr(opts, k) is not None else base[k]
      for k in ("reps", "steps", "warmup")
  )


# What the PyTorch reference can build (its --arch choices; --width = first-stage channels).
TORCH_ARCHS = ("resnet18", "resnet34", "resnet50")
TORCH_LAYOUTS = {
    "batched_cl": ["--layout", "batched", "--channels-last"],
    "published": ["--layout", "published"],
}


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_module():
  """configs/pirl.py: importable from the repo root, else loaded from the repo by path."""
  try:
    from configs import pirl  # pylint: disable=g-import-not-at-top

    return pirl
  except ImportError:
    import importlib.util  # pylint: disable=g-import-not-at-top

    path = REPO_ROOT / "configs" / "pirl.py"
    spec = importlib.util.spec_from_file_location("pirl_bench_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(setting: str):
  """configs/pirl.py's preset for `setting` with the setting's overrides."""
  spec = SETTINGS[setting]
  pirl_configs = _config_module()
  config = pirl_configs.get_config(spec["preset"])
  if spec["overrides"]:
    config.update_from_flattened_dict(dict(spec["overrides"]))
  return config


def describe(config, num_examples: int, num_devices: int) -> dict[str, Any]:
  v = config.data.views
  return {
      "trunk": config.model.trunk,
      "width_multiplier": config.model.width_multiplier,
      "dtype": config.model.dtype,
      "batch": config.global_batch_size,
      "image": v.image_size,
      "tile": v.tile_size,
      "grid": v.grid,
      "negatives": config.loss.num_negatives,
      "loss": config.loss.kind,
      "bank_rows": num_examples,
      "devices": num_devices,
  }


def random_batch(config, num_examples: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the pipeline's keys, shapes and dtypes, with random values."""
  rs = np.random.RandomState(seed)
  v, b = config.data.views, config.global_batch_size
  return {
      "image": rs.randn(b, v.image_size, v.image_size, 3).astype(np.float32),
      "tiles": rs.randn(b, v.grid**2, v.tile_size, v.tile_size, 3).astype(np.float32),
      "index": rs.permutation(num_examples)[:b].astype(np.int32),
  }


@dataclasses.dataclass
class BuiltStep:
  setting: str
  config: Any
  num_examples: int
  mesh: Any
  model: Any
  tx: Any
  schedule: Any
  shardings: Any
  batch: dict
  settings: dict

  def jit(self):
    """A fresh jitted train step (state donated), as pretrain.py builds it."""
    config = self.config
    return step_lib.jit_train_step(
        self.mesh,
        self.shardings,
        model=self.model,
        tx=self.tx,
        schedule=self.schedule,
        loss_cfg=config.loss,
        bank_momentum=config.memory_bank.momentum,
        num_examples=self.num_examples,
        score_chunk_size=config.memory_bank.score_chunk_size,
        skip_nonfinite=config.skip_nonfinite_steps,
    )

  def new_state(self):
    state, _ = state_lib.create_train_state(
        self.config, self.model, self.tx, self.num_examples, self.mesh, self.config.seed
    )
    return state


def build(setting: str, num_devices: int = 0, num_examples: int | None = None) -> BuiltStep:
  config = get_config(setting)
  config.num_devices = num_devices
  num_examples = num_examples or SETTINGS[setting]["num_examples"]
  devices = configuration.select_devices(config, jax.devices(), jax.process_count())
  mesh = sharding_lib.create_mesh(devices)
  configuration.validate_pretrain_config(config)
  configuration.check_device_count(config, mesh.size)
  configuration.validate_dataset_size(config, num_examples)
  sched = configuration.resolve_schedule(config, num_examples)
  model = state_lib.create_model(config.model)
  tx, lr_schedule = state_lib.create_optimizer(
      config.optim, sched.learning_rate, sched.warmup_steps, sched.total_steps
  )
  _, shardings = state_lib.abstract_train_state(config, model, tx, num_examples, mesh)
  batch = sharding_lib.global_batch(random_batch(config, num_examples), mesh)
  return BuiltStep(
      setting,
      config,
      num_examples,
      mesh,
      model,
      tx,
      lr_schedule,
      shardings,
      batch,
      describe(config, num_examples, mesh.size),
  )


def compile_step(built: BuiltStep):
  """A fresh jitted step compiled ahead of time for a fresh state.

  Returns (compiled, state, timings) with timings {"lower_s", "compile_s"} in wall seconds.
  """
  state = jax.block_until_ready(built.new_state())
  fn = built.jit()
  t0 = time.perf_counter()
  lowered = fn.lower(state, built.batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, state, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def time_jax_step(
    built: BuiltStep, compiled, state, *, reps: int, warmup: int, steps: int
) -> tuple[list[float], Any]:
  """Seconds per step, one value per repetition of `steps` steps (after `warmup` steps).

  Returns (times, the state after the last step): the state is donated at every step.
  """
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], built.batch)
    return holder["state"], metrics

  times = common.time_reps(one, reps=reps, warmup=warmup, inner=steps, block=jax.block_until_ready)
  return times, holder["state"]


# ------------------------------------------------------------------------------------------------
# PyTorch reference (a subprocess per repetition).


def default_torch_script() -> str:
  """The project's PyTorch reference, benchmarks/torch_reference.py (next to this file)."""
  return str(pathlib.Path(__file__).resolve().with_name("torch_reference.py"))


def torch_args(config, num_examples: int) -> tuple[list[str] | None, str]:
  """The torch reference's flags for the same work, or (None, why not)."""
  trunk = config.model.trunk
  if trunk not in TORCH_ARCHS:
    return None, (
        f"skipped: trunk {trunk} not in the torch reference " f"(--arch {'|'.join(TORCH_ARCHS)})"
    )
  width = 64 * config.model.width_multiplier
  if width != int(width):
    return None, f"skipped: width 64 x {config.model.width_multiplier} is not an integer"
  if config.model.head != "linear":
    return None, "skipped: the torch reference has linear heads only"
  v = config.data.views
  if v.grid != 3:
    return None, "skipped: the torch reference has a 3x3 grid only"
  return [
      "--arch",
      trunk,
      "--width",
      str(int(width)),
      "--batch",
      str(config.global_batch_size),
      "--image",
      str(v.image_size),
      "--tile",
      str(v.tile_size),
      "--bank",
      str(num_examples),
      "--negatives",
      str(config.loss.num_negatives),
  ], "ok"


def run_torch_once(
    script: str,
    args: list[str],
    layout: str,
    *,
    steps: int,
    warmup: int,
    threads: int = 0,
    timeout: float = 1800,
) -> dict:
  cmd = [
      sys.executable,
      script,
      *args,
      *TORCH_LAYOUTS[layout],
      "--steps",
      str(steps),
      "--warmup",
      str(warmup),
  ]
  if threads:
    cmd += ["--threads", str(threads)]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
  lines = [l for l in out.stdout.splitlines() if l.strip().startswith("{")]
  return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# Benchmarks.

_MEASURED: dict[str, dict[str, Any]] = {}  # setting -> {"built", "step_s"}: reused by mfu/overhead


def _prepared(setting: str, opts) -> dict[str, Any]:
  """The setting's built and compiled step (compiled once per process, reused by mfu/overhead)."""
  key = f"{setting}/{opts.devices}"
  if key not in _MEASURED:
    built = build(setting, opts.devices)
    compiled, state, timings = compile_step(built)
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, built.batch))
    timings["first_run_s"] = time.perf_counter() - t0
    _MEASURED[key] = {
        "built": built,
        "compiled": compiled,
        "state": state,
        "timings": timings,
        "times": None,
    }
  return _MEASURED[key]


def measured_step(setting: str, opts) -> tuple[BuiltStep, float, list[float]]:
  """The setting's built step and its median JAX step time (measured once per process)."""
  m = _prepared(setting, opts)
  if m["times"] is None:
    reps, steps, warmup = plan(opts, setting)
    m["times"], m["state"] = time_jax_step(
        m["built"], m["compiled"], m["state"], reps=reps, warmup=warmup, steps=steps
    )
  return m["built"], common.median(m["times"]), m["times"]


def bench_step(opts, emit) -> list[dict]:
  """JAX step images/s, alternating repetitions with the torch reference in both layouts."""
  out = []
  torch = None if opts.torch == "none" else common.import_torch()
  script = opts.torch_script or default_torch_script()
  for setting in opts.settings:
    prepared = _prepared(setting, opts)
    built, step_fn, state = prepared["built"], prepared["compiled"], prepared["state"]
    batch_size = built.config.global_batch_size
    first_call_s = sum(prepared["timings"].values())  # lower + compile + first run
    targs, why = torch_args(built.config, built.num_examples)
    layouts = [l for l in opts.torch_layouts if l in TORCH_LAYOUTS]
    if torch is None:
      why = common.TORCH_MISSING if opts.torch != "none" else "skipped: --torch=none"
    elif not os.path.isfile(script):
      why = f"skipped: torch reference {script} not found (--torch_script)"
    run_torch = why == "ok" and targs is not None
    jax_times: list[float] = []
    torch_times: dict[str, list[float]] = {l: [] for l in layouts}
    torch_info: dict[str, dict] = {}
    errors: dict[str, str] = {}
    reps, steps, warmup = plan(opts, setting)
    for rep in range(reps):
      holder = {"state": state}

      def one():
        holder["state"], metrics = step_fn(holder["state"], built.batch)
        return holder["state"], metrics

      jax_times += common.time_reps(
          one, reps=1, warmup=warmup if rep == 0 else 0, inner=steps, block=jax.block_until_ready
      )
      state = holder["state"]
      if run_torch:
        for layout in layouts:
          if layout in errors:
            continue
          try:
            res = run_torch_once(
                script,
                targs,
                layout,
                steps=steps,
                warmup=opts.torch_warmup,
                threads=opts.torch_threads,
            )
            torch_times[layout].append(float(res["step_s"]))
            torch_info[layout] = res
          except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            errors[layout] = f"error: {e}"[:500]
    prepared.update(times=jax_times, state=state)
    jax_s = common.median(jax_times)
    settings = dict(
        built.settings,
        reps=reps,
        steps_per_rep=steps,
        warmup=warmup,
        torch_warmup=opts.torch_warmup,
    )
    out.append(
        emit(
            common.make_record(
                "step",
                "jax_images_per_s",
                batch_size / jax_s,
                "images/s",
                settings=settings,
                values=[batch_size / t for t in jax_times],
                step_s=jax_s,
                setting=setting,
                first_call_s=first_call_s,
            )
        )
    )
    for layout in layouts:
      tsettings = dict(settings, layout=layout, torch_args=(targs or []) + TORCH_LAYOUTS[layout])
      if torch_times[layout]:
        t_s = common.median(torch_times[layout])
        info = torch_info.get(layout, {})
        out.append(
            emit(
                common.make_record(
                    "step",
                    f"torch_{layout}_images_per_s",
                    batch_size / t_s,
                    "images/s",
                    settings=tsettings,
                    values=[batch_size / t for t in torch_times[layout]],
                    step_s=t_s,
                    setting=setting,
                    torch_threads=info.get("threads"),
                )
            )
        )
        out.append(
            emit(
                common.make_record(
                    "step",
                    f"ratio_jax_over_torch_{layout}",
                    t_s / jax_s,
                    "x",
                    settings=tsettings,
                    setting=setting,
                )
            )
        )
      else:
        status = errors.get(layout, why)
        for name, unit in (
            (f"torch_{layout}_images_per_s", "images/s"),
            (f"ratio_jax_over_torch_{layout}", "x"),
        ):
          out.append(
              emit(
                  common.make_record(
                      "step", name, None, unit, settings=tsettings, status=status, setting=setting
                  )
              )
          )
  return out


def matmul_peaks(n: int, reps: int, torch_mode: str = "auto") -> dict[str, dict]:
  """FLOP/s of an n x n x n float32 matmul in XLA, NumPy BLAS and (if installed) torch."""
  flops = 2.0 * n**3
  rs = np.random.RandomState(0)
  a = rs.randn(n, n).astype(np.float32)
  b = rs.randn(n, n).astype(np.float32)
  peaks: dict[str, dict] = {}
  # BLAS libraries first: XLA's CPU thread pool keeps spinning for a while after a computation.
  t = common.time_reps(lambda: np.dot(a, b), reps=reps, warmup=2)
  peaks["numpy"] = {"flops_per_s": flops / common.median(t), "status": "ok"}
  torch = None if torch_mode == "none" else common.import_torch()
  if torch is None:
    peaks["torch"] = {
        "flops_per_s": None,
        "status": common.TORCH_MISSING if torch_mode != "none" else "skipped: --torch=none",
    }
  else:
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t = common.time_reps(lambda: torch.mm(ta, tb), reps=reps, warmup=2)
    peaks["torch"] = {
        "flops_per_s": flops / common.median(t),
        "status": "ok",
        "threads": torch.get_num_threads(),
    }
  dev = jax.devices()[0]
  ja, jb = jax.device_put(a, dev), jax.device_put(b, dev)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  t = common.time_reps(lambda: mm(ja, jb), reps=reps, warmup=2, block=jax.block_until_ready)
  peaks["xla"] = {"flops_per_s": flops / common.median(t), "status": "ok"}
  return peaks


def bench_mfu(opts, emit) -> list[dict]:
  """FLOPs of the compiled step (XLA cost analysis) / step time / the measured matmul peak."""
  out = []
  n = opts.matmul_size
  peaks = matmul_peaks(n, max(3, opts.reps or 5), opts.torch)
  for src, p in peaks.items():
    out.append(
        emit(
            common.make_record(
                "mfu",
                f"peak_matmul_{src}",
                p["flops_per_s"],
                "FLOP/s",
                status=p["status"],
                settings={"matmul_size": n, "dtype": "float32"},
            )
        )
    )
  peak_src = max(
      (s for s in peaks if peaks[s]["flops_per_s"]), key=lambda s: peaks[s]["flops_per_s"]
  )
  peak = peaks[peak_src]["flops_per_s"]
  for setting in opts.settings:
    built, step_s, _ = measured_step(setting, opts)
    flops = common.cost_flops(_prepared(setting, opts)["compiled"])
    # Under SPMD the cost analysis is of one device's program: scale to the whole step.
    total = None if flops is None else flops * built.mesh.size
    settings = dict(built.settings, matmul_size=n, peak_source=peak_src)
    out.append(
        emit(
            common.make_record(
                "mfu",
                "step_flops",
                total,
                "FLOP",
                settings=settings,
                setting=setting,
                status="ok" if total else "unavailable: no flops in cost_analysis()",
                flops_per_device_program=flops,
            )
        )
    )
    achieved = None if total is None else total / step_s
    out.append(
        emit(
            common.make_record(
                "mfu",
                "achieved_flops_per_s",
                achieved,
                "FLOP/s",
                settings=settings,
                setting=setting,
                step_s=step_s,
                status="ok" if achieved else "unavailable",
            )
        )
    )
    out.append(
        emit(
            common.make_record(
                "mfu",
                "mfu",
                None if achieved is None else achieved / peak,
                "fraction",
                settings=settings,
                setting=setting,
                peak_flops_per_s=peak,
                peaks={k: v["flops_per_s"] for k, v in peaks.items()},
                status="ok" if achieved else "unavailable",
            )
        )
    )
  return out


def trunk_fwd_bwd(built: BuiltStep, state):
  """(jitted fn, params, images, tiles): the bare trunk, forward + backward on images and tiles.

  The trunk's parameters and BatchNorm statistics are the step's (`state`): no heads, bank or
  optimizer; a plain sum of the pooled features of both passes as the loss.
  """
  config = built.config
  trunk = resnet.get_trunk(
      config.model.trunk,
      width_multiplier=config.model.width_multiplier,
      dtype=state_lib.compute_dtype(config.model.dtype),
  )
  images, tiles = built.batch["image"], built.batch["tiles"]
  params = jax.tree.map(jnp.copy, state.params["trunk"])
  batch_stats = jax.tree.map(jnp.copy, state.batch_stats["trunk"])

  def loss_fn(p, imgs, tls):
    flat = tls.reshape((-1,) + tls.shape[2:])
    t, _ = trunk.apply(
        {"params": p, "batch_stats": batch_stats}, flat, train=True, mutable=["batch_stats"]
    )
    i, _ = trunk.apply(
        {"params": p, "batch_stats": batch_stats}, imgs, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(t) + jnp.sum(i)

  rep = sharding_lib.replicated(built.mesh)
  bsh = sharding_lib.batch_sharding(built.mesh)
  fn = jax.jit(jax.grad(loss_fn), in_shardings=(rep, bsh, bsh), out_shardings=rep)
  return fn, params, images, tiles


def bench_overhead(opts, emit) -> list[dict]:
  """Full step time / bare trunk forward+backward time on the same shapes."""
  out = []
  for setting in opts.settings:
    built, step_s, _ = measured_step(setting, opts)
    fn, params, images, tiles = trunk_fwd_bwd(built, _prepared(setting, opts)["state"])
    reps, steps, warmup = plan(opts, setting)
    times = common.time_reps(
        lambda: fn(params, images, tiles),
        reps=reps,
        warmup=max(1, warmup),
        inner=steps,
        block=jax.block_until_ready,
    )
    trunk_s = common.median(times)
    settings = dict(built.settings, reps=reps, steps_per_rep=steps)
    out.append(
        emit(
            common.make_record(
                "overhead",
                "trunk_fwd_bwd_s",
                trunk_s,
                "s",
                settings=settings,
                values=times,
                setting=setting,
            )
        )
    )
    out.append(
        emit(
            common.make_record(
                "overhead", "step_s", step_s, "s", settings=settings, setting=setting
            )
        )
    )
    out.append(
        emit(
            common.make_record(
                "overhead",
                "step_over_trunk",
                step_s / trunk_s,
                "x",
                settings=settings,
                setting=setting,
            )
        )
    )
  return out


def bench_compile(opts, emit) -> list[dict]:
  """Wall seconds of lowering and compiling a fresh jitted step, and of its first call.

  The persistent compilation cache is switched off (and reset) for the measurement, so that the
  compile is cold, unless `opts.compile_cache` (then a cached program makes it a warm compile;
  the records' settings say which).
  """

  out = []
  previous = jax.config.jax_enable_compilation_cache
  use_cache = bool(opts.compile_cache and previous and jax.config.jax_compilation_cache_dir)
  if not opts.compile_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
  try:
    for setting in opts.compile_settings:
      built = build(setting, opts.devices)
      settings = dict(built.settings, persistent_cache=use_cache)
      compiled, state, timings = compile_step(built)
      t0 = time.perf_counter()
      state, metrics = jax.block_until_ready(compiled(state, built.batch))
      first_run_s = time.perf_counter() - t0
      lower_s, compile_s = timings["lower_s"], timings["compile_s"]
      for name, value in (
          ("lower_s", lower_s),
          ("compile_s", compile_s),
          ("lower_plus_compile_s", lower_s + compile_s),
          ("first_run_s", first_run_s),
          ("first_call_s", lower_s + compile_s + first_run_s),
      ):
        out.append(
            emit(
                common.make_record("compile", name, value, "s", settings=settings, setting=setting)
            )
        )
      del state, metrics, compiled
  finally:
    if not opts.compile_cache:
      jax.config.update("jax_enable_compilation_cache", previous)
      compilation_cache.reset_cache()
  return out
