"""What each JAX training-speed change bought, measured side by side: the ConvNet's train step with
linen's `max_pool` or `models.layers.max_pool_2x2`, each with XLA:CPU's YNNPACK fusions on (jaxlib's
default) or off (flaxzoo's setting, models/xla_flags.py), against PyTorch eager in the same process.

XLA flags are fixed when XLA starts, so each flag setting runs in its own child process; within a
process the variants and PyTorch take turns (medians over repeats), and every row is a ratio to the
PyTorch eager figure measured beside it.

    python -m benchmarks.ablation [--batch-size 128] [--repeats 7]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import flax.linen as nn


class LinenPoolConvNet(nn.Module):
  """The ConvNet as it was before: pooling with linen's `max_pool` (reduce_window)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in (16, 32):
      x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes, name="head")(x)


def measure(batch_size: int, repeats: int, steps: int = 20) -> dict:
  import jax
  from benchmarks import bench
  from training.state import create_train_state, train_step

  images, labels = bench.synthetic_batch(batch_size)
  runner = bench.JaxRunner("convnet", batch_size, 10_000)
  states = {"reshape max_pool_2x2": runner.state,
            "linen max_pool": create_train_state(LinenPoolConvNet(), runner.config,
                                                 bench.MNIST_SHAPE, 10_000)}
  torch_runner = bench.TorchRunner(runner, compiled=False, total_steps=10_000)

  def jax_steps(name):
    state = states[name]
    for _ in range(steps):
      state, _ = train_step(state, images, labels)
    jax.block_until_ready(state.params)
    states[name] = state

  for name in states:
    jax_steps(name)
  torch_runner.train_steps(images, labels, 2)
  rates = {name: [] for name in [*states, "torch eager"]}
  for _ in range(repeats):
    for name in states:
      rates[name].append(steps * batch_size / bench.timed(lambda: jax_steps(name)))
    rates["torch eager"].append(steps * batch_size / bench.timed(
        lambda: torch_runner.train_steps(images, labels, steps)))
  medians = {name: statistics.median(v) for name, v in rates.items()}
  return {name: {"img_s": rate, "ratio_vs_torch_eager": rate / medians["torch eager"]}
          for name, rate in medians.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--child", choices=("ynn-on", "ynn-off"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.batch_size, args.repeats)))
    return
  from benchmarks import machine
  print(machine.machine_line())
  for setting, env in (("YNNPACK fusions on (jaxlib default)", {"FLAXZOO_KEEP_XLA_FLAGS": "1"}),
                       ("YNNPACK fusions off (flaxzoo)", {})):
    child_env = {k: v for k, v in os.environ.items() if k != "FLAXZOO_KEEP_XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.ablation", "--child",
                           "ynn-on" if env else "ynn-off", "--batch-size", str(args.batch_size),
                           "--repeats", str(args.repeats)],
                          capture_output=True, text=True, check=True, env={**child_env, **env})
    for name, row in json.loads(done.stdout.strip().splitlines()[-1]).items():
      print(f"{setting:38s} {name:22s} {row['img_s']:8,.0f} img/s  "
            f"{row['ratio_vs_torch_eager']:.2f}x torch eager")


if __name__ == "__main__":
  main()
