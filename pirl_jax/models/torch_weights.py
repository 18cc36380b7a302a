"""ResNet weights in torchvision's layout: into and out of the Flax trunk (`models.resnet`).

The trunk is torchvision's ResNet v1.5 parameter for parameter, so the mapping is by name alone:

  Flax                                   torchvision (timm's ResNets use the same names)
  conv_init/kernel (H, W, I, O)          conv1.weight (O, I, H, W)
  bn_init/{scale, bias}, {mean, var}     bn1.{weight, bias}, bn1.{running_mean, running_var}
  <Block>_<n>/Conv_<i>                   layer<s>.<j>.conv<i+1>     (block n = stage s, index j)
  <Block>_<n>/BatchNorm_<i>              layer<s>.<j>.bn<i+1>
  <Block>_<n>/conv_proj, norm_proj       layer<s>.<j>.downsample.0, .downsample.1

`num_batches_tracked` is ignored on import (BatchNorm here uses a fixed momentum) and written as
0 on export, so that `load_state_dict` finds every buffer; the classifier `fc.*` is not part of
the trunk: dropped on import, not written on export. Both sides use the same input convention:
RGB in [0, 1], normalised with the ImageNet mean and standard deviation
(`data.augment.IMAGENET_MEAN` / `IMAGENET_STD`), BatchNorm eps 1e-5.

A `.safetensors` file is read without running any code; a PyTorch `.pth`/`.pt` state dict is read
with `torch.load(weights_only=True)` when torch is installed (never with plain pickle).
"""

from __future__ import annotations

import io
import math
import pathlib
import re
from typing import Mapping

from flax import traverse_util
import numpy as np

from pirl_jax import storage
from pirl_jax import user_errors
from pirl_jax.models import resnet

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Prefixes that wrappers add to every key: DistributedDataParallel, timm/lightning checkpoints.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.")
_CLASSIFIER = re.compile(r"^fc\.")
_BLOCK = re.compile(r"^(BasicBlock|Bottleneck)_(\d+)$")
_NUMBERED = re.compile(r"^(Conv|BatchNorm)_(\d+)$")


class WeightsError(user_errors.UserError, ValueError):
  """A weights file that does not fit the trunk; the message names the keys."""


def is_weights_file(path: str | pathlib.Path) -> bool:
  """Whether `path` names a weights file (by its suffix) rather than an Orbax checkpoint."""
  return str(path).lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)


def _block_positions(params: Mapping) -> list[tuple[int, int]]:
  """(stage, index in stage) of each block, as torchvision numbers them (layer1.0 = (1, 0)).

  Every stage after the first starts with a strided block, hence a projection shortcut, and so
  does a Bottleneck trunk's first stage (its width changes): a block with `conv_proj` or block 0
  begins a stage.
  """
  blocks = sorted((int(m.group(2)), name) for name in params if (m := _BLOCK.match(name)))
  positions, stage, index = [], 0, 0
  for n, name in blocks:
    if n == 0 or "conv_proj" in params[name]:
      stage, index = stage + 1, 0
    positions.append((stage, index))
    index += 1
  return positions


def _torch_module(path: tuple[str, ...], positions: list[tuple[int, int]]) -> str:
  """The torchvision module name of the Flax module at `path` (without the variable name)."""
  if path == ("conv_init",):
    return "conv1"
  if path == ("bn_init",):
    return "bn1"
  block = _BLOCK.match(path[0]) if len(path) == 2 else None
  if block is None:
    raise ValueError(f"{'/'.join(path)} is not a module of a torchvision-layout ResNet.")
  stage, index = positions[int(block.group(2))]
  prefix = f"layer{stage}.{index}."
  if path[1] == "conv_proj":
    return prefix + "downsample.0"
  if path[1] == "norm_proj":
    return prefix + "downsample.1"
  numbered = _NUMBERED.match(path[1])
  if numbered is None:
    raise ValueError(f"{'/'.join(path)} is not a module of a torchvision-layout ResNet.")
  kind = "conv" if numbered.group(1) == "Conv" else "bn"
  return f"{prefix}{kind}{int(numbered.group(2)) + 1}"


# (collection, Flax variable) -> torch tensor name, and the layout change between them.
_VARIABLES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _to_torch(name: str, value: np.ndarray) -> np.ndarray:
  return np.transpose(value, (3, 2, 0, 1)) if name == "kernel" else value  # HWIO -> OIHW


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if name == "kernel" else tuple(shape)


def _from_torch(name: str, value: np.ndarray) -> np.ndarray:
  return np.transpose(value, (2, 3, 1, 0)) if name == "kernel" else value  # OIHW -> HWIO


def key_map(variables: Mapping) -> dict[tuple[str, ...], str]:
  """Flattened Flax variable path ('params', ..., 'kernel') -> torchvision state-dict key, for a
  trunk's {'params', 'batch_stats'} (arrays or shapes)."""
  positions = _block_positions(variables["params"])
  mapping = {}
  for path in traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")}):
    collection, *module, name = path
    mapping[path] = (
        f"{_torch_module(tuple(module), positions)}." f"{_VARIABLES[(collection, name)]}"
    )
  return mapping


def to_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
  """The trunk's {'params', 'batch_stats'} as a torchvision state dict of float32 NumPy arrays
  (without `fc`), `num_batches_tracked` included."""
  flat = traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")})
  state = {}
  for path, key in key_map(variables).items():
    state[key] = np.ascontiguousarray(_to_torch(path[-1], np.asarray(flat[path], np.float32)))
    if key.endswith(".running_var"):
      state[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
  return dict(sorted(state.items()))


def _strip_wrappers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  state = dict(state)
  for prefix in _WRAPPER_PREFIXES:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix) :]: v for k, v in state.items()}
  return state


def _listing(names, limit: int = 12) -> str:
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def from_state_dict(
    state: Mapping[str, np.ndarray],
    variables: Mapping,
    source: str = "the weights",
    model: str = "",
) -> dict:
  """{'params', 'batch_stats'} in the structure of `variables` from a torchvision state dict.

  Args:
    state: key -> array (NumPy, or anything `np.asarray` takes).
    variables: the trunk's {'params', 'batch_stats'} (shapes suffice, e.g. `jax.eval_shape`).
    source: the file, for messages.
    model: the trunk's description (e.g. the config fields that chose it), for messages.

  Raises:
    WeightsError: keys the trunk needs and `state` lacks, keys of `state` that are neither the
      trunk's, `fc.*` nor `num_batches_tracked`, and shape mismatches, all named in one message.
  """
  state = _strip_wrappers(state)
  mapping = key_map(variables)
  flat = traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")})
  needed = set(mapping.values())
  missing = needed - set(state)
  unexpected = {
      k
      for k in state
      if k not in needed and not _CLASSIFIER.match(k) and not k.endswith(".num_batches_tracked")
  }
  out, mismatched, not_float, not_finite = {}, [], [], []
  for path, key in mapping.items():
    if key not in state:
      continue
    raw = np.asarray(state[key])
    if not np.issubdtype(raw.dtype, np.floating):
      not_float.append(f"{key} ({raw.dtype})")
      continue
    if not np.isfinite(raw).all():
      not_finite.append(key)
      continue
    value = _from_torch(path[-1], raw.astype(np.float32))
    if value.shape != tuple(flat[path].shape):
      expected = _torch_shape(path[-1], flat[path].shape)
      mismatched.append(
          f"{key}: {tuple(np.shape(state[key]))} in the file, {expected} in the " "trunk"
      )
      continue
    out[path] = value
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} key(s) the trunk does not have: {_listing(unexpected)}")
  if mismatched:
    problems.append(
        f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:8])}"
        + (" ..." if len(mismatched) > 8 else "")
    )
  if not_float:
    problems.append(
        f"{len(not_float)} tensor(s) of integers or other non-float type where "
        f"the trunk holds weights: {_listing(not_float)}"
    )
  if not_finite:
    problems.append(
        f"{len(not_finite)} tensor(s) holding NaN or infinite values: " f"{_listing(not_finite)}"
    )
  if problems:
    described = f" ({model})" if model else ""
    raise WeightsError(f"{source} does not fit the trunk{described}: " + "; ".join(problems) + ".")
  return traverse_util.unflatten_dict(out)


def infer_architecture(
    state: Mapping[str, np.ndarray], source: str = "the weights"
) -> tuple[str, float]:
  """(trunk name in `resnet.TRUNKS`, width multiplier) of a torchvision-layout state dict.

  The block type is told by `conv3` (Bottleneck) or its absence (BasicBlock), the stage sizes by
  the largest block index of each `layer<s>`, the width by `conv1`'s output channels.

  Raises:
    WeightsError: the keys are not those of a torchvision-style ResNet, or no trunk of
      `resnet.TRUNKS` has those stages.
  """
  state = _strip_wrappers(state)
  if "conv1.weight" not in state:
    raise WeightsError(
        f"{source} has no conv1.weight, so it is not a torchvision-layout ResNet "
        f"state dict; its first keys: {_listing(state, 6)}."
    )
  sizes = []
  for stage in range(1, 5):
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))}
    sizes.append(max(indices) + 1 if indices else 0)
  bottleneck = any(re.match(r"^layer\d+\.\d+\.conv3\.", k) for k in state)
  block_cls = resnet.Bottleneck if bottleneck else resnet.BasicBlock
  stem_width = int(np.shape(state["conv1.weight"])[0])
  # The standard names first, so that a width-0.25 ResNet-18 reads as resnet18 at width 0.25.
  for name, factory in sorted(resnet.TRUNKS.items(), key=lambda kv: "_" in kv[0]):
    candidate = factory()
    if list(candidate.stage_sizes) == sizes and candidate.block_cls is block_cls:
      width = stem_width / candidate.num_filters
      if resnet.scaled_width(candidate.num_filters, width) == stem_width:
        return name, float(width) if not math.isclose(width, 1.0) else 1.0
  raise WeightsError(
      f"{source}: a ResNet of {block_cls.__name__} stages {sizes} is not one of "
      f"the trunks this project builds ({', '.join(sorted(resnet.TRUNKS))})."
  )


def read(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict in a `.safetensors` file, or in a PyTorch `.pth`/`.pt`/`.bin` file (torch
  needed; loaded with `weights_only=True`). A checkpoint holding the weights under 'state_dict'
  or 'model' (as training scripts save them) is unwrapped.

  Raises:
    WeightsError: the file is missing or unreadable, or torch is needed and absent.
  """
  path = storage.path(path, absolute=False)
  url = storage.is_url(path)
  if not path.is_file():
    raise WeightsError(f"Weights file {path} does not exist.")
  name = path.name.lower()
  if name.endswith(SAFETENSORS_SUFFIXES):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

    try:
      if url:
        return dict(safetensors_numpy.load(path.read_bytes()))
      return dict(safetensors_numpy.load_file(str(path)))
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
      raise WeightsError(f"{path} is not a readable .safetensors file: {e}") from e
  if not name.endswith(TORCH_SUFFIXES):
    raise WeightsError(f"{path}: weights files end in .safetensors, .pth, .pt or .bin.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightsError(
        f"{path} is a PyTorch file and torch is not installed: install torch, or "
        "convert it to .safetensors where torch is."
    ) from None
  try:
    loaded = torch.load(
        io.BytesIO(path.read_bytes()) if url else str(path), map_location="cpu", weights_only=True
    )
  except Exception as e:  # pickle and torch raise many kinds
    raise WeightsError(f"{path} could not be read by torch.load(weights_only=True): {e}") from e
  for wrapper in ("state_dict", "model"):
    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
      loaded = loaded[wrapper]
  if not isinstance(loaded, dict):
    raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict.")
  return {k: v.detach().cpu().numpy() for k, v in loaded.items() if hasattr(v, "detach")}


def write(
    state: Mapping[str, np.ndarray],
    path: str | pathlib.Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes a state dict to `path` as `.safetensors` (metadata: string -> string)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  path = storage.path(path, absolute=False)
  path.parent.mkdir(parents=True, exist_ok=True)
  metadata = {"format": "pt", **dict(metadata or {})}
  # Written as bytes rather than with save_file, which creates the file 0600: an exported trunk
  # is for sharing, so it gets the user's umask like any file they write.
  path.write_bytes(safetensors_numpy.save(dict(state), metadata=metadata))
