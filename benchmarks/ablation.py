"""What each JAX speed change bought, measured side by side: the ConvNet's train step and its eval
forward at batch 1024, with linen's `max_pool` or `models.layers.max_pool_2x2`, with `nn.Conv` or
`models.layers.Conv`, and with each convolution, its ReLU and its pooling as
`models.layers.ConvReluMaxPool` (the ConvNet now; and as it was when its pooling gradients matched
each window against its maximum again and split ties evenly), under XLA:CPU's YNNPACK fusions on (jaxlib's
default) or off (flaxzoo's setting, flaxzoo.runtime) or any XLA_FLAGS given with --xla-flags, and
with glibc mapping large blocks as it does by default (its dynamic thresholds at their ceiling:
blocks over 32 MB mapped fresh on every allocation) instead of flaxzoo's heap-only setting, against
PyTorch eager in the same process. The eval rows run the batch in one pass, except those that run
it in passes as `flaxzoo eval` does (`training.evaluation.passes_for`), written out (now) or as a
`lax.map` (before); one more eval row computes the first convolution as the matrix product that
training runs, as eval did before shifted taps (`models.layers.SHIFTED_TAPS_MAX`).

XLA flags are fixed when XLA starts, so each flag setting runs in its own child process; within a
process the variants and PyTorch take turns (medians over repeats), and every row is a ratio to the
PyTorch eager figure measured beside it.

    python -m flaxzoo.benchmarks.ablation [--batch-size 128] [--repeats 7] [--xla-flags "LABEL=FLAGS" ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import flax.linen as nn


class EarlierConvNet(nn.Module):
  """The ConvNet as it was before a change: convolution, ReLU and pooling one after another, with
  nn.Conv or layers.Conv, and linen's `max_pool` (reduce_window) or layers.max_pool_2x2."""
  num_classes: int = 10
  linen_pool: bool = False
  layers_conv: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    from flaxzoo.models import layers
    pool = (lambda x: nn.max_pool(x, (2, 2), (2, 2))) if self.linen_pool else layers.max_pool_2x2
    conv = layers.Conv if self.layers_conv else nn.Conv
    for width in (16, 32):
      x = pool(nn.relu(conv(width, (3, 3))(x)))
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes, name="head")(x)


class ProductConvReluMaxPool(nn.Module):
  """layers.ConvReluMaxPool of one input channel as it was evaluated before shifted taps: the
  convolution and pooling as one matrix product (forward only: for the eval row)."""
  features: int

  @nn.compact
  def __call__(self, x):
    from flaxzoo.models import layers
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 1, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    windows = layers._pooled_windows(x, kernel, ((1, 1), (1, 1)))
    return nn.relu(layers._max_of_four(windows) + bias)


class ProductEvalConvNet(nn.Module):
  """The ConvNet with the parameters of today's, evaluated with ProductConvReluMaxPool first."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    from flaxzoo.models import layers
    x = ProductConvReluMaxPool(16, name="Conv_0")(x)
    x = layers.ConvReluMaxPool(32, name="Conv_1")(x)
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes, name="head")(x)


def _even_split_gradient(windows, best, grad, axes):
  """The pooling gradient before it kept each window's first maximum: `windows` matched against
  their maximum `best` again in the backward pass, `grad` shared evenly by the entries equal to it."""
  import itertools

  import jax.numpy as jnp
  winners = windows == best
  entries = itertools.product(*(range(windows.shape[axis]) for axis in axes))
  index = lambda entry: tuple(entry[axes.index(d)] if d in axes else slice(None)  # noqa: E731
                              for d in range(windows.ndim))
  count = sum(winners[index(entry)].astype(grad.dtype) for entry in entries)
  return jnp.where(winners, jnp.expand_dims(grad / count, axes), 0.0)


def _even_split_pool(x):
  """layers.max_pool_2x2 of even-sized `x` with the even-split gradient."""
  import jax

  from flaxzoo.models import layers

  @jax.custom_vjp
  def pool(x):
    return layers._pairwise_max_pool(x)

  def pool_fwd(x):
    pooled = layers._pairwise_max_pool(x)
    return pooled, (x, pooled)

  def pool_bwd(residuals, grad):
    x, pooled = residuals
    n, height, width, channels = x.shape
    windows = x.reshape(n, height // 2, 2, width // 2, 2, channels)
    return (_even_split_gradient(windows, pooled[:, :, None, :, None, :], grad, (2, 4)).reshape(x.shape),)

  pool.defvjp(pool_fwd, pool_bwd)
  return pool(x)


def _even_split_conv_pool(x, kernel, padding):
  """layers.conv_max_pool_2x2's one-channel product with the even-split gradient."""
  import jax

  from flaxzoo.models import layers

  @jax.custom_vjp
  def conv_pool(x, kernel):
    return layers._max_of_four(layers._pooled_windows(x, kernel, padding))

  def conv_pool_fwd(x, kernel):
    windows = layers._pooled_windows(x, kernel, padding)
    pooled = layers._max_of_four(windows)
    return pooled, (x, kernel, windows, pooled)

  def conv_pool_bwd(residuals, grad):
    x, kernel, windows, pooled = residuals
    window_grad = _even_split_gradient(windows, pooled[:, :, :, None, :], grad, (3,))
    return layers._conv_grads_of_windows(x, kernel, padding, window_grad)

  conv_pool.defvjp(conv_pool_fwd, conv_pool_bwd)
  return conv_pool(x, kernel)


class EvenSplitConvReluMaxPool(nn.Module):
  """layers.ConvReluMaxPool (3x3, SAME) with the even-split pooling gradients."""
  features: int

  @nn.compact
  def __call__(self, x):
    from flaxzoo.models import layers
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if x.shape[-1] == 1:
      x = _even_split_conv_pool(x, kernel, ((1, 1), (1, 1)))
    else:
      x = _even_split_pool(layers.conv(x, kernel, (1, 1), "SAME", dimension_numbers=layers.NHWC))
    return nn.relu(x + bias)


EVEN_SPLIT = "ConvReluMaxPool, ties split evenly"  # the ablation's row of EvenSplitConvNet


class EvenSplitConvNet(nn.Module):
  """The ConvNet (its parameters) as trained before the pooling gradients kept each window's first
  maximum."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for index, width in enumerate((16, 32)):
      x = EvenSplitConvReluMaxPool(width, name=f"Conv_{index}")(x)
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes, name="head")(x)


def mapped_logits(model, variables, images, passes: int):
  """Eval in passes as before they were written out: a `lax.map` over the chunks."""
  import jax
  import jax.numpy as jnp

  from flaxzoo.training.steps import to_model_input
  n, chunk = images.shape[0], -(-images.shape[0] // passes)
  padded = jnp.pad(images, ((0, chunk * passes - n),) + ((0, 0),) * (images.ndim - 1))
  logits = jax.lax.map(lambda x: model.apply(variables, to_model_input(x)),
                       padded.reshape(passes, chunk, *images.shape[1:]))
  return logits.reshape(passes * chunk, -1)[:n]


def measure(batch_size: int, repeats: int, steps: int = 20, eval_batch_size: int = 1024) -> dict:
  """Train (batch `batch_size`) and eval (batch `eval_batch_size`) img/s of each ConvNet variant and
  of PyTorch eager, in turns; medians over `repeats`."""
  import jax

  from flaxzoo.benchmarks import bench
  from flaxzoo.training.evaluation import compiled_in_passes, logits_step, passes_for
  from flaxzoo.training.state import create_train_state
  from flaxzoo.training.steps import to_model_input, train_step

  images, labels = bench.synthetic_batch(batch_size)
  eval_images, _ = bench.synthetic_batch(eval_batch_size, seed=1)
  runner = bench.JaxRunner("convnet", batch_size, 10_000)
  variants = {"linen max_pool, nn.Conv": EarlierConvNet(linen_pool=True),
              "max_pool_2x2, nn.Conv": EarlierConvNet(),
              "max_pool_2x2, layers.Conv": EarlierConvNet(layers_conv=True),
              EVEN_SPLIT: EvenSplitConvNet(),
              "ConvReluMaxPool (now)": runner.model}
  now = "ConvReluMaxPool (now)"
  states = {name: create_train_state(model, runner.config, bench.MNIST_SHAPE, 10_000)
            for name, model in variants.items()}
  forwards = {name: jax.jit(lambda v, x, model=model: model.apply(v, to_model_input(x)))
              for name, model in variants.items()}
  torch_runner = bench.TorchRunner(runner, compiled=False, total_steps=10_000)

  def jax_train(name):
    state = states[name]
    for _ in range(steps):
      state, _ = train_step(state, images, labels)
    jax.block_until_ready(state.params)
    states[name] = state

  def jax_eval(name, calls=5):
    for _ in range(calls):
      forwards[name](states[name].variables(), eval_images).block_until_ready()

  def jax_eval_in_passes(calls=5):  # what `flaxzoo eval` runs (evaluation.compiled_in_passes)
    variables = states[now].variables()
    program = compiled_in_passes(logits_step, runner.model, variables, eval_images)
    for _ in range(calls):
      program(variables, eval_images).block_until_ready()

  product_forward = jax.jit(ProductEvalConvNet().apply)
  mapped = jax.jit(mapped_logits, static_argnums=(0, 3))

  def jax_eval_as_product(calls=5):  # the first convolution as training's product
    for _ in range(calls):
      product_forward(states[now].variables(), to_model_input(eval_images)).block_until_ready()

  def jax_eval_in_mapped_passes(calls=5):
    model, variables = runner.model, states[now].variables()
    passes = passes_for(logits_step, model, variables, eval_images)
    for _ in range(calls):
      mapped(model, variables, eval_images, passes).block_until_ready()

  def torch_eval(calls=5):
    for _ in range(calls):
      torch_runner.evaluate(eval_images)

  work = {}
  for name in variants:
    work[f"train: {name}"] = (steps * batch_size, lambda name=name: jax_train(name))
    if name != EVEN_SPLIT:  # a change to training only: its eval is now's
      work[f"eval: {name}"] = (5 * eval_batch_size, lambda name=name: jax_eval(name))
  work[f"eval: {now}, in passes"] = (5 * eval_batch_size, jax_eval_in_passes)
  work[f"eval: {now}, in passes as a lax.map"] = (5 * eval_batch_size, jax_eval_in_mapped_passes)
  work["eval: ConvReluMaxPool, first one as the product"] = (5 * eval_batch_size, jax_eval_as_product)
  work["train: torch eager"] = (steps * batch_size,
                                lambda: torch_runner.train_steps(images, labels, steps))
  work["eval: torch eager"] = (5 * eval_batch_size, torch_eval)
  for _, fn in work.values():
    fn()  # compile and warm up, untimed
  rates = {name: [] for name in work}
  for _ in range(repeats):
    for name, (count, fn) in work.items():
      rates[name].append(count / bench.timed(fn))
  medians = {name: statistics.median(v) for name, v in rates.items()}
  return {name: {"img_s": rate,
                 "ratio_vs_torch_eager": rate / medians[name.split(":")[0] + ": torch eager"]}
          for name, rate in medians.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--xla-flags", action="append", default=[], metavar="LABEL=FLAGS",
                      help="also run with exactly these XLA_FLAGS (flaxzoo's own left out)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  from flaxzoo import runtime
  if args.child:
    runtime.configure()  # before JAX computes; FLAXZOO_KEEP_XLA_FLAGS=1 children keep jax's own
    print(json.dumps(measure(args.batch_size, args.repeats)))
    return
  from flaxzoo.benchmarks import machine
  print(machine.machine_line())
  base_env = {k: v for k, v in os.environ.items() if k not in runtime.ENVIRONMENT}
  settings = [("YNNPACK fusions on (jaxlib default)", {"FLAXZOO_KEEP_XLA_FLAGS": "1"}),
              ("YNNPACK off, glibc maps blocks > 32 MB", {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                                          "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}),
              ("YNNPACK fusions off (flaxzoo)", {})]
  for variant in args.xla_flags:
    label, flags = (variant, variant) if variant.startswith("--") else variant.split("=", 1)
    settings.append((label, {"FLAXZOO_KEEP_XLA_FLAGS": "1", "XLA_FLAGS": flags}))
  for setting, env in settings:
    done = subprocess.run([sys.executable, "-m", "flaxzoo.benchmarks.ablation", "--child", "--batch-size",
                           str(args.batch_size), "--repeats", str(args.repeats)],
                          capture_output=True, text=True, env={**base_env, **env})
    if done.returncode != 0:
      lines = done.stderr.strip().splitlines() or ["no output"]
      reason = next((l for l in lines if "error" in l.lower() or "unknown" in l.lower()), lines[-1])
      print(f"{setting:38s} failed: {reason.strip()}")
      continue
    for name, row in json.loads(done.stdout.strip().splitlines()[-1]).items():
      print(f"{setting:38s} {name:38s} {row['img_s']:8,.0f} img/s  "
            f"{row['ratio_vs_torch_eager']:.2f}x torch eager", flush=True)


if __name__ == "__main__":
  main()
