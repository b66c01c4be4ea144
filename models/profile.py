"""Size, cost and start of a model: parameter count, FLOPs per image from XLA's cost analysis, and
its initial variables computed as one quickly compiled program."""

import functools

import jax
import jax.numpy as jnp

from flaxzoo.models import layers

MNIST_SHAPE = (28, 28, 1)

# XLA's backend optimisation level for programs that run once (initialisation): level 1 compiles
# the ConvNet's init in ~0.9 s instead of ~3 s (ResNet's 2 s instead of 12.5 s) with the same bits
# as the default level 3 (tests/test_models.py); level 0 changed the random draws' rounding.
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def run_once(fn):
  """`jax.jit(fn)` compiled for a single call: quickly, with little optimisation."""
  return jax.jit(fn, compiler_options=RUN_ONCE_COMPILER_OPTIONS)


def init_variables(model, key, input_shape) -> dict:
  """`model.init` at one example of `input_shape`, as one run-once program. Eagerly, every
  initializer and op compiled on its own: the ConvNet's init took 2.4 s from a cold start. The values
  are an eager init's within float32 rounding (tests/test_models.py)."""
  return run_once(lambda key: model_init(model, key, input_shape))(key)


def model_init(model, key, input_shape) -> dict:
  """`model.init` in eval mode at one zero image of `input_shape` (batch 1)."""
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def abstract_variables(model, input_shape=MNIST_SHAPE) -> dict:
  """The model's variables as shapes only (nothing is computed or allocated), for restore targets
  and size reports."""
  return dict(jax.eval_shape(lambda: model_init(model, jax.random.PRNGKey(0), input_shape)))


def param_count(model, input_shape=MNIST_SHAPE) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_variables(model, input_shape)["params"]))


def flops_per_image(model, input_shape=MNIST_SHAPE) -> float:
  """FLOPs of one image through the compiled eval-mode forward pass (batch 1), as XLA counts
  them (a multiply-add is 2), with each convolution computed as a convolution
  (`layers.plain_convolutions`)."""
  forward = jax.jit(functools.partial(model.apply, train=False))
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with layers.plain_convolutions():
    lowered = forward.lower(abstract_variables(model, input_shape), image)
  cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0]
  return float(cost["flops"])
