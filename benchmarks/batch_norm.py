"""BatchNorm in training, nn.BatchNorm against models.layers.BatchNorm (the statistics and their
gradients as matrix products), side by side in one process: first the layer alone (forward and
backward of a smooth loss, per activation shape), then whole train steps of the ResNet (which uses
layers.BatchNorm) and of a BatchNorm ConvNet (which keeps nn.BatchNorm), each built both ways,
taking turns; medians of the repeats. Prints the machine first.

    python -m flaxzoo.benchmarks.batch_norm [--repeats 6]
"""

import contextlib
import functools

LAYER_SHAPES = [(128, 28, 28, 8), (128, 14, 14, 16), (128, 7, 7, 32),  # ResNet-8's
                (128, 28, 28, 32), (128, 14, 14, 64), (128, 7, 7, 128)]  # the 32/64/128 ConvNet's
MODELS = [("resnet", {}), ("resnet", {"depth": 14}),
          ("convnet", {"widths": [32, 64], "hidden": 256, "batch_norm": True})]


def layer_rows():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flaxzoo.benchmarks import bench
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
      times[cls] = bench.median_ms(step, variables["params"], x)
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


def step_rows(repeats: int, steps: int = 10):
  import flax.linen as nn
  import jax.numpy as jnp

  from flaxzoo.benchmarks import bench
  from flaxzoo.models import layers
  from flaxzoo.training.config import Config
  images, labels = (jnp.asarray(a) for a in bench.synthetic_batch(128))
  for model_name, kwargs in MODELS:
    config = Config(model=model_name, model_kwargs=kwargs)
    runners = [bench.SwappedStepRunner(name, config, functools.partial(batch_norm_everywhere, cls),
                                       images, labels)
               for name, cls in (("nn.BatchNorm", nn.BatchNorm), ("layers.BatchNorm", layers.BatchNorm))]
    rates = bench.interleaved_rates(runners, lambda r: r.train_steps(images, labels, steps),
                                    steps * len(labels), repeats)
    yield model_name, kwargs, rates["nn.BatchNorm"], rates["layers.BatchNorm"]


def main() -> None:
  from flaxzoo.benchmarks import bench
  repeats = bench.start_swap_benchmark(__doc__)
  print("layer, forward + backward: shape | nn.BatchNorm ms | layers.BatchNorm ms | speed-up | max rel grad diff")
  for shape, plain, ours, error in layer_rows():
    print(f"{shape} | {plain:.2f} | {ours:.2f} | {plain / ours:.2f}x | {error:.1e}", flush=True)
  print("train step, batch 128: model | nn.BatchNorm img/s | layers.BatchNorm img/s | ratio")
  for name, kwargs, plain, ours in step_rows(repeats):
    print(f"{name} {kwargs or ''} | {plain:,.0f} | {ours:,.0f} | {ours / plain:.2f}x", flush=True)


if __name__ == "__main__":
  main()
