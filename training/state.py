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

from flaxzoo.models.profile import model_init, run_once
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


def create_train_state(model: nn.Module, config: Config, input_shape, total_steps: int) -> TrainState:
  """The state at step 0, from `config.seed`: key split, `model.init`, the optimizer's state and
  the EMA's copy of the params, all in one run-once program."""
  tx = create_optimizer(config, total_steps)

  def initial_state() -> TrainState:
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = model_init(model, init_key, input_shape)
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
