"""Parity with PyTorch: a plain-PyTorch ResNet in torchvision's layout and names (written here; no
torchvision needed) and the Flax trunk compute the same features after weights cross over, in both
directions, through `.safetensors` and `.pth`. Skipped without torch (optional:
requirements-bench.txt).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch not installed (pip install -r requirements-test.txt, as the test command does)",
)
from torch import nn  # pylint: disable=g-import-not-at-top,wrong-import-position

from pirl_jax import trunk_init  # pylint: disable=g-import-not-at-top,wrong-import-position
from pirl_jax.models import resnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from pirl_jax.models import torch_weights  # pylint: disable=g-import-not-at-top,wrong-import-position


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's structure and parameter names; forward returns pooled features."""

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)


ARCHITECTURES = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def _torch_model(name, seed):
  """A model with random weights and random BatchNorm statistics, in eval mode."""
  torch.manual_seed(seed)
  model = TorchResNet(*ARCHITECTURES[name])
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.normal_(1, 0.1)
        module.bias.normal_(0, 0.1)
  return model.eval()


def _images(seed=0, size=64):
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def _torch_features(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torch_weights_imported_into_flax_give_the_same_features(tmp_path, name, suffix):
  model = _torch_model(name, seed=1)
  path = tmp_path / f"{name}{suffix}"
  if suffix == ".pth":
    torch.save({"state_dict": model.state_dict()}, path)  # as training scripts save it
  else:
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

    save_file(model.state_dict(), str(path))
  state = torch_weights.read(path)
  assert torch_weights.infer_architecture(state) == (name, 1.0)
  trunk = resnet.get_trunk(name)
  variables = torch_weights.from_state_dict(state, trunk_init.abstract_trunk_variables(trunk, 64))
  images = _images()
  got = np.asarray(trunk.apply(variables, images, train=False))
  np.testing.assert_allclose(got, _torch_features(model, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_flax_weights_exported_to_torch_give_the_same_features(tmp_path, name):
  trunk = resnet.get_trunk(name)
  variables = trunk.init(jax.random.PRNGKey(2), jnp.zeros((1, 64, 64, 3)), train=False)
  # A few training steps' worth of BatchNorm statistics, so the running averages are not 0/1.
  _, updates = trunk.apply(
      variables, _images(seed=5) * 2 + 0.5, train=True, mutable=["batch_stats"]
  )
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  path = tmp_path / "trunk.safetensors"
  torch_weights.write(torch_weights.to_state_dict(jax.device_get(variables)), path)

  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  model = TorchResNet(*ARCHITECTURES[name])
  missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
  assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
  model.eval()
  images = _images(seed=3)
  np.testing.assert_allclose(
      _torch_features(model, images),
      np.asarray(trunk.apply(variables, images, train=False)),
      rtol=1e-4,
      atol=1e-4,
  )
