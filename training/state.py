"""The train state, the optimizer and the jitted steps.

The state holds everything a run needs to continue: params, optimizer state, step, `batch_stats`
(empty for models without BatchNorm) and a base RNG key. The key for step `s` is
`fold_in(rng, s)`, so dropout or augmentation noise depends only on what the checkpoint holds.
"""

import fnmatch
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from training.config import Config, ConfigError


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array
  # Static (not saved): "bfloat16" runs the training forward/backward pass in bfloat16 on float32
  # master parameters; the optimizer state and updates stay float32.
  compute_dtype: str = struct.field(pytree_node=False, default="float32")
  augment: str = struct.field(pytree_node=False, default="none")  # see `augment_images`

  def variables(self) -> dict:
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats) -> dict:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def to_model_input(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 pixels -> float32 in [0, 1]; float input is taken as already scaled."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def param_path(keypath) -> str:
  """'Conv_0/kernel' for a parameter's key path (the names used in reports and --freeze)."""
  return "/".join(str(getattr(k, "key", k)) for k in keypath)


def param_groups(params, freeze: str):
  """A tree like `params` labelling each leaf 'head', 'backbone' or 'frozen'.

  The head is the classifier every zoo model names `head`. `freeze`: 'none'; 'backbone' (all but
  the head); or comma-separated shell wildcards over parameter paths, where naming a module
  (`Conv_0`) freezes all its parameters.
  """
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  has_head = any(p.startswith("head/") for p in paths)
  if freeze == "none":
    frozen = set()
  elif freeze == "backbone":
    if not has_head:
      raise ConfigError("--freeze backbone needs a classifier module named 'head'; this model has "
                        "none: freeze parameter paths instead, e.g. --freeze 'Conv_*'")
    frozen = {p for p in paths if not p.startswith("head/")}
  else:
    frozen = set()
    for pattern in (p.strip() for p in freeze.split(",") if p.strip()):
      matched = {p for p in paths if fnmatch.fnmatchcase(p, pattern)
                 or fnmatch.fnmatchcase(p, pattern.rstrip("/") + "/*")}
      if not matched:
        modules = sorted({p.rsplit("/", 1)[0] for p in paths})
        raise ConfigError(f"--freeze pattern {pattern!r} matches no parameter; parameter paths "
                          f"are MODULE/NAME with modules {', '.join(modules)}")
      frozen |= matched
  if frozen and len(frozen) == len(paths):
    raise ConfigError(f"--freeze {freeze!r} freezes every parameter, so nothing would train; "
                      f"leave the head (or more) trainable")
  labels = ["frozen" if p in frozen else "head" if p.startswith("head/") else "backbone"
            for p in paths]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
  """AdamW on a one-cycle schedule. With frozen parameters or a head learning rate, parameter
  groups: frozen ones get zero updates (so they stay bitwise unchanged), the head its own peak."""
  def adamw(peak):
    schedule = optax.cosine_onecycle_schedule(
        transition_steps=max(total_steps, 1), peak_value=peak, pct_start=config.warmup_fraction)
    return optax.adamw(schedule, weight_decay=config.weight_decay)

  if config.freeze == "none" and config.head_learning_rate is None:
    return adamw(config.learning_rate)
  head_peak = config.head_learning_rate or config.learning_rate
  return optax.multi_transform(
      {"backbone": adamw(config.learning_rate), "head": adamw(head_peak),
       "frozen": optax.set_to_zero()},
      functools.partial(param_groups, freeze=config.freeze))


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
      augment=config.augment)
  return state.replace(step=jnp.zeros((), jnp.int32))  # an array, like every other saved leaf


MAX_SHIFT = 2  # pixels, for augment="shift"


def augment_images(key, images, augment: str):
  """Training-time augmentation on device. "shift": each image moved by up to MAX_SHIFT pixels
  in each direction, zero-filled (the classic MNIST augmentation); "none": unchanged."""
  if augment == "none":
    return images
  n, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * MAX_SHIFT + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(  # noqa: E731
      image, (offset[0], offset[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


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
    return cross_entropy(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if has_batch_stats:  # kept in their saved dtype whatever the compute dtype
    state = state.replace(batch_stats=jax.tree.map(lambda new, old: new.astype(old.dtype),
                                                   updates["batch_stats"], state.batch_stats))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}


# The most temporary memory one evaluation or prediction call may take before its batch is split
# into passes. XLA allocates a program's temporaries as one block on every call, often on one of
# its own threads (strace). A block over 64 MB does not fit such a thread's malloc arena, so glibc
# maps it afresh and every 4 kB page faults in again: ~19,000 faults in most ConvNet eval calls at
# batch 1000, whatever models/xla_flags.py sets. In passes the block stays at most half that and is
# reused; the MLP and ViT-tiny fit and run in one pass as before (docs/benchmarks.md, "Eval in
# passes": test-set eval 1.15-1.95x faster where one-pass calls faulted, 0.93x where they did not).
EVAL_TEMP_BYTES = 32 << 20


def logits_in_passes(model: nn.Module, variables, images, passes: int = 1):
  """Eval-mode logits of `images` (N, H, W, C), `passes` chunks one after another inside one
  program (`lax.map`; the batch padded to a multiple of `passes`, the padding dropped)."""
  apply = lambda x: model.apply(variables, to_model_input(x), train=False)  # noqa: E731
  if passes <= 1:
    return apply(images)
  n = images.shape[0]
  chunk = -(-n // passes)
  padded = jnp.pad(images, ((0, chunk * passes - n),) + ((0, 0),) * (images.ndim - 1))
  logits = jax.lax.map(apply, padded.reshape(passes, chunk, *images.shape[1:]))
  return logits.reshape(passes * chunk, *logits.shape[2:])[:n]


def passes_for(jitted, model: nn.Module, variables, images, *rest) -> int:
  """The `passes` that keeps the call `jitted(model, variables, images, *rest)` under
  EVAL_TEMP_BYTES of temporaries (1 when one pass fits), from XLA's memory analysis of the one-pass
  program, whose compilation that call then reuses. Remembered per shape."""
  leaves, treedef = jax.tree.flatten((variables, images, *rest))
  specs = tuple(jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves)
  return _passes_for(jitted, model, treedef, specs, np.shape(images)[0])


@functools.lru_cache(maxsize=64)
def _passes_for(jitted, model, treedef, specs, batch: int) -> int:
  lowered = jitted.lower(model, *jax.tree.unflatten(treedef, specs), passes=1)
  analysis = lowered.compile().memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", 0) or 0  # None: a backend without the analysis
  return int(max(1, min(batch, -(-temp // EVAL_TEMP_BYTES))))


@functools.partial(jax.jit, static_argnums=0, static_argnames="passes")
def eval_step(model: nn.Module, variables, images, labels, mask, passes: int = 1):
  """Sums over one (padded) batch: loss, correct predictions, real examples, and the confusion
  matrix (rows: true class, columns: predicted class). `passes`: see `passes_for`."""
  logits = logits_in_passes(model, variables, images, passes)
  predictions = jnp.argmax(logits, -1)
  num_classes = logits.shape[-1]
  confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predictions].add(
      mask.astype(jnp.int32))
  return {"loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
          "correct": jnp.sum((predictions == labels) * mask),
          "count": jnp.sum(mask),
          "confusion": confusion}


@functools.partial(jax.jit, static_argnums=0, static_argnames="passes")
def logits_step(model: nn.Module, variables, images, passes: int = 1):
  return logits_in_passes(model, variables, images, passes)


@functools.partial(jax.jit, static_argnums=0, static_argnames="passes")
def predict_step(model: nn.Module, variables, images, passes: int = 1):
  return jax.nn.softmax(logits_in_passes(model, variables, images, passes))
