r"""Exports a trunk to `.safetensors` in torchvision's ResNet key layout, for PyTorch users.

  python -m pirl_jax.commands.export --checkpoint=runs/pirl --out=trunk.safetensors
  python -m pirl_jax.commands.export --checkpoint=runs/pirl-finetune/best --out=finetuned.safetensors

The checkpoint is a pretraining or fine-tuning workdir, its `checkpoints/` (or `best/`) folder or
one step folder; the architecture comes from the run's `config.json`. The file holds the trunk's
parameters and BatchNorm statistics under torchvision's names (`conv1.weight`, `bn1.running_mean`,
`layer1.0.conv1.weight`, ..., no `fc`), and string metadata: architecture, width multiplier,
source checkpoint and step. In PyTorch (a width-1 trunk; other widths need a model of that width):

    from safetensors.torch import load_file
    import torchvision
    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(load_file("trunk.safetensors"), strict=False)
    # missing == ['fc.weight', 'fc.bias'], unexpected == []

Inputs are RGB in [0, 1] normalised with the ImageNet mean/std, as torchvision's.
"""

from __future__ import annotations

import sys

import numpy as np

from pirl_jax import storage
from pirl_jax.models import torch_weights


def export(checkpoint: str, out: str, step: int | None = None) -> dict:
  """Writes the trunk of `checkpoint` to `out`; returns what was written (for the message)."""
  out_path = storage.path(out)
  if not out_path.name.endswith(".safetensors"):
    raise torch_weights.WeightsError(f"--out={out}: the file name must end in .safetensors.")
  # Imported here, after the command has configured TensorFlow's logging (the data modules
  # that inference uses import TensorFlow).
  from pirl_jax import inference  # pylint: disable=g-import-not-at-top

  loaded = inference.restore(checkpoint, step, field="--checkpoint")
  state = torch_weights.to_state_dict(loaded.variables)
  metadata = {
      "architecture": loaded.name,
      "width_multiplier": f"{loaded.width_multiplier:g}",
      "source": loaded.checkpoint,
      "step": "" if loaded.step is None else str(loaded.step),
      "layout": "torchvision ResNet (no fc); input RGB [0, 1], ImageNet mean/std",
  }
  torch_weights.write(state, out_path, metadata)
  parameters = sum(
      int(np.prod(v.shape))
      for k, v in state.items()
      if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
  )
  return dict(out=str(out_path), tensors=len(state), parameters=parameters, **metadata)


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      "checkpoint",
      None,
      "A pretraining or fine-tuning workdir, its "
      "checkpoints/ (or best/) folder or one step folder.",
  )
  flags.DEFINE_string("out", None, "The .safetensors file to write.")
  flags.DEFINE_integer("step", -1, "The checkpoint step (-1: the latest).")
  flags.mark_flags_as_required(["checkpoint", "out"])

  def run(_):
    f = flags.FLAGS
    written = export(f.checkpoint, f.out, None if f.step < 0 else f.step)
    print(
        f"Wrote {written['tensors']} tensors ({written['parameters']:,} parameters) of "
        f"{written['architecture']} at width {written['width_multiplier']} from "
        f"{written['source']} (step {written['step']}) to {written['out']}."
    )

  return program.run_program(run, argv or sys.argv)


if __name__ == "__main__":
  sys.exit(main())
