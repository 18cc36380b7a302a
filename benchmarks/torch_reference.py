"""The project's PyTorch reference of one PIRL pretraining step, for the `step` benchmark.

One step does the work of `pirl_jax.train.step` on random data: a ResNet v1.5 trunk over the B
jigsaw examples' 9 tiles and their B images, the image head f (Linear to 128) and the jigsaw head
g (a per-tile Linear to 128, the 9 tile embeddings concatenated in their given order, Linear
1152 -> 128), both L2-normalised; the two-term InfoNCE loss against a memory bank (N x 128, K
negatives per query drawn uniformly from the rows other than the query's own, the positive row =
the example's index, temperature 0.07, lambda 0.5); SGD with momentum 0.9 and weight decay (off
BatchNorm parameters and biases); then the bank write m_i <- normalise(0.5 m_i + 0.5 f_i).

Two layouts:
  batched    the B*9 tiles go through the trunk as one batch; negatives drawn and gathered for
             the whole batch at once. `--channels-last` keeps inputs and weights channels-last.
  published  the structure of the public PyTorch reimplementation of PIRL: nine trunk passes,
             one per tile position, and the negatives drawn and gathered in a per-sample loop.

Only torch is needed (no torchvision). It prints one JSON line, e.g.
  python benchmarks/torch_reference.py --arch resnet50 --batch 8 --image 224 --tile 64 --steps 3
  {"impl": "torch", "layout": "batched", ..., "step_s": 1.83, "images_per_s": 4.37}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

EMBED_DIM = 128
NUM_TILES = 9
LAYOUTS = ("batched", "published")


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; expansion 1."""

  expansion = 1

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.proj = _projection(in_channels, channels, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class Bottleneck(nn.Module):
  """1x1, 3x3, 1x1 convolutions, the stride on the 3x3 (v1.5); expansion 4."""

  expansion = 4

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    out_channels = channels * self.expansion
    self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_channels)
    self.proj = _projection(in_channels, out_channels, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
  """The shortcut's strided 1x1 convolution + BatchNorm where the shape changes, else None."""
  if stride == 1 and in_channels == out_channels:
    return None
  return nn.Sequential(
      nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
  )


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetTrunk(nn.Module):
  """ResNet v1.5 up to the global average pool: (N, 3, H, W) -> (N, num_features).

  Args:
    arch: A key of ARCHS.
    width: Channels of the stem and of the first stage (64 in the standard ResNets); stage i has
      width * 2**i (times the block's expansion at its output).
  """

  def __init__(self, arch: str, width: int = 64):
    super().__init__()
    block, depths = ARCHS[arch]
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    in_channels = width
    for stage, depth in enumerate(depths):
      channels = width * 2**stage
      for i in range(depth):
        layers.append(block(in_channels, channels, 2 if stage > 0 and i == 0 else 1))
        in_channels = channels * block.expansion
    self.body = nn.Sequential(*layers)
    self.num_features = in_channels
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)


class PIRLNet(nn.Module):
  """The shared trunk with the image head f and the jigsaw head g (linear heads)."""

  def __init__(
      self, arch: str, width: int = 64, embed_dim: int = EMBED_DIM, num_tiles: int = NUM_TILES
  ):
    super().__init__()
    self.trunk = ResNetTrunk(arch, width)
    features = self.trunk.num_features
    self.num_tiles = num_tiles
    self.f = nn.Linear(features, embed_dim)
    self.g_tile = nn.Linear(features, embed_dim)
    self.g_concat = nn.Linear(num_tiles * embed_dim, embed_dim)

  def forward(
      self, images: torch.Tensor, tiles: torch.Tensor, layout: str = "batched"
  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeds both views.

    Args:
      images: (B, 3, S, S) image views.
      tiles: (B, 9, 3, T, T) jigsaw tiles in their given (shuffled) order.
      layout: "batched" (one trunk pass over the B*9 tiles) or "published" (one per position).

    Returns:
      (f_hat, g_hat), each (B, 128) and L2-normalised.
    """
    batch = images.shape[0]
    # Tiles before images, as pirl_jax.models.pirl: the order of the BatchNorm statistics updates.
    if layout == "batched":
      tile_embed = self.g_tile(self.trunk(tiles.flatten(0, 1))).reshape(batch, -1)
    elif layout == "published":
      tile_embed = torch.cat(
          [self.g_tile(self.trunk(tiles[:, t])) for t in range(self.num_tiles)], dim=1
      )
    else:
      raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    f = self.f(self.trunk(images))
    g = self.g_concat(tile_embed)
    return F.normalize(f, dim=1), F.normalize(g, dim=1)


def draw_negatives(
    index: torch.Tensor, num_negatives: int, num_rows: int, generator: torch.Generator | None = None
) -> torch.Tensor:
  """(B, K) row indices, each uniform over the num_rows - 1 rows other than the query's index."""
  neg = torch.randint(0, num_rows - 1, (index.shape[0], num_negatives), generator=generator)
  return neg + (neg >= index[:, None]).long()


def gather_rows(
    bank: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor, per_sample: bool = False
) -> torch.Tensor:
  """(B, K + 1, D) bank rows, column 0 the positive (row `index`), then the negatives."""
  if per_sample:
    return torch.stack(
        [bank[torch.cat([index[b : b + 1], negatives[b]])] for b in range(index.shape[0])]
    )
  return bank[torch.cat([index[:, None], negatives], dim=1)]


def sample_rows(
    bank: torch.Tensor,
    index: torch.Tensor,
    num_negatives: int,
    layout: str = "batched",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
  """(negatives (B, K), rows (B, K + 1, D)): fresh negatives and the rows to score against.

  The published layout draws and gathers sample by sample in a Python loop; the draws are the
  same in distribution.
  """
  if layout == "published":
    negatives = torch.stack(
        [
            draw_negatives(index[b : b + 1], num_negatives, bank.shape[0], generator)[0]
            for b in range(index.shape[0])
        ]
    )
    return negatives, gather_rows(bank, index, negatives, per_sample=True)
  negatives = draw_negatives(index, num_negatives, bank.shape[0], generator)
  return negatives, gather_rows(bank, index, negatives)


def infonce(query: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
  """Softmax cross-entropy of the scores <m_j, q> / tau with the positive (column 0) as target.

  Args:
    query: (B, D) L2-normalised embeddings.
    rows: (B, K + 1, D) bank rows, column 0 the positive; constants (the bank has no gradient).
    temperature: tau.

  Returns:
    The loss, a scalar mean over the batch.
  """
  logits = torch.einsum("bkd,bd->bk", rows, query) / temperature
  return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


@torch.no_grad()
def update_bank(
    bank: torch.Tensor, index: torch.Tensor, f_hat: torch.Tensor, momentum: float = 0.5
) -> None:
  """Writes m_i <- normalise(momentum * m_i + (1 - momentum) * f_i) into `bank` in place."""
  bank[index] = F.normalize(momentum * bank[index] + (1.0 - momentum) * f_hat.detach(), dim=1)


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
  """SGD with momentum; weight decay on conv and linear weights only (not BatchNorm, biases)."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.SGD(
      [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
      lr=lr,
      momentum=momentum,
  )


@dataclasses.dataclass(frozen=True)
class LossConfig:
  num_negatives: int = 1000
  temperature: float = 0.07
  jigsaw_weight: float = 0.5  # lambda
  bank_momentum: float = 0.5


@dataclasses.dataclass
class StepOutputs:
  """What one step computed, detached: the loss, embeddings and negatives of both terms."""

  loss: torch.Tensor
  f_hat: torch.Tensor
  g_hat: torch.Tensor
  negatives_image: torch.Tensor
  negatives_jigsaw: torch.Tensor


def train_step(
    model: PIRLNet,
    optimizer: torch.optim.Optimizer,
    bank: torch.Tensor,
    images: torch.Tensor,
    tiles: torch.Tensor,
    index: torch.Tensor,
    loss_cfg: LossConfig,
    layout: str = "batched",
    generator: torch.Generator | None = None,
) -> StepOutputs:
  """One PIRL step: embed, score both terms against the old bank rows, update, write the bank.

  L = lambda * InfoNCE(g_hat; m) + (1 - lambda) * InfoNCE(f_hat; m), each term with its own K
  negatives. `bank` is updated in place after the loss has read it.
  """
  f_hat, g_hat = model(images, tiles, layout)
  neg_j, rows_j = sample_rows(bank, index, loss_cfg.num_negatives, layout, generator)
  neg_i, rows_i = sample_rows(bank, index, loss_cfg.num_negatives, layout, generator)
  lam = loss_cfg.jigsaw_weight
  loss = lam * infonce(g_hat, rows_j, loss_cfg.temperature) + (1.0 - lam) * infonce(
      f_hat, rows_i, loss_cfg.temperature
  )
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  optimizer.step()
  update_bank(bank, index, f_hat, loss_cfg.bank_momentum)
  return StepOutputs(loss.detach(), f_hat.detach(), g_hat.detach(), neg_i, neg_j)


def random_batch(
    batch: int,
    image: int,
    tile: int,
    num_rows: int,
    channels_last: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Random (images (B, 3, S, S), tiles (B, 9, 3, T, T), index (B,) distinct rows).

  With `channels_last` the pixels are laid out channels-last in memory (as the JAX pipeline's
  NHWC batches), so that flattening the tiles to (B*9, 3, T, T) keeps that layout without a copy.
  """
  if channels_last:
    images = torch.randn(batch, image, image, 3, generator=generator).permute(0, 3, 1, 2)
    tiles = torch.randn(batch, NUM_TILES, tile, tile, 3, generator=generator).permute(0, 1, 4, 2, 3)
  else:
    images = torch.randn(batch, 3, image, image, generator=generator)
    tiles = torch.randn(batch, NUM_TILES, 3, tile, tile, generator=generator)
  index = torch.randperm(num_rows, generator=generator)[:batch]
  return images, tiles, index


def random_bank(
    num_rows: int, dim: int = EMBED_DIM, generator: torch.Generator | None = None
) -> torch.Tensor:
  """A (num_rows, dim) bank of random unit rows."""
  return F.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
  p.add_argument("--width", type=int, default=64, help="channels of the stem and first stage")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image", type=int, default=224, help="image view size S")
  p.add_argument("--tile", type=int, default=64, help="jigsaw tile size T")
  p.add_argument("--bank", type=int, default=2000, help="memory-bank rows N (dataset size)")
  p.add_argument("--negatives", type=int, default=1000, help="K per query and loss term")
  p.add_argument("--temperature", type=float, default=0.07)
  p.add_argument("--jigsaw_weight", type=float, default=0.5, help="lambda")
  p.add_argument("--lr", type=float, default=0.03, help="SGD learning rate (momentum 0.9)")
  p.add_argument("--weight_decay", type=float, default=1e-4)
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
  p.add_argument("--layout", default="batched", choices=LAYOUTS)
  p.add_argument(
      "--channels-last",
      dest="channels_last",
      action="store_true",
      help="channels-last memory format for the inputs and the model",
  )
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Builds the model, bank and a random batch, times `--steps` steps; prints one JSON line."""
  a = parse_args(argv)
  if a.threads:
    torch.set_num_threads(a.threads)
  if a.steps < 1:
    raise SystemExit("--steps must be >= 1")
  if a.batch > a.bank or a.bank < 2:
    raise SystemExit(f"--bank {a.bank} needs >= 2 rows and >= --batch ({a.batch})")
  torch.manual_seed(a.seed)
  gen = torch.Generator().manual_seed(a.seed)
  model = PIRLNet(a.arch, a.width)
  if a.channels_last:
    model = model.to(memory_format=torch.channels_last)
  model.train()
  optimizer = make_optimizer(model, a.lr, weight_decay=a.weight_decay)
  bank = random_bank(a.bank, generator=gen)
  images, tiles, index = random_batch(a.batch, a.image, a.tile, a.bank, a.channels_last, gen)
  loss_cfg = LossConfig(
      num_negatives=a.negatives, temperature=a.temperature, jigsaw_weight=a.jigsaw_weight
  )

  def step():
    return train_step(model, optimizer, bank, images, tiles, index, loss_cfg, a.layout, gen)

  for _ in range(a.warmup):
    step().loss.item()
  start = time.perf_counter()
  for _ in range(a.steps):
    out = step()
  loss = out.loss.item()  # waits for the last step where the device runs asynchronously
  step_s = (time.perf_counter() - start) / a.steps
  record = {
      "impl": "torch",
      "layout": a.layout,
      "channels_last": a.channels_last,
      "arch": a.arch,
      "width": a.width,
      "batch": a.batch,
      "image": a.image,
      "tile": a.tile,
      "bank": a.bank,
      "negatives": a.negatives,
      "steps": a.steps,
      "warmup": a.warmup,
      "threads": torch.get_num_threads(),
      "torch": torch.__version__,
      "loss": loss,
      "step_s": step_s,
      "images_per_s": a.batch / step_s,
  }
  print(json.dumps(record), flush=True)
  return record


if __name__ == "__main__":
  main()
