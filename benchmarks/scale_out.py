"""`flaxzoo bench --devices 1,2,4`: the data-parallel train step (`training.parallel`) on 1, 2, 4
... devices, and on one device against the plain single-device step, in one run.

Each runner feeds a host batch every step, as the training loop does (`parallel.step_batch`:
split over the mesh by the sharded step's in_shardings; plain path: handed to the jitted step).
The runners take turns (interleaved repeats, medians). Also printed: the gradient bytes every
step all-reduces, and what a ring all-reduce sends per device, 2 (n - 1) / n of them: the
communication the estimate of scaling on GPUs in docs/scale-out.md starts from.

On CPU, emulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) share the same
cores, so more devices cannot train faster: the figures there measure the sharded path's overhead.
"""

import jax

from flaxzoo.benchmarks import bench
from flaxzoo.training import parallel


class ShardedRunner:
  """The training loop's step on `num_devices` devices: state replicated, each batch split."""

  def __init__(self, plain: bench.JaxRunner, num_devices: int):
    self.name = f"sharded_{num_devices}"
    self.layout = parallel.make_layout(num_devices)
    parallel.check_batch_size(plain.config.batch_size, self.layout)
    self.state = parallel.replicate(self.layout, jax.device_get(plain.state))  # own buffers
    self.step = parallel.sharded_train_step(self.layout)

  def train_steps(self, images, labels, steps: int) -> None:
    state = self.state
    for _ in range(steps):
      state, metrics = self.step(state, *parallel.step_batch(self.layout, images, labels))
      if self.layout.waits_for_each_step:  # as the training loop does
        jax.block_until_ready(metrics)
    jax.block_until_ready(state.params)
    self.state = state


def device_figures(model_name: str, batch_size: int, device_counts, steps: int, repeats: int,
                   log=print) -> dict:
  """Train img/s per device count and of the plain path; the sharded/plain ratio on one device."""
  plain = bench.JaxRunner(model_name, batch_size, 100_000)
  plain.name = "plain_1"
  runners = [plain] + [ShardedRunner(plain, n) for n in device_counts]
  images, labels = bench.synthetic_batch(batch_size)
  for runner in runners:  # compile and warm up, untimed
    runner.train_steps(images, labels, 3)
  rates = bench.interleaved_rates(runners, lambda r: r.train_steps(images, labels, steps),
                                  steps * batch_size, repeats)
  gradient_bytes = parallel.gradient_bytes(plain.state.params)
  result = {"devices_img_s": {n: rates[f"sharded_{n}"] for n in device_counts},
            "plain_1_img_s": rates["plain_1"], "gradient_bytes_per_step": gradient_bytes,
            "allreduce_bytes_per_device": {n: 2 * (n - 1) / n * gradient_bytes for n in device_counts}}
  if 1 in device_counts:
    result["sharded_1_over_plain"] = rates["sharded_1"] / rates["plain_1"]
  kind = jax.devices()[0].platform.upper()
  log(f"data parallel ({model_name}, global batch {batch_size}, {kind}; gradients "
      f"{gradient_bytes / 1e6:.2f} MB all-reduced per step)")
  log(f"  plain one-device step: {rates['plain_1']:,.0f} img/s")
  for n in device_counts:
    log(f"  {n} device{'s' if n > 1 else ' '}: {rates[f'sharded_{n}']:,.0f} img/s "
        f"({rates[f'sharded_{n}'] / rates['plain_1']:.3f}x plain); ring all-reduce sends "
        f"{result['allreduce_bytes_per_device'][n] / 1e6:.2f} MB per device per step")
  return result
