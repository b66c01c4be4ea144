"""MLP: the simplest baseline."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxzoo.models.registry import register_model


@register_model("mlp")
class MLP(nn.Module):
  """Flattened pixels through ReLU dense layers, then the classifier."""

  num_classes: int = 10
  hidden: Sequence[int] = (512, 256)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes, name="head")(x)
