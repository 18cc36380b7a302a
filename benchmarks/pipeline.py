"""The `pipeline` benchmark: examples/s of the jigsaw pretraining input pipeline alone.

tf.data (`pirl_jax.data.pipeline.PretrainInput`, both views, JPEG decode included) on the
embedded synthetic set, built as pretrain.py builds it, against `pil_baseline` (one image at a
time in PIL/NumPy), next to the rate at which the train step consumes images.
"""

from __future__ import annotations

import time

from benchmarks import common
from benchmarks import pil_baseline
from benchmarks import train_step
from pirl_jax.data import images as images_lib
from pirl_jax.data import pipeline
from pirl_jax.data import sources


def data_config(setting: str):
  """The setting's config, reading the synthetic set (paper-size presets keep their image side)."""
  config = train_step.get_config(setting)
  config.data.source = "synthetic"
  return config


def load_source(config, data_path: str = "", num_images: int = 0):
  """The pretraining source: pretrain.py's (`sources.create_source`), or a small one.

  With `data_path` (an ISIC-layout folder) or `num_images` > 0, the first `num_images` images
  (all with 0) of that folder or of the cached synthetic set are prepared in memory, uncached.
  """
  if not data_path and num_images <= 0:
    return sources.create_source(config.data)
  root = data_path or str(sources.synthetic_root(config.data))
  items = sources.isic_items(root, "train")
  if num_images > 0:
    items = items[:num_images]
  encoded = [
      images_lib.prepare_image(
          load(), name, min_side=config.data.min_image_side, max_side=config.data.max_image_side
      )
      for name, load in items
  ]
  return sources.InMemorySource(
      name=f"subset:{root}", encoded=encoded, image_names=[n for n, _ in items]
  )


def _rate(batches, batch_size: int, *, reps: int, warmup: int, num_batches: int) -> list[float]:
  for _ in range(warmup):
    next(batches)
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(num_batches):
      next(batches)
    out.append(batch_size * num_batches / (time.perf_counter() - t0))
  return out


def parse_step_rates(text: str) -> dict[str, float]:
  """'default=123.4,resnet50=2.5' -> {'default': 123.4, 'resnet50': 2.5}."""
  out = {}
  for part in filter(None, (text or "").split(",")):
    key, _, value = part.partition("=")
    out[key.strip()] = float(value)
  return out


def bench_pipeline(opts, emit) -> list[dict]:
  out = []
  given_rates = parse_step_rates(opts.step_rate)
  for setting in opts.settings:
    config = data_config(setting)
    views = pipeline.view_config(config.data.views)
    batch_size = config.global_batch_size
    t0 = time.perf_counter()
    source = load_source(config, opts.data_path, opts.pipeline_images)
    load_s = time.perf_counter() - t0
    settings = {
        "image": views.image_size,
        "jigsaw_crop": views.jigsaw_crop_size,
        "tile": views.tile_size,
        "grid": views.grid,
        "batch": batch_size,
        "num_images": source.num_examples,
        "max_image_side": config.data.max_image_side,
        "source": source.name,
        "reps": opts.other_reps,
        "batches_per_rep": opts.batches,
        "num_parallel_calls": config.data.num_parallel_calls,
    }
    data = pipeline.PretrainInput(
        source,
        views,
        seed=config.seed,
        global_batch_size=batch_size,
        num_parallel_calls=config.data.num_parallel_calls,
        prefetch_batches=config.data.prefetch_batches,
    )
    tf_rates = _rate(
        data.iterate(0),
        batch_size,
        reps=opts.other_reps,
        warmup=max(1, opts.other_warmup),
        num_batches=opts.batches,
    )
    tf_rate = common.median(tf_rates)
    out.append(
        emit(
            common.make_record(
                "pipeline",
                "tfdata_examples_per_s",
                tf_rate,
                "examples/s",
                settings=settings,
                values=tf_rates,
                setting=setting,
                source_load_s=load_s,
            )
        )
    )
    if opts.pil:
      pil_rates = _rate(
          pil_baseline.batches(source.encoded, views, batch_size),
          batch_size,
          reps=opts.other_reps,
          warmup=1,
          num_batches=max(1, opts.batches // 2),
      )
      pil_rate = common.median(pil_rates)
      out.append(
          emit(
              common.make_record(
                  "pipeline",
                  "pil_examples_per_s",
                  pil_rate,
                  "examples/s",
                  settings=dict(settings, threads=1),
                  values=pil_rates,
                  setting=setting,
              )
          )
      )
      out.append(
          emit(
              common.make_record(
                  "pipeline",
                  "tfdata_over_pil",
                  tf_rate / pil_rate,
                  "x",
                  settings=settings,
                  setting=setting,
              )
          )
      )
    step_rate, how = None, "skipped: pass --step_rate=SETTING=IMAGES_PER_S or --measure_step_rate"
    key = f"{setting}/{opts.devices}"
    if setting in given_rates:
      step_rate, how = given_rates[setting], "ok: from --step_rate"
    elif opts.measure_step_rate or key in train_step._MEASURED:  # pylint: disable=protected-access
      _, step_s, _ = train_step.measured_step(setting, opts)
      step_rate, how = batch_size / step_s, "ok: measured (JAX step on random data)"
    out.append(
        emit(
            common.make_record(
                "pipeline",
                "step_consumes_images_per_s",
                step_rate,
                "images/s",
                settings=settings,
                setting=setting,
                status=how,
            )
        )
    )
    if step_rate:
      out.append(
          emit(
              common.make_record(
                  "pipeline",
                  "tfdata_over_step",
                  tf_rate / step_rate,
                  "x",
                  settings=settings,
                  setting=setting,
              )
          )
      )
  return out
