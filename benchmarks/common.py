"""Shared pieces of the benchmarks: records (JSON lines), timing, versions, the optional torch."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import statistics
import time
from typing import Any, Callable

_VERSIONS: dict[str, str | None] | None = None


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions() -> dict[str, str | None]:
  """Versions of the packages a measurement depends on (None: not installed)."""
  global _VERSIONS
  if _VERSIONS is None:
    _VERSIONS = {name: _version(name) for name in ("jax", "jaxlib", "flax", "torch")}
    _VERSIONS["tensorflow"] = _version("tensorflow-cpu") or _version("tensorflow")
  return dict(_VERSIONS)


def import_torch():
  """The torch module, or None when `import torch` fails (torch is optional)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


TORCH_MISSING = "skipped: torch not installed"


def make_record(
    benchmark: str,
    name: str,
    value: float | None,
    unit: str,
    *,
    settings: dict[str, Any] | None = None,
    values: list[float] | None = None,
    status: str = "ok",
    **extra,
) -> dict[str, Any]:
  """One measurement as a flat dict (one JSON line)."""
  import jax  # pylint: disable=g-import-not-at-top

  record = {
      "benchmark": benchmark,
      "name": name,
      "value": None if value is None else float(value),
      "unit": unit,
      "status": status,
  }
  if values is not None:
    record["values"] = [float(v) for v in values]
  record.update(extra)
  record["settings"] = dict(settings or {})
  record.update(versions())
  record["platform"] = jax.default_backend()
  record["device_count"] = jax.device_count()
  record["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return record


class Emitter:
  """Prints each record as one JSON line and appends it to `results` (a JSON-lines file)."""

  def __init__(self, results: str | None = None, stream=None):
    self.results = results
    self.stream = stream
    self.records: list[dict[str, Any]] = []

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    line = json.dumps(record, sort_keys=False, default=_json_default)
    import sys  # pylint: disable=g-import-not-at-top

    print(line, file=self.stream or sys.stdout, flush=True)
    if self.results:
      with open(self.results, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    self.records.append(record)
    return record


def _json_default(obj):
  if hasattr(obj, "item"):
    return obj.item()
  if isinstance(obj, (tuple, set)):
    return list(obj)
  return str(obj)


def median(values: list[float]) -> float:
  return float(statistics.median(values))


def time_reps(
    fn: Callable[[], Any],
    *,
    reps: int,
    warmup: int,
    inner: int = 1,
    block: Callable[[Any], Any] | None = None,
) -> list[float]:
  """Seconds per call of `fn`, one value per repetition (each the mean of `inner` calls).

  `warmup` untimed calls come first. `block(result)` waits for the result (e.g.
  `jax.block_until_ready`); it is called once at the end of each timed repetition.
  """
  block = block or (lambda x: x)
  for _ in range(warmup):
    block(fn())
  out = []
  for _ in range(reps):
    start = time.perf_counter()
    result = None
    for _ in range(inner):
      result = fn()
    block(result)
    out.append((time.perf_counter() - start) / inner)
  return out


def cost_flops(compiled) -> float | None:
  """FLOPs from XLA's cost analysis of a compiled computation (a dict, or a list of dicts)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def memory_analysis(compiled) -> dict[str, int] | None:
  """The compiled computation's memory analysis (bytes per device), where the backend gives one."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if mem is None:
    return None
  fields = (
      "temp_size_in_bytes",
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "alias_size_in_bytes",
      "generated_code_size_in_bytes",
  )
  out = {f: int(getattr(mem, f)) for f in fields if getattr(mem, f, None) is not None}
  return out or None


def available_memory_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (Linux), else None."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


_DTYPE_BYTES = {
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "bf16": 2,
    "f16": 2,
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}


def collective_bytes(hlo_text: str) -> list[tuple[str, str, int]]:
  """(op, result shape, bytes) of every collective in a compiled program's HLO text.

  Each op is listed once, even inside a loop that runs it several times.
  """
  import re  # pylint: disable=g-import-not-at-top

  found = []
  for line in hlo_text.splitlines():
    m = re.search(
        r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? (all-gather|all-reduce|reduce-scatter|"
        r"collective-permute|all-to-all)(-start)?\(",
        line,
    )
    if m:
      dims = [int(d) for d in m.group(2).split(",") if d]
      count = 1
      for d in dims:
        count *= d
      found.append(
          (m.group(3), f"{m.group(1)}[{m.group(2)}]", count * _DTYPE_BYTES.get(m.group(1), 4))
      )
  return found
