"""Size and cost of a model: parameter count and FLOPs per image from XLA's cost analysis."""

import functools

import jax
import jax.numpy as jnp

from flaxzoo.models import layers

MNIST_SHAPE = (28, 28, 1)


def abstract_variables(model, input_shape=MNIST_SHAPE) -> dict:
  """The model's variables as shapes only (nothing is computed or allocated), for restore targets
  and size reports."""
  return dict(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)), train=False)))


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
