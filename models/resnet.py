"""ResNet: residual blocks with BatchNorm, the CIFAR-style 6n+2 family sized for small images.

Its BatchNorm is layers.BatchNorm (nn.BatchNorm's variables, statistics as matrix products): the
train step ran 1.09x faster for ResNet-8 and 1.11x for ResNet-14 (docs/performance.md)."""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxzoo.models import layers
from flaxzoo.models.registry import register_model


class ResidualBlock(nn.Module):
  """Two 3x3 conv-BN layers and an identity (or 1x1 conv-BN projection) shortcut."""

  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = functools.partial(layers.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.width, (3, 3), strides=self.stride, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)  # each block starts as the identity
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.width, (1, 1), strides=self.stride, use_bias=False)(x))
    return nn.relu(x + y)


@register_model("resnet")
class ResNet(nn.Module):
  """ResNet-(6n+2) (He et al., 2016, CIFAR variant) with BatchNorm; default ResNet-8, 8/16/32 wide."""

  num_classes: int = 10
  depth: int = 8  # 6n + 2: 8, 14, 20, 32, 44, 56, 110
  widths: Sequence[int] = (8, 16, 32)  # one per stage; stages after the first halve the resolution

  @staticmethod
  def check_arguments(values: dict) -> str | None:
    if values["depth"] < 8 or (values["depth"] - 2) % 6:
      return f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {values['depth']}"
    return None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    problem = self.check_arguments({"depth": self.depth})  # also for a directly built ResNet
    if problem:
      raise ValueError(f"resnet {problem}")
    blocks_per_stage = (self.depth - 2) // 6
    # nn.Conv, not layers.Conv: with BatchNorm after it, XLA fuses the matrix-product form
    # differently and ResNet's training would no longer repeat its published runs bit for bit.
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(layers.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, width in enumerate(self.widths):
      for block in range(blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, stride)(x, train)
    x = jnp.mean(x, axis=(1, 2))  # global average pool
    return nn.Dense(self.num_classes, name="head")(x)
