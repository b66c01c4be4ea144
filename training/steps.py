"""The jitted train step, and the input conversion and loss every step shares."""

import functools

import jax
import jax.numpy as jnp
import optax

from flaxzoo.training import augment
from flaxzoo.training.config import mixes_targets
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
  return optax.softmax_cross_entropy(logits, smoothed_targets(labels, logits.shape[-1], label_smoothing))


def smoothed_targets(labels, num_classes: int, label_smoothing: float):
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def ema_decay_at(decay: float, step):
  """The EMA's decay after optimizer step `step` (1, 2, ...): `decay`, but at most
  (1 + step) / (10 + step), so that early weights fade fast in short runs (as TensorFlow's
  ExponentialMovingAverage with num_updates)."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# XLA's backend (LLVM) at optimisation level 2, not its default 3: the zoo's train steps compiled
# 20-40 % sooner and ran as fast on XLA:CPU (docs/performance.md, "Train step compiled at level 2").
TRAIN_STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


@functools.partial(jax.jit, donate_argnums=0, compiler_options=TRAIN_STEP_COMPILER_OPTIONS)
def train_step(state: TrainState, images, labels):
  """One optimizer step on one batch; returns the new state and the batch's loss and accuracy.

  With `grad_accum` K the batch is K micro-batches (rows i, i+K, i+2K, ... form the i-th, so a
  batch split over devices keeps each device's rows on it), whose gradients are averaged inside
  this one program by `lax.scan`; BatchNorm statistics update once per micro-batch.
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  inputs = to_model_input(images)
  targets = None  # class probabilities, when mixup/cutmix mix the labels
  if state.augment != "none":  # static; without augmentation the dropout key stays step_key
    augment_key, step_key = jax.random.split(step_key)
    if mixes_targets(state.augment):
      targets = smoothed_targets(labels, state.num_classes, state.label_smoothing)
    inputs, targets = augment.augment_batch(augment_key, inputs, targets, state.augment)
  has_batch_stats = bool(state.batch_stats)  # static: part of the state's tree structure
  dtype = jnp.dtype(state.compute_dtype)

  def loss_and_grads(batch_stats, inputs, labels, targets, key):
    def loss_fn(params):
      params = jax.tree.map(lambda p: p.astype(dtype), params)  # gradients flow back as float32
      variables = model_variables(params, batch_stats)
      out = state.apply_fn(variables, inputs.astype(dtype), train=True, rngs={"dropout": key},
                           mutable=["batch_stats"] if has_batch_stats else False)
      logits, updates = out if has_batch_stats else (out, {})
      logits = logits.astype(jnp.float32)
      losses = (cross_entropy(logits, labels, state.label_smoothing) if targets is None
                else optax.softmax_cross_entropy(logits, targets))
      return losses.mean(), (logits, updates.get("batch_stats", batch_stats))

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  k = state.grad_accum
  if k == 1:
    (loss, (logits, batch_stats)), grads = loss_and_grads(state.batch_stats, inputs, labels,
                                                          targets, step_key)
  else:
    def micro_batches(x):  # (B, ...) -> (K, B/K, ...), row r going to micro-batch r % K
      return None if x is None else jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def accumulate(carry, micro):
      grads_sum, batch_stats = carry
      index, micro_inputs, micro_labels, micro_targets = micro
      (loss, (logits, batch_stats)), grads = loss_and_grads(
          batch_stats, micro_inputs, micro_labels, micro_targets, jax.random.fold_in(step_key, index))
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads_sum, batch_stats), (losses, logits) = jax.lax.scan(
        accumulate, (zeros, state.batch_stats),
        (jnp.arange(k), micro_batches(inputs), micro_batches(labels), micro_batches(targets)),
        unroll=True)  # a rolled loop ran the ConvNet's step 15x slower on XLA:CPU
    grads = jax.tree.map(lambda g: g / k, grads_sum)
    loss = losses.mean()
    logits = jnp.swapaxes(logits, 0, 1).reshape(labels.shape[0], -1)  # back in batch order

  state = state.apply_gradients(grads=grads)
  if has_batch_stats:  # kept in their saved dtype whatever the compute dtype
    state = state.replace(batch_stats=jax.tree.map(lambda new, old: new.astype(old.dtype),
                                                   batch_stats, state.batch_stats))
  if state.ema_decay:
    decay = ema_decay_at(state.ema_decay, state.step)
    average = lambda e, p: decay * e + (1 - decay) * p  # noqa: E731
    state = state.replace(ema_params=jax.tree.map(average, state.ema_params, state.params),
                          ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, state.batch_stats))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}
