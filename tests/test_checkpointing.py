"""Checkpoints verified on restore: fingerprints, damaged checkpoints, fallback to older steps.

Tiny pytrees on meshes of the 8 fake CPU devices and of 1; damage is done to the files on disk.
"""

import json
import logging
import pathlib
import shutil

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pirl_jax import checkpointing
from pirl_jax import user_errors

REAL_ROWS = 20  # memory bank rows; padded to 24 on 8 devices
FLIPPED = (35, 7)  # the element of params.w whose bit is flipped on disk


def _mesh(num_devices):
  return Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def _host_state(seed, rows=REAL_ROWS):
  """Host arrays. params.w is random bits: zstd stores it verbatim, so it can be found on disk."""
  rng = np.random.default_rng(seed)
  bank = np.zeros((rows, 16), np.float32)
  bank[:REAL_ROWS] = rng.standard_normal((REAL_ROWS, 16))
  return {
      "params": {
          "w": rng.integers(0, 2**32, (64, 16), dtype=np.uint32).view(np.float32),
          "bias": rng.standard_normal(16).astype(ml_dtypes.bfloat16),
      },
      "batch_stats": {"mean": rng.standard_normal(16).astype(np.float32)},
      "bank": bank,
      "step": np.asarray(seed, np.int32),
  }


def _shardings(state, num_devices):
  mesh = _mesh(num_devices)
  rows = {"bank", "params.w"}  # sharded by rows, the rest replicated
  return jax.tree_util.tree_map_with_path(
      lambda path, _: NamedSharding(
          mesh, P("data") if checkpointing.fingerprint.path_name(path) in rows else P()
      ),
      state,
  )


def _place(host_state, num_devices):
  """`host_state` on `num_devices` devices, the bank padded with zero rows to a multiple."""
  rows = -(-REAL_ROWS // num_devices) * num_devices
  bank = np.zeros((rows, 16), np.float32)
  bank[:REAL_ROWS] = host_state["bank"][:REAL_ROWS]
  state = dict(host_state, bank=bank)
  return jax.device_put(state, _shardings(state, num_devices))


def _target(num_devices):
  state = _place(_host_state(0), num_devices)
  return checkpointing.abstract_like(state, _shardings(state, num_devices))


def _bits(tree):
  """Dotted path -> the array's bytes, for bitwise comparisons (params.w holds NaN patterns)."""
  return {
      name: np.asarray(x).tobytes()
      for name, x in checkpointing.fingerprint.named_leaves(jax.device_get(tree))
  }


def _assert_same(restored, host_state):
  restored = jax.device_get(restored)
  expected = dict(host_state, bank=host_state["bank"][:REAL_ROWS])
  np.testing.assert_array_equal(restored["bank"][REAL_ROWS:], 0.0)
  restored = dict(restored, bank=restored["bank"][:REAL_ROWS])
  assert _bits(restored) == _bits(expected)


def _save(directory, steps, num_devices=8, keep=3):
  """Saves `_host_state(step)` at each of `steps` on `num_devices`; returns the host states."""
  ckpt = checkpointing.Checkpointer(directory, keep=keep)
  try:
    for step in steps:
      assert ckpt.save(step, _place(_host_state(step), num_devices))
  finally:
    ckpt.close()
  return {step: _host_state(step) for step in steps}


def _warnings(caplog):
  """The warnings pirl_jax/checkpointing/ logged (not Orbax's own)."""
  return [
      r.getMessage()
      for r in caplog.records
      if r.levelno == logging.WARNING
      and pathlib.Path(r.pathname).match("pirl_jax/checkpointing/*.py")
  ]


# --- Damage done on disk --------------------------------------------------------------------------


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
  return crc ^ 0xFFFFFFFF


def _flip_bit_of_w(step_dir, w, fix_crc):
  """Flips bit 0 of params.w[FLIPPED] in every array data file of `step_dir` holding it.

  OCDBT files end with a CRC32C of the rest; with `fix_crc` it is recomputed, so that TensorStore
  reads the flipped value without complaint (as if the data was damaged before it was written).
  """
  index = FLIPPED[0] * w.shape[1] + FLIPPED[1]
  window = w.tobytes()[4 * index - 16 : 4 * index + 20]  # within one row, so within one chunk
  hits = 0
  for path in sorted((step_dir / "default").rglob("*")):
    data = bytearray(path.read_bytes()) if path.is_file() else b""
    at = bytes(data).find(window)
    if at < 0:
      continue
    assert int.from_bytes(data[-4:], "little") == _crc32c(data[:-4]), path
    data[at + 16] ^= 0x01
    if fix_crc:
      data[-4:] = _crc32c(bytes(data[:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    hits += 1
  assert hits, f"params.w is not stored verbatim under {step_dir}"


def _truncate(path):
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGES = {
    "bit flipped, CRC fixed": lambda d, w: _flip_bit_of_w(d, w, fix_crc=True),
    "bit flipped": lambda d, w: _flip_bit_of_w(d, w, fix_crc=False),
    "_METADATA removed": lambda d, w: (d / "default" / "_METADATA").unlink(),
    "_METADATA truncated": lambda d, w: _truncate(d / "default" / "_METADATA"),
    "array file truncated": lambda d, w: [
        _truncate(p) for p in (d / "default").rglob("*") if p.is_file() and p.parent.name == "d"
    ],
    "array file removed": lambda d, w: [
        p.unlink() for p in (d / "default").rglob("*") if p.is_file() and p.parent.name == "d"
    ],
    "checksums garbled": lambda d, w: (d / "fingerprints" / "metadata").write_text('{"arr'),
    "checksums removed": lambda d, w: shutil.rmtree(d / "fingerprints"),
    # What a checkpoint saved before checksums looks like, but the state item says it had them.
    "checksums and step metadata removed, bit flipped": lambda d, w: (
        shutil.rmtree(d / "fingerprints"),
        (d / "_CHECKPOINT_METADATA").unlink(),
        _flip_bit_of_w(d, w, fix_crc=True),
    ),
}


# --- Fingerprints ---------------------------------------------------------------------------------


def _fmix32(h: int) -> int:
  h ^= h >> 16
  h = h * 0x85EBCA6B % 2**32
  h ^= h >> 13
  h = h * 0xC2B2AE35 % 2**32
  return h ^ (h >> 16)


def _reference_fingerprint(x: np.ndarray) -> int:
  """The documented formula, in Python integers."""
  x = np.ascontiguousarray(x)
  words = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
  keys = [_fmix32((i + 0x9E3779B9) % 2**32) for i in range(words.size)]
  return sum(_fmix32(int(b) ^ k) - _fmix32(k) for b, k in zip(words.tolist(), keys)) % 2**32


def test_fingerprints_do_not_depend_on_sharding_or_device_count():
  host = _host_state(1)
  expected = {
      name: _reference_fingerprint(np.asarray(x))
      for name, x in checkpointing.fingerprint.named_leaves(dict(host, bank=host["bank"]))
  }
  assert checkpointing.fingerprints(host) == expected  # host arrays
  for n in (8, 4, 1):
    # The bank has 24, 20 and 20 rows: zero rows add nothing.
    assert checkpointing.fingerprints(_place(host, n)) == expected, n
  # Arrays on different device sets in one tree, and another row sharding.
  mixed = dict(
      jax.device_put(host, _shardings(host, 1)),
      bank=jax.device_put(host["bank"], NamedSharding(_mesh(2), P("data"))),
  )
  assert checkpointing.fingerprints(mixed) == expected


def test_fingerprints_ignore_zero_padding_rows_and_see_every_bit():
  bank = _host_state(2)["bank"]
  padded = np.concatenate([bank, np.zeros((7, 16), np.float32)])
  one = checkpointing.fingerprints({"bank": bank})
  assert checkpointing.fingerprints({"bank": padded}) == one
  assert (
      checkpointing.fingerprints(
          {"bank": jax.device_put(padded[:24], NamedSharding(_mesh(8), P("data")))}
      )
      == one
  )
  for dtype in (np.float32, ml_dtypes.bfloat16, np.uint8):
    x = np.arange(40).astype(dtype).reshape(5, 8)
    words = x.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize])
    base = checkpointing.fingerprints({"x": x})["x"]
    for element in (0, 17, 39):
      for bit in range(8 * x.dtype.itemsize):
        flipped = words.copy()
        flipped.reshape(-1)[element] ^= np.asarray(1 << bit, words.dtype)
        assert checkpointing.fingerprints({"x": flipped.view(dtype)})["x"] != base, (
            dtype,
            element,
            bit,
        )


# --- Restore and verification ---------------------------------------------------------------------


def test_verified_restore_across_device_counts(tmp_path, caplog):
  saved = _save(tmp_path / "eight", [1])
  with caplog.at_level(logging.WARNING):
    for n in (8, 1):  # 24 saved rows restored as 24, and trimmed to 20
      ckpt = checkpointing.Checkpointer(tmp_path / "eight")
      _assert_same(ckpt.restore(1, _target(n), resize=("bank",)), saved[1])
      state, step = ckpt.restore_latest(_target(n), resize=("bank",))
      assert step == 1 and ckpt.damaged_steps == []
      _assert_same(state, saved[1])
      assert len(state["bank"].sharding.device_set) == n
      ckpt.close()
    # And from 1 device to 8: zero rows appended.
    saved = _save(tmp_path / "one", [1], num_devices=1)
    ckpt = checkpointing.Checkpointer(tmp_path / "one")
    restored = ckpt.restore(1, _target(8), resize=("bank",))
    assert restored["bank"].shape == (24, 16)
    _assert_same(restored, saved[1])
    ckpt.close()
  assert _warnings(caplog) == []


def test_nonzero_trimmed_rows_fail_verification(tmp_path):
  state = _place(_host_state(1), 8)
  state["bank"] = state["bank"].at[REAL_ROWS:].set(1.0)
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, state)
  ckpt.wait_until_finished()
  with pytest.raises(
      checkpointing.DamagedCheckpointError,
      match=r"bank \(checksum .*restored with 20 of its 24 rows, so non-zero "
      r"trimmed rows would also cause this",
  ):
    ckpt.restore(1, _target(1), resize=("bank",))
  ckpt.close()


def test_bit_flip_in_array_data_is_caught_by_the_checksum(tmp_path, caplog):
  saved = _save(tmp_path / "ckpt", [1, 2])
  step_dir = tmp_path / "ckpt" / "2"
  _flip_bit_of_w(step_dir, saved[2]["params"]["w"], fix_crc=True)
  # Unverified, the damage goes unnoticed: exactly the flipped element differs.
  on_disk = checkpointing.load_arrays(step_dir / "default")["params"]["w"].view(np.uint32)
  differs = np.argwhere(on_disk != saved[2]["params"]["w"].view(np.uint32))
  assert differs.tolist() == [list(FLIPPED)]

  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
  with pytest.raises(
      checkpointing.DamagedCheckpointError,
      match=rf"Checkpoint {step_dir} is damaged: 1 array\(s\) differ from the "
      r"checksums saved with it: params\.w \(checksum",
  ):
    ckpt.restore(2, _target(8))
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest(_target(1), resize=("bank",))
  assert step == 1
  _assert_same(state, saved[1])
  assert any(
      f"Checkpoint {step_dir} is damaged" in w
      and "params.w" in w
      and "Trying the step before it" in w
      for w in _warnings(caplog)
  )
  ckpt.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_falls_back_to_the_previous_step(tmp_path, caplog, damage):
  saved = _save(tmp_path / "ckpt", [1, 2, 3])
  DAMAGES[damage](tmp_path / "ckpt" / "3", saved[3]["params"]["w"])
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=3)
  assert ckpt.latest_step() == 3
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest(_target(8), resize=("bank",))
  assert step == 2
  _assert_same(state, saved[2])
  warned = [w for w in _warnings(caplog) if f"Checkpoint {tmp_path / 'ckpt' / '3'} is damaged" in w]
  assert warned, _warnings(caplog)
  # The damaged step is kept, moved aside, and is no longer a step ...
  kept = tmp_path / "ckpt" / "3.damaged"
  assert kept.is_dir() and not (tmp_path / "ckpt" / "3").exists()
  assert [(d.step, d.kept_as) for d in ckpt.damaged_steps] == [(3, kept)]
  assert ckpt.damaged_steps[0].reason in warned[0]
  assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
  # ... so the run saves its next steps, and keeping the last 3 deletes only intact steps.
  for s in (3, 4, 5):
    assert ckpt.save(s, _place(_host_state(s), 8))
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [3, 4, 5]
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "3.damaged", "4", "5"]
  _assert_same(ckpt.restore(3, _target(8)), _host_state(3))
  ckpt.close()


def test_every_checkpoint_damaged_raises_listing_them(tmp_path, caplog):
  saved = _save(tmp_path / "ckpt", [1, 2])
  folder = tmp_path / "ckpt"
  (folder / "1" / "default" / "_METADATA").unlink()
  _flip_bit_of_w(folder / "2", saved[2]["params"]["w"], fix_crc=True)
  ckpt = checkpointing.Checkpointer(folder)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(
        checkpointing.DamagedCheckpointError,
        match=rf"(?s)No checkpoint in {folder} can be restored:\n  step 2: "
        rf"Checkpoint {folder / '2'} is damaged: .*params\.w.*\n  step 1: "
        rf"Checkpoint {folder / '1'} is damaged: it cannot be read "
        r"\(FileNotFoundError",
    ):
      ckpt.restore_latest(_target(8))
  assert len(_warnings(caplog)) == 2
  assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]  # nothing moved or deleted
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_empty_directory_and_errors_that_are_not_damage(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path / "empty")
  assert ckpt.restore_latest(_target(8)) == (None, None)
  ckpt.close()
  assert issubclass(checkpointing.DamagedCheckpointError, user_errors.UserError)
  assert issubclass(checkpointing.CheckpointMismatchError, user_errors.UserError)
  assert issubclass(checkpointing.CheckpointMismatchError, ValueError)

  _save(tmp_path / "ckpt", [1, 2])
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")

  def refuse(step, shapes):
    raise checkpointing.CheckpointMismatchError(f"step {step}: bank {shapes['bank']}")

  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"step 2: bank \(24, 16\)"):
    ckpt.restore_latest(_target(8), resize=("bank",), check=refuse)
  # Without resize the padded bank does not fit 1 device: a mismatch, not damage.
  with pytest.raises(
      checkpointing.CheckpointMismatchError, match=r"bank: saved \(24, 16\), expected \(20, 16\)"
  ):
    ckpt.restore_latest(_target(1))
  assert ckpt.all_steps() == [1, 2] and ckpt.damaged_steps == []
  ckpt.close()


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
  # As checkpoints were saved before they had fingerprints: the state item alone.
  folder = tmp_path / "ckpt"
  host = _host_state(1)
  manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(1, args=ocp.args.StandardSave(_place(host, 8)))
  manager.wait_until_finished()
  manager.close()
  ckpt = checkpointing.Checkpointer(folder)
  with caplog.at_level(logging.WARNING):
    _assert_same(ckpt.restore(1, _target(1), resize=("bank",)), host)
    state, step = ckpt.restore_latest(_target(8))
    restored = checkpointing.restore_subtrees(
        folder / "1" / "default", {("params",): host["params"]}
    )
  assert step == 1
  _assert_same(state, host)
  assert _bits(restored[("params",)]) == _bits(host["params"])
  assert (
      _warnings(caplog)
      == [
          f"Checkpoint {folder / '1'} has no checksums (it was saved before "
          "checkpoints had them): restored without verification."
      ]
      * 3
  )
  ckpt.save(2, state)  # and the directory takes checkpoints with fingerprints from then on
  ckpt.close()
  assert json.loads((folder / "2" / "fingerprints" / "metadata").read_text())["arrays"] == (
      checkpointing.fingerprints(state)
  )


def test_restore_subtrees_verifies_what_it_restores(tmp_path, caplog):
  saved = _save(tmp_path / "ckpt", [1])
  item = tmp_path / "ckpt" / "1" / "default"
  targets = {("params",): saved[1]["params"], ("batch_stats",): saved[1]["batch_stats"]}
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore_subtrees(item, targets, sharding=NamedSharding(_mesh(8), P()))
  assert _warnings(caplog) == []
  assert _bits(restored[("params",)]) == _bits(saved[1]["params"])

  _flip_bit_of_w(item.parent, saved[1]["params"]["w"], fix_crc=True)
  with pytest.raises(
      checkpointing.DamagedCheckpointError,
      match=rf"Checkpoint {item.parent} is damaged: .*params\.w",
  ):
    checkpointing.restore_subtrees(item, targets)
  # A subtree the damage is not in still restores; dtypes are cast to the target's.
  as_bf16 = {"mean": saved[1]["batch_stats"]["mean"].astype(ml_dtypes.bfloat16)}
  restored = checkpointing.restore_subtrees(item, {("batch_stats",): as_bf16})
  assert restored[("batch_stats",)]["mean"].dtype == ml_dtypes.bfloat16
  assert _bits(restored[("batch_stats",)]) == _bits(as_bf16)
