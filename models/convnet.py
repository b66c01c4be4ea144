"""ConvNet: the default MNIST model."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxzoo.models import layers
from flaxzoo.models.registry import register_model


@register_model("convnet")
class ConvNet(nn.Module):
  """Blocks of 3x3 conv + ReLU layers, each block ending in a 2x2 max-pool, then a hidden dense
  layer and the classifier; optionally BatchNorm after each convolution and dropout before the
  classifier. `convs_per_block=2` is the VGG pattern."""

  num_classes: int = 10
  widths: Sequence[int] = (16, 32)
  hidden: int = 128
  batch_norm: bool = False  # BatchNorm (no conv bias) after each convolution
  dropout: float = 0.0  # on the hidden layer's output, in training
  convs_per_block: int = 1  # 3x3 convolutions before each pooling

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    convs = 0
    for width in self.widths:
      for index in range(self.convs_per_block):
        name, convs = f"Conv_{convs}", convs + 1  # nn.Conv's own names, whichever layer computes it
        if index == self.convs_per_block - 1 and not self.batch_norm:
          x = layers.ConvReluMaxPool(width, (3, 3), name=name)(x)  # the block's pooling included
          continue
        x = layers.Conv(width, kernel_size=(3, 3), use_bias=not self.batch_norm, name=name)(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      if self.batch_norm:
        x = layers.max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)
