"""ResNet v1.5 trunks in Flax linen with torchvision-style initialisation.

The layout follows torchvision's ``resnet*`` (and flax ``examples/imagenet``): a 7x7/2 stem conv, BatchNorm,
ReLU and a 3x3/2 max pool, then four stages of Basic or Bottleneck blocks where the stride of a
downsampling Bottleneck sits on its 3x3 conv (v1.5). Padding is explicit and torch-like, so a torchvision
checkpoint maps onto these parameters one to one and the parameter counts match exactly
(ResNet-50 with a 1000-way classifier: 25,557,032).

With ``num_classes=None`` (the default) the module returns the global-average-pooled res5 features,
``(B, num_features)`` float32; otherwise a Linear classifier is appended.

BatchNorm uses flax momentum 0.9 (= torch momentum 0.1) and eps 1e-5; running statistics live in the
``batch_stats`` collection and ``train`` selects batch statistics (and updates the running averages when
``batch_stats`` is mutable) versus the running averages.
"""

import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pirl_jax.models import norm as norm_lib

ModuleDef = Any
Dtype = Any

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_linear_init(fan_in: int) -> Callable[..., jax.Array]:
  """Returns torch.nn.Linear's default initializer, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  torch uses the same bound for the weight and the bias; the bias shape does not reveal ``fan_in``,
  hence the closure.

  Args:
    fan_in: Number of input features of the layer.

  Returns:
    An initializer ``init(key, shape, dtype=float32)``.
  """
  if fan_in <= 0:
    raise ValueError(f'fan_in must be positive, got {fan_in}')
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def torch_dense(
    features: int, fan_in: int, *, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.Dense:
  """Returns an ``nn.Dense`` initialised like torch.nn.Linear (kernel and bias uniform ±1/sqrt(fan_in)).

  Args:
    features: Output features.
    fan_in: Input features (the size of the last axis the layer will be applied to).
    dtype: Compute dtype; parameters stay float32.
    name: Optional submodule name.
  """
  init = torch_linear_init(fan_in)
  return nn.Dense(
      features, kernel_init=init, bias_init=init, dtype=dtype, param_dtype=jnp.float32, name=name
  )


_PAD3 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs), expansion 1."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)
  zero_init_residual: bool = False

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), padding=_PAD3)(y)
    y = self.norm(
        scale_init=nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    )(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, padding='VALID', name='conv_proj')(
          residual
      )
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck block (1x1, strided 3x3, 1x1), expansion 4."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)
  zero_init_residual: bool = False

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1), padding='VALID')(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3)(y)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters * self.expansion, (1, 1), padding='VALID')(y)
    y = self.norm(
        scale_init=nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    )(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters * self.expansion, (1, 1), self.strides, padding='VALID', name='conv_proj'
      )(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


def scaled_width(num_filters: int, width_multiplier: float) -> int:
  """`num_filters * width_multiplier`, rounded: the stem width of a trunk."""
  width = int(round(num_filters * width_multiplier))
  if width < 1:
    raise ValueError(
        f'num_filters * width_multiplier must be >= 1, got {num_filters} * ' f'{width_multiplier}'
    )
  return width


class ResNet(nn.Module):
  """ResNet v1.5 trunk (optionally with a classifier).

  Attributes:
    stage_sizes: Number of blocks in each stage.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_filters: Width of the stem and the first stage before the multiplier.
    width_multiplier: Scales every conv width (stem included, as VISSL's ``width_multiplier``), so the
      feature dim scales by the same factor.
    num_classes: ``None`` returns the pooled features; an int appends a Linear classifier.
    dtype: Compute dtype (e.g. bfloat16); parameters and the returned features/logits are float32.
    act: Activation.
    small_input: Replace the 7x7/2 stem and max pool by a 3x3/1 conv (CIFAR-style), for tiny images.
    zero_init_residual: Initialise the last BN scale of every block to zero (torchvision option, off by
      default as in torchvision and VISSL).
    bn_momentum: Flax-convention BatchNorm momentum (0.9 = torch 0.1).
    bn_epsilon: BatchNorm epsilon.
    bn_groups: 1: batch statistics over the whole batch; n > 1: over each of n contiguous parts
      of it (`norm.BatchNorm`: per-device statistics when n is the device count).
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  width_multiplier: float = 1.0
  num_classes: int | None = None
  dtype: Dtype = jnp.float32
  act: Callable = nn.relu
  small_input: bool = False
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_groups: int = 1

  @property
  def num_features(self) -> int:
    """Dimension of the pooled res5 features (2048 for ResNet-50 at width 1)."""
    width = scaled_width(self.num_filters, self.width_multiplier)
    return width * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

  @nn.compact
  def __call__(self, x, train: bool):
    """Runs the network.

    Args:
      x: Images ``(B, H, W, C)``.
      train: Use batch statistics in BatchNorm (and update the running averages when ``batch_stats``
        is mutable); ``False`` uses the running averages.

    Returns:
      ``(B, num_features)`` pooled features, or ``(B, num_classes)`` logits; float32.
    """
    width = scaled_width(self.num_filters, self.width_multiplier)
    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
    )
    if self.bn_groups > 1:
      batch_norm = functools.partial(norm_lib.BatchNorm, groups=self.bn_groups)
    else:
      batch_norm = nn.BatchNorm
    norm = functools.partial(
        batch_norm,
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        dtype=self.dtype,
        param_dtype=jnp.float32,
    )

    if self.small_input:
      x = conv(width, (3, 3), padding=_PAD3, name='conv_init')(x)
      x = norm(name='bn_init')(x)
      x = self.act(x)
    else:
      x = conv(width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv_init')(x)
      x = norm(name='bn_init')(x)
      x = self.act(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD3)

    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
            filters=width * 2**i,
            strides=strides,
            conv=conv,
            norm=norm,
            act=self.act,
            zero_init_residual=self.zero_init_residual,
        )(x)

    # Pool in float32 so bf16 compute does not leak into the heads/losses.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes is not None:
      x = torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name='head')(x)
      x = x.astype(jnp.float32)
    return x


ResNet18 = functools.partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=[3, 4, 23, 3], block_cls=Bottleneck)

# Test/smoke-run variants: same code paths, a tiny fraction of the compute.
ResNetTiny = functools.partial(
    ResNet, stage_sizes=[1, 1, 1, 1], block_cls=BasicBlock, num_filters=8
)  # 64-d features
ResNetTinyBottleneck = functools.partial(
    ResNet, stage_sizes=[1, 1, 1, 1], block_cls=Bottleneck, num_filters=8
)  # 256-d features
ResNet18Small = functools.partial(
    ResNet, stage_sizes=[2, 2, 2, 2], block_cls=BasicBlock, num_filters=16
)  # 128-d features

TRUNKS: dict[str, Callable[..., ResNet]] = {
    'resnet18': ResNet18,
    'resnet34': ResNet34,
    'resnet50': ResNet50,
    'resnet101': ResNet101,
    'resnet_tiny': ResNetTiny,
    'resnet_tiny_bottleneck': ResNetTinyBottleneck,
    'resnet18_small': ResNet18Small,
}


def get_trunk(
    name: str, width_multiplier: float = 1.0, dtype: Dtype = jnp.float32, **kwargs
) -> ResNet:
  """Builds a feature trunk (``num_classes=None``) by name.

  Args:
    name: One of ``TRUNKS`` (case-insensitive), e.g. ``'resnet50'``.
    width_multiplier: Width multiplier applied to every conv.
    dtype: Compute dtype; parameters stay float32.
    **kwargs: Further ``ResNet`` attributes (e.g. ``small_input=True``).

  Returns:
    An unbound ``ResNet`` module returning pooled features.

  Raises:
    ValueError: Unknown name (the message lists the valid ones).
  """
  key = name.lower()
  if key not in TRUNKS:
    raise ValueError(f'Unknown trunk {name!r}; valid names: {", ".join(sorted(TRUNKS))}')
  return TRUNKS[key](width_multiplier=width_multiplier, dtype=dtype, **kwargs)


def feature_dim(name: str, width_multiplier: float = 1.0) -> int:
  """Dimension of the pooled features of trunk ``name`` (e.g. 2048 for ``resnet50``)."""
  return get_trunk(name, width_multiplier).num_features
