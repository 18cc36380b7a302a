"""A trained trunk for JAX users: `load_trunk` restores it, `embed` computes pooled features.

    import pirl_jax
    trunk, variables = pirl_jax.load_trunk("runs/pirl")   # a workdir, checkpoints/ or a step
    features = pirl_jax.embed(trunk, variables, images)   # (N, H, W, 3) uint8 -> (N, F) float32

The architecture comes from the workdir's `config.json` (or, for a torchvision-layout weights
file, from its tensors); the arrays are restored as NumPy, so any device count works, and `embed`
runs BatchNorm in inference mode on the default device. Images follow the project's input
convention: RGB, scaled to [0, 1] and normalised with the ImageNet mean and standard deviation,
at the size the trunk was trained at (`config.json`: `data.views.image_size` for pretraining,
`augment.image_size` for fine-tuning).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from pirl_jax import checkpointing
from pirl_jax import trunk_init
from pirl_jax.data import augment
from pirl_jax.models import resnet

# Every ResNet here reduces 32 px to at least one pixel; the variables' shapes do not depend on it.
_SHAPE_IMAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class LoadedTrunk:
  """What `restore` found: the module, its variables and where they came from."""

  trunk: resnet.ResNet
  variables: dict
  name: str
  width_multiplier: float
  checkpoint: str
  step: int | None


def restore(
    checkpoint: str | pathlib.Path,
    step: int | None = None,
    *,
    trunk: str = "",
    width_multiplier: float = 0.0,
    field: str = "checkpoint",
) -> LoadedTrunk:
  """Restores a trunk with its provenance; `load_trunk` returns the first two fields.

  Args:
    checkpoint: a pretraining or fine-tuning workdir, its `checkpoints/` folder, one step folder,
      or a torchvision-layout weights file (`.safetensors`; `.pth` with torch installed).
    step: the checkpoint step (default: the latest).
    trunk: the architecture (a `models.resnet.TRUNKS` name), needed only when no `config.json`
      of the run that wrote the checkpoint is found; it overrides the config's.
    width_multiplier: with `trunk`, its width (0: the config's, else 1).
    field: how errors name `checkpoint` (a command passes its flag, e.g. '--checkpoint').

  Raises:
    checkpointing.CheckpointMismatchError: no checkpoint there, no architecture known, or the
      checkpoint holds another architecture (the message names the parameter).
  """
  if not str(checkpoint):
    raise checkpointing.CheckpointMismatchError("load_trunk needs a checkpoint path.")
  init = trunk_init.resolve_init(
      str(checkpoint), step=-1 if step is None else int(step), field=field
  )
  model = dict((init.source_config or {}).get("model") or {})
  if trunk:
    model["trunk"] = trunk
    model["width_multiplier"] = width_multiplier or model.get("width_multiplier", 1.0)
  if "trunk" not in model:
    raise checkpointing.CheckpointMismatchError(
        f"{init.checkpoint}: no config.json of the run that wrote it was found, so the trunk's "
        f"architecture is unknown; pass trunk= (one of {', '.join(sorted(resnet.TRUNKS))})."
    )
  module = trunk_init.trunk_from_config(model)
  abstract = trunk_init.abstract_trunk_variables(module, _SHAPE_IMAGE_SIZE)
  described = f"{model['trunk']} at width {float(model.get('width_multiplier', 1.0)):g}"
  trunk_init.check_trunk(init, abstract, described)
  variables = trunk_init.restore_trunk(init, abstract)
  return LoadedTrunk(
      trunk=module,
      variables=variables,
      name=model["trunk"],
      width_multiplier=float(model.get("width_multiplier", 1.0)),
      checkpoint=init.checkpoint,
      step=init.step,
  )


def load_trunk(
    checkpoint: str | pathlib.Path,
    step: int | None = None,
    *,
    trunk: str = "",
    width_multiplier: float = 0.0,
) -> tuple[resnet.ResNet, dict]:
  """(trunk module, {'params', 'batch_stats'}) of a checkpoint; see `restore` for the arguments."""
  loaded = restore(checkpoint, step, trunk=trunk, width_multiplier=width_multiplier)
  return loaded.trunk, loaded.variables


def normalize_images(images) -> np.ndarray:
  """The training input's convention for RGB images: uint8 [0, 255] or floats [0, 1] -> minus
  the ImageNet mean, over its standard deviation; float32."""
  images = np.asarray(images)
  scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
  mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
  std = np.asarray(augment.IMAGENET_STD, np.float32)
  return ((images.astype(np.float32) * scale - mean) / std).astype(np.float32)


def embed(
    trunk: resnet.ResNet, variables: dict, images, *, normalize: bool = True, batch_size: int = 256
) -> np.ndarray:
  """Pooled trunk features of `images`, BatchNorm in inference mode: (N, F) float32 NumPy.

  Args:
    trunk, variables: from `load_trunk`.
    images: (N, H, W, 3) RGB; uint8 in [0, 255] or floats in [0, 1].
    normalize: subtract the ImageNet mean and divide by its standard deviation, as the training
      input was; False for images normalised already.
    batch_size: images per forward pass (the last batch is padded, so one shape compiles).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {images.shape}.")
  apply = jax.jit(lambda v, x: trunk.apply(v, x, train=False))
  batch_size = max(1, min(batch_size, len(images)))
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    chunk = normalize_images(chunk) if normalize else chunk.astype(np.float32)
    count = len(chunk)
    if count < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - count,) + chunk.shape[1:], np.float32)])
    outputs.append(np.asarray(apply(variables, jnp.asarray(chunk)))[:count])
  if not outputs:
    return np.zeros((0, trunk.num_features), np.float32)
  return np.concatenate(outputs).astype(np.float32)
