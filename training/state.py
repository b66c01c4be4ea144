"""The train state: what a run needs to continue, and how it starts.

The state holds params, optimizer state, step, `batch_stats` (empty for models without BatchNorm)
and a base RNG key. The key for step `s` is `fold_in(rng, s)`, so dropout or augmentation noise
depends only on what the checkpoint holds.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state

from flaxzoo.training.config import Config
from flaxzoo.training.optimizer import create_optimizer


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array
  # Static (not saved): "bfloat16" runs the training forward/backward pass in bfloat16 on float32
  # master parameters; the optimizer state and updates stay float32.
  compute_dtype: str = struct.field(pytree_node=False, default="float32")
  augment: str = struct.field(pytree_node=False, default="none")  # see `augment.augment_images`
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)  # of the training loss

  def variables(self) -> dict:
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats) -> dict:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def init_variables(model: nn.Module, key, input_shape) -> dict:
  """`model.init` at one example of `input_shape`, as one jitted program. Eagerly, every
  initializer and op compiled on its own: the ConvNet's init took 2.4 s from a cold start instead
  of 1.1 s. The bits are the eager ones (tests/test_models.py checks every registered model)."""
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *input_shape), jnp.float32),
                                        train=False))(key)


def create_train_state(model: nn.Module, config: Config, input_shape, total_steps: int) -> TrainState:
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = init_variables(model, init_key, input_shape)
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=create_optimizer(config, total_steps),
      batch_stats=variables.get("batch_stats", {}), rng=train_key, compute_dtype=config.dtype,
      augment=config.augment, label_smoothing=config.label_smoothing)
  return state.replace(step=jnp.zeros((), jnp.int32))  # an array, like every other saved leaf
