"""Where the ConvNet's train step spends its time, op by op, in JAX (XLA:CPU) and PyTorch eager.

Each row is one of the step's convolutions, matrix products or the whole step, run alone at the
step's shapes (batch 128): a forward pass, an input gradient or a kernel gradient (for the first
convolution also with its 2x2 max-pooling, as the ConvNet computes the two together). Both frameworks
take turns (medians over repeats, in one process), and each row states GFLOP/s, so a row that runs
far under the FP32 matmul peak measured in the same run names what limits the step on this CPU.

    python -m benchmarks.op_profile [--batch-size 128] [--repeats 7]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxzoo import runtime
from flaxzoo.benchmarks import bench, machine
from flaxzoo.models import layers

NHWC = layers.NHWC


def conv_flops(batch, height, width, cin, cout, kernel=3) -> float:
  return 2.0 * batch * height * width * cin * cout * kernel * kernel


def jax_ops(batch: int) -> dict:
  """name -> (jitted function, its arguments, FLOPs of one call), at the ConvNet's shapes."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731

  def conv(x, k):  # nn.Conv's convolution: NHWC, HWIO, SAME padding
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)

  def input_grad(x, k, dy):
    return jax.vjp(lambda x: conv(x, k), x)[1](dy)[0]

  def kernel_grad(x, k, dy):
    return jax.vjp(lambda k: conv(x, k), k)[1](dy)[0]

  ops = {}
  for name, (size, cin, cout) in {"conv1": (28, 1, 16), "conv2": (14, 16, 32)}.items():
    x, k, dy = normal(batch, size, size, cin), normal(3, 3, cin, cout), normal(batch, size, size, cout)
    flops = conv_flops(batch, size, size, cin, cout)
    ops[f"{name} forward"] = (jax.jit(conv), (x, k), flops)
    if cin == 1:  # what the ConvNet runs instead (models/layers.py); its input grad is never needed
      ops[f"{name} forward, layers.conv"] = (
          jax.jit(lambda x, k: layers.conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC)), (x, k), flops)
      # The ConvNet now: the convolution and its pooling as one product (ConvReluMaxPool)
      pooled = jax.jit(layers.conv_max_pool_2x2)
      ops[f"{name} + pool forward, product"] = (pooled, (x, k), flops)
      dy_pooled = normal(batch, size // 2, size // 2, cout)
      ops[f"{name} + pool kernel grad"] = (
          jax.jit(lambda x, k: jax.vjp(lambda k: layers.conv_max_pool_2x2(x, k), k)[1](dy_pooled)[0]),
          (x, k), flops)
    else:
      ops[f"{name} input grad"] = (jax.jit(input_grad), (x, k, dy), flops)
    ops[f"{name} kernel grad"] = (jax.jit(kernel_grad), (x, k, dy), flops)
  a, w = normal(batch, 7 * 7 * 32), normal(7 * 7 * 32, 128)
  ops["dense1 forward"] = (jax.jit(jnp.matmul), (a, w), 2.0 * batch * a.shape[1] * w.shape[1])
  return ops


def torch_ops(batch: int) -> dict:
  """The same operations through PyTorch eager (NCHW, as its convolutions expect)."""
  torch = bench.import_torch()
  functional, grad = torch.nn.functional, torch.nn.grad
  generator = torch.Generator().manual_seed(0)
  normal = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
  ops = {}
  for name, (size, cin, cout) in {"conv1": (28, 1, 16), "conv2": (14, 16, 32)}.items():
    x, k, dy = normal(batch, cin, size, size), normal(cout, cin, 3, 3), normal(batch, cout, size, size)
    ops[f"{name} forward"] = (lambda x, k: functional.conv2d(x, k, padding=1), (x, k))
    if cin == 1:
      ops[f"{name} forward, layers.conv"] = ops[f"{name} forward"]
      ops[f"{name} + pool forward, product"] = (
          lambda x, k: functional.max_pool2d(functional.conv2d(x, k, padding=1), 2), (x, k))
      pooled_dy = normal(batch, cout, size // 2, size // 2)
      ops[f"{name} + pool kernel grad"] = (
          lambda x, k: torch.autograd.grad(
              functional.max_pool2d(functional.conv2d(x, k, padding=1), 2), k, pooled_dy)[0],
          (x, k.clone().requires_grad_(True)))
    else:
      ops[f"{name} input grad"] = (
          lambda x, k, dy: grad.conv2d_input(x.shape, k, dy, padding=1), (x, k, dy))
    ops[f"{name} kernel grad"] = (
        lambda x, k, dy: grad.conv2d_weight(x, k.shape, dy, padding=1), (x, k, dy))
  ops["dense1 forward"] = (torch.matmul, (normal(batch, 7 * 7 * 32), normal(7 * 7 * 32, 128)))
  return ops


def train_step_rows(batch: int):
  """The whole train step of both, for the total the rows above add up to."""
  runner = bench.JaxRunner("convnet", batch, 10_000)
  torch_runner = bench.TorchRunner(runner, compiled=False, total_steps=10_000)
  images, labels = bench.synthetic_batch(batch)
  return (lambda: runner.train_steps(images, labels, 1),
          lambda: torch_runner.train_steps(images, labels, 1),
          runner.train_step_flops(images, labels))


def mean_ms(fn, calls: int, repeats: list) -> None:
  """Appends the mean time of `calls` back-to-back calls of `fn`, in ms."""
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  repeats.append((time.perf_counter() - start) / calls * 1e3)


def profile(batch: int = 128, repeats: int = 7, calls: int = 20) -> list[dict]:
  jax_table, torch_table = jax_ops(batch), torch_ops(batch)
  work = {}
  for name, (fn, args, flops) in jax_table.items():
    torch_fn, torch_args = torch_table[name]
    work[name] = (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)),
                  lambda fn=torch_fn, args=torch_args: fn(*args), flops)
  work["train step (whole)"] = train_step_rows(batch)
  rows = []
  for name, (jax_fn, torch_fn, flops) in work.items():
    jax_fn(), torch_fn()  # compile / warm up, untimed
    times = {"jax": [], "torch": []}
    for i in range(repeats):  # alternate which goes first
      order = (("jax", jax_fn), ("torch", torch_fn))
      for framework, fn in (order if i % 2 == 0 else order[::-1]):
        mean_ms(fn, calls, times[framework])
    jax_ms, torch_ms = statistics.median(times["jax"]), statistics.median(times["torch"])
    rows.append({"op": name, "gflop": flops / 1e9, "jax_ms": jax_ms, "torch_eager_ms": torch_ms,
                 "jax_gflops": flops / jax_ms / 1e6, "torch_eager_gflops": flops / torch_ms / 1e6,
                 "jax_over_torch_time": jax_ms / torch_ms})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  runtime.configure()  # flaxzoo's XLA settings, before JAX computes
  print(machine.machine_line())
  print(f"{'op (batch ' + str(args.batch_size) + ')':29s} {'GFLOP':>7s} {'jax ms':>8s} "
        f"{'torch ms':>9s} {'jax GFLOP/s':>12s} {'torch GFLOP/s':>14s} {'jax/torch time':>15s}")
  for row in profile(args.batch_size, args.repeats):
    print(f"{row['op']:29s} {row['gflop']:7.3f} {row['jax_ms']:8.2f} {row['torch_eager_ms']:9.2f} "
          f"{row['jax_gflops']:12.1f} {row['torch_eager_gflops']:14.1f} "
          f"{row['jax_over_torch_time']:14.2f}x", flush=True)


if __name__ == "__main__":
  main()
