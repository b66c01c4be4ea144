"""The train state, the optimizer and the jitted steps.

The state holds everything a run needs to continue: params, optimizer state, step, `batch_stats`
(empty for models without BatchNorm) and a base RNG key. The key for step `s` is
`fold_in(rng, s)`, so dropout or augmentation noise depends only on what the checkpoint holds.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from training.config import Config


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array

  def variables(self) -> dict:
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats) -> dict:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def to_model_input(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 pixels -> float32 in [0, 1]; float input is taken as already scaled."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
  schedule = optax.cosine_onecycle_schedule(
      transition_steps=max(total_steps, 1), peak_value=config.learning_rate,
      pct_start=config.warmup_fraction)
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def create_train_state(model: nn.Module, config: Config, input_shape, total_steps: int) -> TrainState:
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(init_key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=create_optimizer(config, total_steps),
      batch_stats=variables.get("batch_stats", {}), rng=train_key)
  return state.replace(step=jnp.zeros((), jnp.int32))  # an array, like every other saved leaf


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, images, labels):
  """One optimizer step on one batch; returns the new state and the batch's loss and accuracy."""
  step_key = jax.random.fold_in(state.rng, state.step)
  has_batch_stats = bool(state.batch_stats)  # static: part of the state's tree structure

  def loss_fn(params):
    variables = model_variables(params, state.batch_stats)
    out = state.apply_fn(variables, to_model_input(images), train=True, rngs={"dropout": step_key},
                         mutable=["batch_stats"] if has_batch_stats else False)
    logits, updates = out if has_batch_stats else (out, {})
    return cross_entropy(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if has_batch_stats:
    state = state.replace(batch_stats=updates["batch_stats"])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model: nn.Module, variables, images, labels, mask):
  """Sums over one (padded) batch: loss, correct predictions and real examples."""
  logits = model.apply(variables, to_model_input(images), train=False)
  return {"loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          "count": jnp.sum(mask)}


@functools.partial(jax.jit, static_argnums=0)
def predict_step(model: nn.Module, variables, images):
  return jax.nn.softmax(model.apply(variables, to_model_input(images), train=False))
