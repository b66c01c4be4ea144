"""BatchNorm in training, nn.BatchNorm against models.layers.BatchNorm (the statistics and their
gradients as matrix products), side by side in one process: first the layer alone (forward and
backward of a smooth loss, per activation shape), then whole train steps of the ResNet (which uses
layers.BatchNorm) and of a BatchNorm ConvNet (which keeps nn.BatchNorm), each built both ways,
taking turns; medians of the repeats. Prints the machine first.

    python -m flaxzoo.benchmarks.batch_norm [--repeats 6]
"""

import argparse
import contextlib
import statistics

from flaxzoo import runtime

LAYER_SHAPES = [(128, 28, 28, 8), (128, 14, 14, 16), (128, 7, 7, 32),  # ResNet-8's
                (128, 28, 28, 32), (128, 14, 14, 64), (128, 7, 7, 128)]  # the 32/64/128 ConvNet's
MODELS = [("resnet", {}), ("resnet", {"depth": 14}),
          ("convnet", {"widths": [32, 64], "hidden": 256, "batch_norm": True})]


def median_ms(fn, *args, repeats: int = 40) -> float:
  import jax

  from flaxzoo.benchmarks import bench
  call = lambda: jax.block_until_ready(fn(*args))  # noqa: E731
  call()
  return statistics.median(bench.timed(call) for _ in range(repeats)) * 1e3


def layer_rows():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flaxzoo.models import layers
  for shape in LAYER_SHAPES:
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 0.5
    w = jax.random.normal(jax.random.key(1), shape)
    times, grads = {}, {}
    for cls in (nn.BatchNorm, layers.BatchNorm):
      norm = cls(use_running_average=False, momentum=0.9)
      variables = norm.init(jax.random.key(2), x)

      def loss(params, x, norm=norm, variables=variables):
        y, _ = norm.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(y) * w)
      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      times[cls] = median_ms(step, variables["params"], x)
      grads[cls] = step(variables["params"], x)
    error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                for a, b in zip(jax.tree.leaves(grads[nn.BatchNorm]), jax.tree.leaves(grads[layers.BatchNorm])))
    yield shape, times[nn.BatchNorm], times[layers.BatchNorm], error


@contextlib.contextmanager
def batch_norm_everywhere(cls):
  """Models built inside use `cls` for every BatchNorm: the ResNet looks up layers.BatchNorm and
  the ConvNet flax.linen.BatchNorm when they are called, so both names are swapped."""
  import flax.linen as nn

  from flaxzoo.models import layers
  before = nn.BatchNorm, layers.BatchNorm
  nn.BatchNorm = layers.BatchNorm = cls
  try:
    yield
  finally:
    nn.BatchNorm, layers.BatchNorm = before


class StepRunner:
  """One model built with one BatchNorm class, as bench.interleaved_rates takes its runners."""

  def __init__(self, name: str, model_name: str, kwargs: dict, cls, images, labels):
    import jax

    from flaxzoo import models
    from flaxzoo.training.config import Config
    from flaxzoo.training.state import create_train_state
    from flaxzoo.training.steps import train_step
    self.name = name
    with batch_norm_everywhere(cls):
      model = models.create_model(model_name, num_classes=10, **kwargs)
      state = create_train_state(model, Config(model=model_name, model_kwargs=kwargs), (28, 28, 1), 1000)
      # a function of its own per variant (no trace shared through jit's caches), traced here,
      # inside the swap
      self.step = jax.jit(lambda state, images, labels: train_step(state, images, labels))
      self.state = jax.block_until_ready(self.step(state, images, labels)[0])

  def train_steps(self, images, labels, steps: int) -> None:
    import jax
    for _ in range(steps):
      self.state, _ = self.step(self.state, images, labels)
    jax.block_until_ready(self.state)


def step_rows(repeats: int, steps: int = 10):
  import flax.linen as nn
  import jax.numpy as jnp

  from flaxzoo.benchmarks import bench
  from flaxzoo.models import layers
  images, labels = (jnp.asarray(a) for a in bench.synthetic_batch(128))
  for model_name, kwargs in MODELS:
    runners = [StepRunner(name, model_name, kwargs, cls, images, labels)
               for name, cls in (("nn.BatchNorm", nn.BatchNorm), ("layers.BatchNorm", layers.BatchNorm))]
    rates = bench.interleaved_rates(runners, lambda r: r.train_steps(images, labels, steps),
                                    steps * len(labels), repeats)
    yield model_name, kwargs, rates["nn.BatchNorm"], rates["layers.BatchNorm"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=6, help="turns of 10 train steps per variant")
  args = parser.parse_args()
  runtime.configure(compilation_cache=False)
  from flaxzoo.benchmarks import machine
  print(machine.machine_line())
  print("layer, forward + backward: shape | nn.BatchNorm ms | layers.BatchNorm ms | speed-up | max rel grad diff")
  for shape, plain, ours, error in layer_rows():
    print(f"{shape} | {plain:.2f} | {ours:.2f} | {plain / ours:.2f}x | {error:.1e}", flush=True)
  print("train step, batch 128: model | nn.BatchNorm img/s | layers.BatchNorm img/s | ratio")
  for name, kwargs, plain, ours in step_rows(args.repeats):
    print(f"{name} {kwargs or ''} | {plain:,.0f} | {ours:,.0f} | {ours / plain:.2f}x", flush=True)


if __name__ == "__main__":
  main()
