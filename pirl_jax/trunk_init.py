"""A trunk's parameters and BatchNorm statistics from a checkpoint: what evaluation starts from.

A checkpoint is named by a pretraining or fine-tuning workdir, its `checkpoints/` folder, one step
folder, or the item folder inside it (`checkpointing.resolve_checkpoint`). The trunk sits under
`params['trunk']` / `batch_stats['trunk']` in the states this project writes, or at their top
level in a bare trunk checkpoint. The architecture is read from the workdir's `config.json`
when there is one. A weights file in torchvision's ResNet layout (`.safetensors`, or `.pth` with
torch installed; `models.torch_weights`) is the other kind: its architecture is read from its
tensors' shapes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from pirl_jax import checkpointing
from pirl_jax import storage
from pirl_jax.models import resnet
from pirl_jax.models import torch_weights

TRUNK = "trunk"


@dataclasses.dataclass(frozen=True)
class Init:
  """Where a trunk comes from.

  Attributes:
    kind: 'scratch', 'pirl', 'checkpoint' or 'weights'.
    checkpoint: the folder or weights file the user gave ('' for scratch).
    item_dir: the Orbax item folder that is restored (None for scratch and weights files).
    step: the checkpoint's step, when known.
    source_config: the checkpoint's workdir config.json, when there is one; for a weights file,
      its architecture as {'model': {'trunk', 'width_multiplier'}}.
    weights: a weights file's state dict (torchvision keys -> NumPy arrays).
  """

  kind: str
  checkpoint: str = ""
  item_dir: str | None = None
  step: int | None = None
  source_config: dict | None = None
  weights: dict | None = dataclasses.field(default=None, repr=False, compare=False)


def find_workdir_config(item_dir: pathlib.Path, given: pathlib.Path) -> dict | None:
  """The config.json of the run that wrote a checkpoint: the first one on the way up."""
  for folder in [given, *item_dir.parents][:5]:
    path = folder / "config.json"
    if path.is_file():
      try:
        return json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise checkpointing.CheckpointMismatchError(
            f"{path} is not valid JSON ({e}); it should be the resolved config the "
            "checkpoint's run wrote."
        ) from e
  return None


def resolve_init(
    checkpoint: str, kind: str = "", step: int = -1, field: str = "init.checkpoint"
) -> Init:
  """Finds the checkpoint a user named and infers its kind when `kind` is empty.

  Args:
    checkpoint: '' for scratch, a folder or a weights file (see the module docstring).
    kind: '', 'scratch', 'pirl', 'checkpoint' or 'weights'; '' infers it ('weights' for a
      .safetensors/.pth/.pt/.bin file, 'pirl' when the workdir's config.json is a pretraining
      config).
    step: the checkpoint step; -1 = the latest.
    field: the config field or flag the path came from, for error messages.
  """
  if not checkpoint:
    return Init(kind="scratch")
  given = storage.path(checkpoint)
  if kind == "weights" or (not kind and torch_weights.is_weights_file(given)):
    return _resolve_weights_file(given, field)
  item_dir, found_step = checkpointing.resolve_checkpoint(
      given, None if step < 0 else int(step), field=field
  )
  source_config = find_workdir_config(item_dir, given)
  if not kind:
    is_pirl = source_config is not None and source_config.get("mode") == "pretrain"
    kind = "pirl" if is_pirl else "checkpoint"
  return Init(
      kind=kind,
      checkpoint=str(given),
      item_dir=str(item_dir),
      step=found_step,
      source_config=source_config,
  )


def _resolve_weights_file(path: pathlib.Path, field: str) -> Init:
  try:
    weights = torch_weights.read(path)
    trunk, width = torch_weights.infer_architecture(weights, source=str(path))
  except torch_weights.WeightsError as e:
    raise torch_weights.WeightsError(f"{field}: {e}") from None
  logging.info(
      "%s: a %s weights file (%s at width %g, %d tensors).",
      field,
      "safetensors" if path.suffix == ".safetensors" else "PyTorch",
      trunk,
      width,
      len(weights),
  )
  return Init(
      kind="weights",
      checkpoint=str(path),
      source_config={"model": {"trunk": trunk, "width_multiplier": width}},
      weights=weights,
  )


def inherit_trunk(config: ml_collections.ConfigDict, init: Init) -> ml_collections.ConfigDict:
  """A copy of `config` with `init.kind` filled in and, if inherited, the checkpoint's trunk."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.init.kind = init.kind
  model = (init.source_config or {}).get("model") or {}
  if init.kind != "scratch" and config.init.inherit_trunk and "trunk" in model:
    trunk, width = model["trunk"], float(model.get("width_multiplier", 1.0))
    if (trunk, width) != (config.model.trunk, float(config.model.width_multiplier)):
      logging.info(
          "Using the checkpoint's trunk %s at width %g (from its %s) instead "
          "of model.trunk=%s, model.width_multiplier=%g (init.inherit_trunk=True).",
          trunk,
          width,
          "tensors" if init.kind == "weights" else "config.json",
          config.model.trunk,
          config.model.width_multiplier,
      )
    config.model.trunk, config.model.width_multiplier = trunk, width
  return config


def abstract_trunk_variables(trunk, image_size: int) -> dict:
  """{'params', 'batch_stats'} of `trunk` as shapes; nothing is computed."""
  return jax.eval_shape(
      lambda: trunk.init(
          jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False
      )
  )


def _targets(item_dir: str, variables: dict) -> dict:
  # A state of this project keeps the trunk under 'trunk'; a bare trunk sits at the top level.
  nested = (
      checkpointing.subtree(checkpointing.array_metadata(item_dir), ("params", TRUNK)) is not None
  )
  prefix = (TRUNK,) if nested else ()
  return {
      ("params",) + prefix: variables["params"],
      ("batch_stats",) + prefix: variables["batch_stats"],
  }


def check_trunk(init: Init, variables: dict, model_fields: str) -> None:
  """Fails early, before any data is read, if the checkpoint's trunk does not fit `variables`.

  Args:
    init: the resolved checkpoint.
    variables: the model's trunk variables (shapes suffice).
    model_fields: the config fields that chose the architecture, for the message.

  Raises:
    checkpointing.CheckpointMismatchError: naming the parameter and both shapes.
    torch_weights.WeightsError: a weights file that does not fit, naming the keys.
  """
  if init.kind == "weights":
    torch_weights.from_state_dict(
        init.weights, variables, source=init.checkpoint, model=model_fields
    )
    return
  try:
    checkpointing.check_subtrees(init.item_dir, _targets(init.item_dir, variables))
  except checkpointing.CheckpointMismatchError as e:
    saved = (init.source_config or {}).get("model") or {}
    told = (
        f" Its run's config.json has model.trunk={saved.get('trunk')!r}, "
        f"model.width_multiplier={saved.get('width_multiplier')!r}."
        if saved
        else ""
    )
    raise checkpointing.CheckpointMismatchError(
        f"{e}\nThe model is {model_fields}; {init.checkpoint!r} holds another "
        f"architecture.{told}"
    ) from None


def restore_trunk(init: Init, variables: dict, sharding=None) -> dict:
  """The checkpoint's trunk as {'params', 'batch_stats'} in the structure of `variables`.

  Args:
    init: the resolved checkpoint.
    variables: the model's trunk variables (shapes suffice).
    sharding: where the arrays go (e.g. replicated on the mesh); None gives NumPy arrays.
  """
  if init.kind == "weights":
    restored = torch_weights.from_state_dict(init.weights, variables, source=init.checkpoint)
    return restored if sharding is None else jax.device_put(restored, sharding)
  targets = _targets(init.item_dir, variables)
  params_key, stats_key = targets
  restored = checkpointing.restore_subtrees(init.item_dir, targets, sharding=sharding)
  return {"params": restored[params_key], "batch_stats": restored[stats_key]}


def trunk_from_config(model_cfg: dict | ml_collections.ConfigDict):
  """The trunk module a run's `model` config block describes."""
  return resnet.get_trunk(
      model_cfg["trunk"], width_multiplier=float(model_cfg.get("width_multiplier", 1.0))
  )
