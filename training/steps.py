"""The jitted train step, and the input conversion and loss every step shares."""

import functools

import jax
import jax.numpy as jnp
import optax

from flaxzoo.training.augment import augment_images
from flaxzoo.training.state import TrainState, model_variables


def to_model_input(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 pixels -> float32 in [0, 1]; float input is taken as already scaled."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example cross-entropy; with `label_smoothing` e, against optax's smoothed targets
  (1 - e on the label, plus e spread evenly over all classes)."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, images, labels):
  """One optimizer step on one batch; returns the new state and the batch's loss and accuracy."""
  step_key = jax.random.fold_in(state.rng, state.step)
  inputs = to_model_input(images)
  if state.augment != "none":  # static; without augmentation the dropout key stays step_key
    augment_key, step_key = jax.random.split(step_key)
    inputs = augment_images(augment_key, inputs, state.augment)
  has_batch_stats = bool(state.batch_stats)  # static: part of the state's tree structure

  dtype = jnp.dtype(state.compute_dtype)

  def loss_fn(params):
    params = jax.tree.map(lambda p: p.astype(dtype), params)  # gradients flow back as float32
    variables = model_variables(params, state.batch_stats)
    out = state.apply_fn(variables, inputs.astype(dtype), train=True,
                         rngs={"dropout": step_key},
                         mutable=["batch_stats"] if has_batch_stats else False)
    logits, updates = out if has_batch_stats else (out, {})
    logits = logits.astype(jnp.float32)
    return cross_entropy(logits, labels, state.label_smoothing).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if has_batch_stats:  # kept in their saved dtype whatever the compute dtype
    state = state.replace(batch_stats=jax.tree.map(lambda new, old: new.astype(old.dtype),
                                                   updates["batch_stats"], state.batch_stats))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}
