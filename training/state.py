"""The train state: what a run needs to continue, and how it starts.

The state holds params, optimizer state, step, `batch_stats` (empty for models without BatchNorm),
`ema_params` (an exponential moving average of the params; empty without `ema_decay`),
`ema_batch_stats` (the same average of the BatchNorm statistics, which eval reads with the EMA's
params; empty without both) and a base RNG key. The key for step `s` is `fold_in(rng, s)`, so
dropout or augmentation noise depends only on what the checkpoint holds.
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
  ema_params: Any = struct.field(default_factory=dict)  # {} unless ema_decay > 0
  # The live statistics belong to the live params: with the EMA's params they cost a BN ConvNet
  # 0.2-1.0 points of test accuracy late in training (docs/recipes.md). {} without BatchNorm.
  ema_batch_stats: Any = struct.field(default_factory=dict)
  # Static (not saved): "bfloat16" runs the training forward/backward pass in bfloat16 on float32
  # master parameters; the optimizer state and updates stay float32.
  compute_dtype: str = struct.field(pytree_node=False, default="float32")
  augment: str = struct.field(pytree_node=False, default="none")  # see `augment.augment_batch`
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)  # of the training loss
  num_classes: int = struct.field(pytree_node=False, default=0)  # for mixup/cutmix's targets
  grad_accum: int = struct.field(pytree_node=False, default=1)  # micro-batches per step
  ema_decay: float = struct.field(pytree_node=False, default=0.0)  # 0: no EMA

  def variables(self) -> dict:
    """The weights that are evaluated, exported and fine-tuned from: the EMA's when kept."""
    if self.ema_params:
      return model_variables(self.ema_params, self.ema_batch_stats)
    return model_variables(self.params, self.batch_stats)

  def with_weights(self, params, batch_stats) -> "TrainState":
    """The state with new weights (a fine-tune's source); the EMA, if kept, starts from them."""
    return self.replace(params=params, batch_stats=batch_stats,
                        ema_params=copy_of(params) if self.ema_decay else {},
                        ema_batch_stats=copy_of(batch_stats) if self.ema_decay else {})


def model_variables(params, batch_stats) -> dict:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def copy_of(tree):
  """New buffers: the jitted step donates the state, and two leaves may not share one."""
  return jax.tree.map(jnp.copy, tree)


# XLA's backend optimisation level for programs that run once (initialisation): level 1 compiles
# the ConvNet's init in ~0.9 s instead of ~3 s (ResNet's 2 s instead of 12.5 s) with the same bits
# as the default level 3 (tests/test_models.py); level 0 changed the random draws' rounding.
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def run_once(fn):
  """`jax.jit(fn)` compiled for a single call: quickly, with little optimisation."""
  return jax.jit(fn, compiler_options=RUN_ONCE_COMPILER_OPTIONS)


def init_variables(model: nn.Module, key, input_shape) -> dict:
  """`model.init` at one example of `input_shape`, as one run-once program. Eagerly, every
  initializer and op compiled on its own: the ConvNet's init took 2.4 s from a cold start. The bits
  are the eager ones (tests/test_models.py checks every registered model)."""
  return run_once(lambda key: _model_init(model, key, input_shape))(key)


def _model_init(model: nn.Module, key, input_shape) -> dict:
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def create_train_state(model: nn.Module, config: Config, input_shape, total_steps: int) -> TrainState:
  """The state at step 0, from `config.seed`: key split, `model.init`, the optimizer's state and
  the EMA's copy of the params, all in one run-once program."""
  tx = create_optimizer(config, total_steps)

  def initial_state() -> TrainState:
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = _model_init(model, init_key, input_shape)
    # The EMA gets buffers of its own: XLA copies an output that appears twice.
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables.get("batch_stats", {}), rng=train_key, compute_dtype=config.dtype,
        augment=config.augment, label_smoothing=config.label_smoothing, num_classes=model.num_classes,
        grad_accum=config.grad_accum, ema_decay=config.ema_decay,
        ema_params=variables["params"] if config.ema_decay else {},
        ema_batch_stats=variables.get("batch_stats", {}) if config.ema_decay else {},
    ).replace(step=jnp.zeros((), jnp.int32))  # an array, like every other saved leaf

  return run_once(initial_state)()
