"""The `bank` benchmark: the memory bank at ImageNet scale, sharded over 8 (fake CPU) devices.

Times one step of the bank's work in the train step -- negative sampling
(`memory_bank.sample_negatives`), scoring of both loss terms and the query gradient
(`memory_bank.score`, which keeps the bank row-sharded: each device scores only the entries whose
rows it holds, `--bank_chunk` columns at a time) and the write (`memory_bank.update`) -- with the
bank sharded as `sharding.bank_sharding`, and reports the bytes each device holds, the bytes the
compiled program's collectives move per step, and its temporaries per device (XLA's memory
analysis, where the backend gives one).

XLA's fake host devices must be requested before jax is imported: `python -m benchmarks bank`
sets XLA_FLAGS=--xla_force_host_platform_device_count=N itself (N = --bank_devices) when it runs
the bank benchmark first; when jax is already up with fewer devices it re-runs itself in a
subprocess.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from benchmarks import common
from pirl_jax import losses
from pirl_jax import memory_bank
from pirl_jax import sharding as sharding_lib


def device_flag(n: int) -> str:
  return f"--xla_force_host_platform_device_count={n}"


def _step_fn(num_examples, num_negatives, temperature, chunk, mesh):
  batch_sh = sharding_lib.batch_sharding(mesh)

  def loss_fn(f_hat, g_hat, bank, index, neg_j, neg_i):
    logits_j = memory_bank.score(g_hat, bank, index, neg_j, temperature, mesh, chunk)
    logits_i = memory_bank.score(f_hat, bank, index, neg_i, temperature, mesh, chunk)
    return 0.5 * losses.infonce_loss(logits_j) + 0.5 * losses.infonce_loss(logits_i)

  def step(bank, rng, index, f_hat, g_hat):
    rng, jigsaw_rng, image_rng = jax.random.split(rng, 3)
    negatives = [
        jax.lax.with_sharding_constraint(
            memory_bank.sample_negatives(r, index, num_negatives, num_examples), batch_sh
        )
        for r in (jigsaw_rng, image_rng)
    ]
    # The query gradients are part of the bank's work: the backward pass scores again.
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(f_hat, g_hat, bank, index, *negatives)
    bank = memory_bank.update(bank, index, f_hat, 0.5, mesh)
    return bank, rng, loss + 0.0 * sum(jax.numpy.sum(g) for g in grads)

  return step


def _collective_bytes_per_step(batch: int, negatives: int, dim: int) -> int:
  """Bytes the bank's collectives move per step, from their shapes (all devices' shares)."""
  scores = batch * (negatives + 1)
  per_term = (
      batch * dim
      + scores  # all-gather queries and indices
      + scores  # reduce-scatter the partial scores
      + 2 * scores
      + batch * dim
  )  # backward: indices and score gradients in, queries out
  return 4 * (2 * per_term + batch + batch * dim)  # + the write's indices and embeddings


def _rerun_in_subprocess(opts) -> list[dict]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + device_flag(opts.bank_devices)).strip()
  # `-m benchmarks` from any working directory (a relative --results stays relative to it).
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
  cmd = [sys.executable, "-m", "benchmarks", "bank"] + opts.passthrough
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-3000:]}")
  return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def bench_bank(opts, emit) -> list[dict]:
  if jax.device_count() < opts.bank_devices:
    if opts.no_reexec:
      raise RuntimeError(
          f"bank needs {opts.bank_devices} devices, jax has {jax.device_count()}; "
          f"set XLA_FLAGS={device_flag(opts.bank_devices)} before importing jax."
      )
    records = _rerun_in_subprocess(opts)  # it wrote --results itself
    for r in records:
      print(json.dumps(r), flush=True)
    emit.records.extend(records)
    return records

  n, dim, k, b = opts.bank_rows, 128, opts.bank_negatives, opts.bank_batch
  ndev = opts.bank_devices
  mesh = sharding_lib.create_mesh(jax.devices()[:ndev])
  bank_sh = sharding_lib.bank_sharding(mesh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  rows = memory_bank.padded_size(n, ndev)
  settings = {
      "bank_rows": n,
      "padded_rows": rows,
      "dim": dim,
      "negatives": k,
      "batch": b,
      "devices": ndev,
      "chunk": opts.bank_chunk,
      "reps": opts.bank_reps,
  }
  out = []

  bank = jax.jit(lambda r: memory_bank.init_bank(r, n, dim, rows), out_shardings=bank_sh)(
      jax.random.PRNGKey(0)
  )
  per_device: dict[str, int] = {}
  for shard in bank.addressable_shards:
    per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
  out.append(
      emit(
          common.make_record(
              "bank",
              "bank_bytes_per_device",
              max(per_device.values()),
              "bytes",
              settings=settings,
              total_bytes=int(bank.nbytes),
              per_device=per_device,
          )
      )
  )

  gathered = b * (k + 1) * dim * 4
  out.append(
      emit(
          common.make_record(
              "bank",
              "gathered_negatives_bytes_per_term",
              gathered,
              "bytes",
              settings=settings,
              formula="B * (K+1) * D * 4",
              per_step_both_terms=2 * gathered,
              per_device_if_batch_sharded=gathered // ndev,
          )
      )
  )

  rs = np.random.RandomState(0)
  index = jax.device_put(rs.permutation(n)[:b].astype(np.int32), batch_sh)
  emb = rs.randn(2, b, dim).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  f_hat, g_hat = (jax.device_put(e, batch_sh) for e in emb)
  rng = jax.device_put(jax.random.PRNGKey(1), rep)
  avail = common.available_memory_bytes()

  for path, chunk in (("sharded", opts.bank_chunk),):
    step = jax.jit(
        _step_fn(n, k, 0.07, chunk, mesh),
        in_shardings=(bank_sh, rep, batch_sh, batch_sh, batch_sh),
        out_shardings=(bank_sh, rep, rep),
        donate_argnums=0,
    )
    compiled = step.lower(bank, rng, index, f_hat, g_hat).compile()
    mem = common.memory_analysis(compiled)
    temp = None if mem is None else mem.get("temp_size_in_bytes")
    pset = dict(settings, path=path)
    out.append(
        emit(
            common.make_record(
                "bank",
                f"{path}_gathered_peak_bytes_per_term",
                b * min(chunk, k + 1) * dim * 4 // 8,
                "bytes",
                settings=pset,
                formula="B/blocks * chunk * D * 4 (blocks = 8)",
            )
        )
    )
    collectives = common.collective_bytes(compiled.as_text())
    largest = max(collectives, key=lambda c: c[2]) if collectives else ("none", "", 0)
    out.append(
        emit(
            common.make_record(
                "bank",
                f"{path}_largest_collective_bytes",
                largest[2],
                "bytes",
                settings=pset,
                op=largest[0],
                shape=largest[1],
                collectives_in_program=len(collectives),
            )
        )
    )
    out.append(
        emit(
            common.make_record(
                "bank",
                f"{path}_collective_bytes_per_step",
                _collective_bytes_per_step(b, k, dim),
                "bytes",
                settings=pset,
                formula="per term: all-gather B*D + B*(K+1) (forward), "
                "B*(K+1) twice + reduce-scatter B*D (backward), reduce-scatter B*(K+1); write: "
                "all-gather B + B*D; 4 bytes each",
            )
        )
    )
    # memory_analysis is per device; fake CPU devices share the host's memory.
    out.append(
        emit(
            common.make_record(
                "bank",
                f"{path}_compiled_temp_bytes_per_device",
                temp,
                "bytes",
                settings=pset,
                memory_analysis=mem,
                status="ok"
                if temp is not None
                else "unavailable: no memory_analysis() on this backend",
            )
        )
    )
    # Fake CPU devices share the host's memory: all of them together must fit, with a margin
    # (the process's peak RSS was ~10% above the analysis in a trial run).
    need = (
        None
        if mem is None
        else ndev
        * (
            mem.get("temp_size_in_bytes", 0)
            + mem.get("argument_size_in_bytes", 0)
            + mem.get("output_size_in_bytes", 0)
            - mem.get("alias_size_in_bytes", 0)
        )
    )
    if (
        not opts.bank_force
        and need is not None
        and avail is not None
        and need > opts.bank_memory_fraction * avail
    ):
      out.append(
          emit(
              common.make_record(
                  "bank",
                  f"{path}_step_s",
                  None,
                  "s",
                  settings=pset,
                  status=f"skipped: needs ~{need / 2**30:.1f} GiB ({ndev} devices x "
                  f"{need / ndev / 2**30:.2f} GiB by memory_analysis), more than "
                  f"{opts.bank_memory_fraction:.0%} of the {avail / 2**30:.1f} GiB available; "
                  "--bank_force runs it anyway",
              )
          )
      )
      continue
    holder = {"bank": bank, "rng": rng}

    def one():
      holder["bank"], holder["rng"], loss = compiled(
          holder["bank"], holder["rng"], index, f_hat, g_hat
      )
      return holder["bank"], loss

    times = common.time_reps(one, reps=opts.bank_reps, warmup=1, block=jax.block_until_ready)
    bank = holder["bank"]
    out.append(
        emit(
            common.make_record(
                "bank", f"{path}_step_s", common.median(times), "s", settings=pset, values=times
            )
        )
    )
  return out
