"""LeNet-5: the classic small convolutional network."""

import flax.linen as nn
import jax.numpy as jnp

from flaxzoo.models import layers
from flaxzoo.models.registry import register_model


@register_model("lenet5")
class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling: conv 6@5x5, conv 16@5x5, 120, 84."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no dropout or BatchNorm
    # 28x28 in, as the 32x32 original's C1 out; each convolution with its ReLU and pooling.
    x = layers.ConvReluMaxPool(6, (5, 5), padding="SAME", name="Conv_0")(x)
    x = layers.ConvReluMaxPool(16, (5, 5), padding="VALID", name="Conv_1")(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes, name="head")(x)
