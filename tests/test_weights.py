"""Weights in torchvision's ResNet layout: the key mapping, a NumPy forward pass of that layout,
import into fine-tuning, export from a workdir, and the public `load_trunk` / `embed` API.

The parity tests against a real PyTorch ResNet are in test_weights_torch.py (they need torch).
"""

import json
import os
import pathlib

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_in_process
import pirl_jax
from configs import finetune_isic
from pirl_jax import checkpointing
from pirl_jax import trunk_init
from pirl_jax.commands import export
from pirl_jax.data import augment
from pirl_jax.models import resnet
from pirl_jax.models import torch_weights
from pirl_jax.tasks import finetune

REPO = pathlib.Path(__file__).resolve().parents[1]


def _random_variables(name, seed=0, size=64, **kwargs):
  """A trunk's variables with random parameters and random (positive-variance) BN statistics."""
  trunk = resnet.get_trunk(name, **kwargs)
  variables = trunk.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)), train=False)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  for path, value in flat.items():
    if path[-1] == "mean":
      flat[path] = rng.normal(0, 0.1, value.shape).astype(np.float32)
    elif path[-1] == "var":
      flat[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    elif path[-1] in ("scale", "bias"):
      flat[path] = (value + rng.normal(0, 0.1, value.shape)).astype(np.float32)
    else:
      flat[path] = np.asarray(value)
  return trunk, traverse_util.unflatten_dict(flat)


def _shapes_state(name, **kwargs):
  """torchvision key -> zero-size stand-in of the right shape, without allocating the trunk."""
  trunk = resnet.get_trunk(name, **kwargs)
  abstract = trunk_init.abstract_trunk_variables(trunk, 64)
  flat = traverse_util.flatten_dict(abstract)
  state = {}
  for path, key in torch_weights.key_map(abstract).items():
    shape = flat[path].shape
    state[key] = np.broadcast_to(
        np.float32(0), shape[::-1] if len(shape) != 4 else (shape[3], shape[2], shape[0], shape[1])
    )
  return state


# --- The key layout -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,num_keys,blocks", [("resnet18", 120, [2, 2, 2, 2]), ("resnet50", 318, [3, 4, 6, 3])]
)
def test_state_dict_has_torchvisions_keys_and_shapes(name, num_keys, blocks):
  """torchvision's resnet18/resnet50 state dicts have 122/320 entries, two of them fc.*."""
  _, variables = _random_variables(name)
  state = torch_weights.to_state_dict(variables)
  assert len(state) == num_keys and not any(k.startswith("fc.") for k in state)
  for stage, count in enumerate(blocks, start=1):
    assert f"layer{stage}.{count - 1}.conv1.weight" in state
    assert f"layer{stage}.{count}.conv1.weight" not in state
  assert state["conv1.weight"].shape == (64, 3, 7, 7)
  assert state["bn1.num_batches_tracked"].dtype == np.int64
  if name == "resnet18":
    assert "layer1.0.downsample.0.weight" not in state
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
  else:
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
  # A kernel is HWIO here and OIHW there.
  np.testing.assert_array_equal(
      state["conv1.weight"], np.transpose(variables["params"]["conv_init"]["kernel"], (3, 2, 0, 1))
  )


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_tiny_bottleneck"])
def test_export_then_import_is_the_identity(name):
  _, variables = _random_variables(name)
  back = torch_weights.from_state_dict(torch_weights.to_state_dict(variables), variables)
  a, b = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(back)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))


@pytest.mark.parametrize(
    "name,width",
    [
        ("resnet18", 1.0),
        ("resnet34", 1.0),
        ("resnet50", 1.0),
        ("resnet101", 1.0),
        ("resnet18", 0.25),
        ("resnet50", 2.0),
        ("resnet_tiny", 1.0),
    ],
)
def test_architecture_is_read_from_the_tensors(name, width):
  state = _shapes_state(name, width_multiplier=width)
  state["fc.weight"] = np.zeros((1000, 8), np.float32)
  assert torch_weights.infer_architecture(state) == (name, width)


# --- A NumPy forward pass of torchvision's layout ------------------------------------------------


def _conv(x, weight, stride, padding):
  """torch.nn.functional.conv2d on NHWC NumPy input with an OIHW weight, no bias."""
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kh, kw = weight.shape[2:]
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  windows = windows[:, ::stride, ::stride]  # (N, H', W', C, kh, kw)
  return np.einsum("nhwcij,ocij->nhwo", windows, weight, optimize=True)


def _bn(x, state, prefix):
  scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-5)
  return (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]


def _numpy_resnet(state, images, bottleneck):
  """torchvision's ResNet v1.5 forward pass in eval mode, pooled features, float64."""
  state = {k: np.asarray(v, np.float64) for k, v in state.items()}
  relu = lambda x: np.maximum(x, 0)
  x = relu(_bn(_conv(images.astype(np.float64), state["conv1.weight"], 2, 3), state, "bn1"))
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  x = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max((-2, -1))
  for stage in range(1, 5):
    index = 0
    while f"layer{stage}.{index}.conv1.weight" in state:
      p = f"layer{stage}.{index}"
      stride = 2 if stage > 1 and index == 0 else 1
      if bottleneck:
        y = relu(_bn(_conv(x, state[f"{p}.conv1.weight"], 1, 0), state, f"{p}.bn1"))
        y = relu(_bn(_conv(y, state[f"{p}.conv2.weight"], stride, 1), state, f"{p}.bn2"))
        y = _bn(_conv(y, state[f"{p}.conv3.weight"], 1, 0), state, f"{p}.bn3")
      else:
        y = relu(_bn(_conv(x, state[f"{p}.conv1.weight"], stride, 1), state, f"{p}.bn1"))
        y = _bn(_conv(y, state[f"{p}.conv2.weight"], 1, 1), state, f"{p}.bn2")
      if f"{p}.downsample.0.weight" in state:
        x = _bn(_conv(x, state[f"{p}.downsample.0.weight"], stride, 0), state, f"{p}.downsample.1")
      x = relu(x + y)
      index += 1
  return x.mean(axis=(1, 2))


@pytest.mark.parametrize(
    "name,bottleneck", [("resnet_tiny", False), ("resnet_tiny_bottleneck", True)]
)
def test_imported_weights_compute_what_torchvisions_layout_computes(name, bottleneck):
  """A state dict read the torchvision way (NumPy, float64) and the Flax trunk after import
  give the same pooled features."""
  trunk, variables = _random_variables(name, seed=3)
  state = torch_weights.to_state_dict(variables)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  imported = torch_weights.from_state_dict(state, trunk_init.abstract_trunk_variables(trunk, 32))
  got = np.asarray(trunk.apply(imported, images, train=False))
  expected = _numpy_resnet(state, images, bottleneck)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# --- Reading files, and what a wrong file says ----------------------------------------------------


def _tiny_file(tmp_path, name="resnet_tiny", filename="w.safetensors", edit=None):
  _, variables = _random_variables(name)
  state = torch_weights.to_state_dict(variables)
  if edit:
    edit(state)
  path = tmp_path / filename
  torch_weights.write(state, path)
  return path, variables


def test_wrapper_prefixes_and_the_classifier_are_dropped(tmp_path):
  _, variables = _random_variables("resnet_tiny")
  state = {f"module.{k}": v for k, v in torch_weights.to_state_dict(variables).items()}
  state["module.fc.weight"] = np.zeros((10, 64), np.float32)
  state["module.fc.bias"] = np.zeros((10,), np.float32)
  back = torch_weights.from_state_dict(state, variables)
  np.testing.assert_array_equal(
      back["params"]["conv_init"]["kernel"], variables["params"]["conv_init"]["kernel"]
  )


@pytest.mark.parametrize(
    "edit,messages",
    [
        (
            lambda s: s.pop("layer2.0.bn1.running_mean"),
            ["missing 1 key(s): layer2.0.bn1.running_mean"],
        ),
        (
            lambda s: s.update({"layer1.0.conv1.weight": np.zeros((8, 8, 5, 5), np.float32)}),
            [
                "1 shape mismatch(es): layer1.0.conv1.weight: (8, 8, 5, 5) in the file, (8, 8, 3, 3) "
                "in the trunk"
            ],
        ),
        (
            lambda s: s.update({"layer5.0.conv1.weight": np.zeros((1,), np.float32)}),
            ["1 key(s) the trunk does not have: layer5.0.conv1.weight"],
        ),
        (
            lambda s: s.update(
                {"layer1.0.conv1.weight": s["layer1.0.conv1.weight"].astype(np.int32)}
            ),
            [
                "1 tensor(s) of integers or other non-float type where the trunk holds weights",
                "layer1.0.conv1.weight (int32)",
            ],
        ),
        (
            lambda s: s.update(
                {"layer1.0.bn1.weight": np.full_like(s["layer1.0.bn1.weight"], np.nan)}
            ),
            ["1 tensor(s) holding NaN or infinite values", "layer1.0.bn1.weight"],
        ),
    ],
)
def test_a_partial_or_wrong_file_names_the_keys(tmp_path, edit, messages):
  path, variables = _tiny_file(tmp_path, edit=edit)
  with pytest.raises(torch_weights.WeightsError) as raised:
    torch_weights.from_state_dict(torch_weights.read(path), variables, source=str(path))
  for message in messages:
    assert message in str(raised.value)
  assert str(path) in str(raised.value)


def test_unreadable_files_are_named(tmp_path):
  with pytest.raises(torch_weights.WeightsError, match="does not exist"):
    torch_weights.read(tmp_path / "none.safetensors")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(torch_weights.WeightsError, match="not a readable .safetensors file"):
    torch_weights.read(bad)
  with pytest.raises(torch_weights.WeightsError, match="is not a torchvision-layout ResNet"):
    torch_weights.infer_architecture({"encoder.weight": np.zeros(3)}, source="x.safetensors")


def test_a_pth_file_without_torch_says_so(tmp_path, monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("no torch")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  path = tmp_path / "w.pth"
  path.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(torch_weights.WeightsError, match="torch is not installed"):
    torch_weights.read(path)


# --- Fine-tuning from a weights file --------------------------------------------------------------


def _finetune_config(small_isic_root, shared_cache_dir, **overrides):
  config = finetune_isic.get_config("tiny")
  config.update_from_flattened_dict(
      {
          "data.source": "isic",
          "data.path": str(small_isic_root),
          "data.cache_dir": str(shared_cache_dir),
          "num_train_steps": 2,
          "eval_every_steps": 2,
          **overrides,
      }
  )
  return config


def test_fine_tuning_from_an_exported_file_equals_fine_tuning_from_the_workdir(
    tmp_path, tiny_pretraining, tiny_finetuning
):
  """The trunk goes out to safetensors and back in bit for bit: the same run results."""
  weights = tmp_path / "trunk.safetensors"
  export.export(str(tiny_pretraining.workdir), str(weights))
  config = tiny_finetuning.config.copy_and_resolve_references()
  config.init.checkpoint = str(weights)
  finetune.train_and_evaluate(config, str(tmp_path / "weights"))
  runs = {}
  for kind, workdir in (("pirl", tiny_finetuning.workdir), ("weights", tmp_path / "weights")):
    runs[kind] = json.loads((workdir / "metrics.json").read_text())
    for split in finetune.EVAL_SPLITS:
      for key in ("ground_truth_csv", "predictions_csv"):
        runs[kind][split].pop(key)
  assert runs["weights"].pop("init") == dict(
      kind="weights", checkpoint=str(weights), item_dir=None, step=None
  )
  assert runs["pirl"].pop("init")["kind"] == "pirl"
  assert runs["weights"] == runs["pirl"]


def test_a_wrong_weights_file_fails_before_training_naming_the_keys(
    tmp_path, small_isic_root, shared_cache_dir, monkeypatch
):
  path, _ = _tiny_file(tmp_path, name="resnet_tiny_bottleneck")
  config = _finetune_config(
      small_isic_root,
      shared_cache_dir,
      **{"init.checkpoint": str(path), "init.inherit_trunk": False},
  )

  def no_data(*args, **kwargs):
    raise AssertionError("the data was read before the weights were checked")

  monkeypatch.setattr(finetune.labelled, "load_split", no_data)
  with pytest.raises(torch_weights.WeightsError) as raised:
    finetune.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(raised.value)
  assert "config.model.trunk='resnet_tiny'" in message
  assert "layer1.0.conv3.weight" in message and "shape mismatch" in message


def test_the_command_line_reports_a_partial_file_in_one_line(
    tmp_path, small_isic_root, shared_cache_dir, capsys, monkeypatch
):
  path, _ = _tiny_file(tmp_path, edit=lambda s: s.pop("layer4.0.conv2.weight"))
  status, _, err = cli_in_process.main_in_process(
      [
          "--config=configs/finetune_isic.py:tiny",
          "--config.data.source=isic",
          f"--config.data.path={small_isic_root}",
          f"--config.data.cache_dir={shared_cache_dir}",
          f"--config.init.checkpoint={path}",
          f"--workdir={tmp_path / 'run'}",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and "missing 1 key(s): layer4.0.conv2.weight" in last, err
  assert "Traceback" not in err


# --- load_trunk, embed and the export command -----------------------------------------------------


def _reference_features(workdir, images):
  """Features computed from the checkpoint through the internals load_trunk hides."""
  config = json.loads((workdir / "config.json").read_text())
  trunk = trunk_init.trunk_from_config(config["model"])
  item_dir, _ = checkpointing.resolve_checkpoint(workdir)
  arrays = checkpointing.load_arrays(item_dir)
  variables = {"params": arrays["params"]["trunk"], "batch_stats": arrays["batch_stats"]["trunk"]}
  mean, std = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)
  x = ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
  return np.asarray(trunk.apply(variables, x, train=False))


def test_load_trunk_and_embed_on_a_pretraining_workdir(tiny_pretraining):
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  trunk, variables = pirl_jax.load_trunk(tiny_pretraining.workdir)
  features = pirl_jax.embed(trunk, variables, images, batch_size=2)  # padded last batch
  assert features.shape == (5, trunk.num_features) and features.dtype == np.float32
  np.testing.assert_allclose(
      features, _reference_features(tiny_pretraining.workdir, images), rtol=1e-5, atol=1e-5
  )
  # [0, 1] floats are the same images.
  np.testing.assert_allclose(
      pirl_jax.embed(trunk, variables, images / 255.0), features, rtol=1e-5, atol=1e-5
  )
  # An earlier step, named by its folder.
  _, step2 = pirl_jax.load_trunk(tiny_pretraining.workdir / "checkpoints" / "2")
  assert not np.array_equal(
      step2["params"]["conv_init"]["kernel"], variables["params"]["conv_init"]["kernel"]
  )


def test_load_trunk_on_a_fine_tuned_workdir(tiny_pretraining, tiny_finetuning):
  workdir = tiny_finetuning.workdir
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  trunk, variables = pirl_jax.load_trunk(workdir)
  np.testing.assert_allclose(
      pirl_jax.embed(trunk, variables, images),
      _reference_features(workdir, images),
      rtol=1e-5,
      atol=1e-5,
  )
  _, pretrained = pirl_jax.load_trunk(tiny_pretraining.workdir)
  assert not np.array_equal(
      variables["params"]["conv_init"]["kernel"], pretrained["params"]["conv_init"]["kernel"]
  )  # fine-tuning moved it


def test_load_trunk_without_a_config_asks_for_the_architecture(tmp_path, tiny_pretraining):
  item_dir, _ = checkpointing.resolve_checkpoint(tiny_pretraining.workdir)
  bare = tmp_path / "bare"
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(item_dir.parent, bare)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="pass trunk="):
    pirl_jax.load_trunk(bare)
  trunk, _ = pirl_jax.load_trunk(bare, trunk="resnet_tiny")
  assert trunk.num_features == 64
  with pytest.raises(checkpointing.CheckpointMismatchError):
    pirl_jax.load_trunk(bare, trunk="resnet18")


def test_export_command_writes_the_trunk_with_its_provenance(
    tmp_path, tiny_pretraining, capsys, monkeypatch
):
  from pirl_jax.commands import export  # pylint: disable=g-import-not-at-top

  def command(args):
    return cli_in_process.command_in_process(export.main, ["export.py", *args], capsys, monkeypatch)

  code, _, err = command(
      [f"--checkpoint={tiny_pretraining.workdir}", f"--out={tmp_path / 'trunk.pth'}"]
  )
  assert code == 2
  assert err.strip().splitlines()[-1].startswith("error: --out=")
  assert "must end in .safetensors" in err and "Traceback" not in err

  out = tmp_path / "trunk.safetensors"
  previous = os.umask(0o022)
  try:
    code, stdout, err = command([f"--checkpoint={tiny_pretraining.workdir}", f"--out={out}"])
  finally:
    os.umask(previous)
  assert code == 0, err[-3000:]
  assert f"of resnet_tiny at width 1 from {tiny_pretraining.workdir} (step 4) to {out}" in stdout
  assert out.stat().st_mode & 0o777 == 0o644  # the user's umask, as any file they write
  assert "_CHECKPOINT_METADATA" not in err and "WARNING" not in err, err  # no Orbax chatter
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(str(out), framework="numpy") as f:
    metadata = f.metadata()
  assert metadata["architecture"] == "resnet_tiny" and metadata["step"] == "4"
  _, variables = pirl_jax.load_trunk(tiny_pretraining.workdir)
  expected = torch_weights.to_state_dict(variables)
  written = torch_weights.read(out)
  assert written.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  # The file is itself a checkpoint load_trunk reads.
  trunk, from_file = pirl_jax.load_trunk(out)
  assert trunk.num_features == 64
  np.testing.assert_array_equal(
      from_file["batch_stats"]["bn_init"]["var"], variables["batch_stats"]["bn_init"]["var"]
  )


@pytest.mark.slow
def test_probe_of_an_exported_file_equals_the_probe_of_its_workdir(
    tmp_path, tiny_pretraining, shared_cache_dir
):
  from pirl_jax.commands import probe  # pylint: disable=g-import-not-at-top
  from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

  weights = tmp_path / "trunk.safetensors"
  export.export(str(tiny_pretraining.workdir), str(weights))
  with pytest.raises(user_errors.UserError, match="pass --image_size"):
    probe.run_probe(str(weights), data="synthetic", cache_dir=str(shared_cache_dir))
  size = tiny_pretraining.config.data.views.image_size
  data = f"isic:{tiny_pretraining.config.data.path}"
  of_file = probe.run_probe(
      str(weights), data=data, image_size=size, cache_dir=str(shared_cache_dir)
  )
  # The workdir's probe, with the file's data settings: its config.json prepares the images at
  # the run's max_image_side, a weights file's probe at the default.
  import shutil  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  shutil.copytree(tiny_pretraining.workdir, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["data"]["max_image_side"] = probe.data_config(None, {}).max_image_side
  (workdir / "config.json").write_text(json.dumps(config))
  of_workdir = probe.run_probe(str(workdir), data=data, cache_dir=str(shared_cache_dir))
  # The image probe's scores; a workdir's probe adds its tile pathway (tests/test_tile_pathway.py),
  # which a weights file (a trunk without heads or views) does not have.
  file_scores = of_file["results"]["checkpoint"]
  workdir_scores = of_workdir["results"]["checkpoint (step 4)"]
  assert file_scores and not any(k.startswith(("tilebag_", "retrieval_")) for k in file_scores)
  assert file_scores == {k: workdir_scores[k] for k in file_scores}
