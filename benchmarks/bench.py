"""`flaxzoo bench`: JAX against PyTorch (eager and torch.compile) on the same CPU, in one run.

For one registered model, both frameworks get the same architecture with the same initial weights
(`benchmarks.torch_twins`), the same batch of synthetic uint8 images, the same optimizer (AdamW on a
one-cycle schedule) and the same input conversion inside the timed step. After a warm-up, the
frameworks are timed in turns (interleaved repeats, so a noisy machine slows all of them alike), each
turn after one untimed call of its own (a train step, an eval call), and medians are reported:

- train img/s at `batch_size`; eval img/s at `eval_batch_size`; batch-1 latency p50/p99 (host in,
  host out); compile / first-step time;
- achieved GFLOP/s (FLOPs of the train step as XLA counts them, the same math in both) and its share
  of an FP32 matmul peak measured in the same run;
- peak RSS of a separate process per framework that trains `steps` steps (memory is not noisy, and
  one process cannot tell two frameworks' memory apart);
- ratios JAX / torch eager and JAX / torch.compile.

Options add the slow figures: `sweep` (train img/s against batch size; epoch time against dataset
fraction on real MNIST), `real_data` (the real-data input path against synthetic batches) and
`time_to_accuracy` (wall time of `flaxzoo train --config fast` and of a plain PyTorch script to
99.0 % MNIST test accuracy, each a fresh process, start-up and compilation included).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from flaxzoo import models, runtime
from flaxzoo.benchmarks import machine
from flaxzoo.benchmarks.torch_twins import import_torch, torch_twin
from flaxzoo.models import layers
from flaxzoo.training import configs
from flaxzoo.training.evaluation import compiled_in_passes, logits_in_passes, logits_step
from flaxzoo.training.state import create_train_state
from flaxzoo.training.steps import TRAIN_STEP_COMPILER_OPTIONS, train_step

FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
MNIST_SHAPE = (28, 28, 1)


def synthetic_batch(batch_size: int, seed: int = 0):
  """uint8 images and int32 labels, as the real input path delivers them."""
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (batch_size, *MNIST_SHAPE), dtype=np.uint8),
          rng.integers(0, 10, (batch_size,), dtype=np.int32))


# --- the frameworks, each as: a train step, an eval forward, a batch-1 predict ---------------------

class JaxRunner:
  name = "jax"

  def __init__(self, model_name: str, batch_size: int, total_steps: int):
    self.config = configs.default_config(model_name, batch_size=batch_size)
    self.model = models.create_model(model_name, num_classes=10, **self.config.model_kwargs)
    self.state = create_train_state(self.model, self.config, MNIST_SHAPE, total_steps)
    self.initial_params = jax.device_get(self.state.params)
    self.initial_batch_stats = jax.device_get(self.state.batch_stats)
    model = self.model  # batch 1 as a serving loop would jit it: no static arguments to hash
    self.forward = jax.jit(lambda variables, x: logits_in_passes(model, variables, x))

  def train_steps(self, images, labels, steps: int) -> None:
    state = self.state
    for _ in range(steps):
      state, _ = train_step(state, images, labels)
    jax.block_until_ready(state.params)
    self.state = state

  def evaluate(self, images) -> None:  # in passes, as `flaxzoo eval` and `predict` run a batch
    variables = self.state.variables()
    compiled_in_passes(logits_step, self.model, variables, images)(variables, images).block_until_ready()

  def predict_one(self, image) -> np.ndarray:
    return np.asarray(self.forward(self.state.variables(), image))

  # The model's own arithmetic, each convolution as a convolution (layers.plain_convolutions), not
  # the product forms' zero taps; traced afresh, since jit reuses a step's trace made outside it.
  def train_step_flops(self, images, labels) -> float:
    with layers.plain_convolutions():
      return compiled_flops(jax.jit(lambda *args: train_step.__wrapped__(*args)).lower(
          self.state, images, labels))

  def eval_flops(self, images) -> float:
    with layers.plain_convolutions():
      return compiled_flops(jax.jit(lambda variables, x: logits_in_passes(self.model, variables, x)).lower(
          self.state.variables(), images))


def compiled_flops(lowered) -> float:
  """FLOPs of one call of a lowered program, from XLA's cost analysis of its compilation."""
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


class TorchRunner:
  """The twin in PyTorch; `compiled` wraps the module with torch.compile (default mode)."""

  def __init__(self, jax_runner: JaxRunner, compiled: bool, total_steps: int):
    torch = self.torch = import_torch()
    self.name = "torch_compile" if compiled else "torch_eager"
    config = jax_runner.config
    self.module = torch_twin(jax_runner.model, jax_runner.initial_params, jax_runner.initial_batch_stats)
    self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.learning_rate,
                                       weight_decay=config.weight_decay)
    self.schedule = torch.optim.lr_scheduler.OneCycleLR(
        self.optimizer, max_lr=config.learning_rate, total_steps=total_steps,
        pct_start=config.warmup_fraction)
    self.forward = torch.compile(self.module) if compiled else self.module

  def to_input(self, images):
    return self.torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)

  def train_steps(self, images, labels, steps: int) -> None:
    torch = self.torch
    self.module.train()
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      logits = self.forward(self.to_input(images))
      loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long())
      loss.backward()
      self.optimizer.step()
      self.schedule.step()

  def evaluate(self, images) -> None:
    self.module.eval()
    with self.torch.inference_mode():
      self.forward(self.to_input(images))

  def predict_one(self, image) -> np.ndarray:
    with self.torch.inference_mode():
      return self.forward(self.to_input(image)).numpy()


# --- measurements ------------------------------------------------------------------------------

def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def median_ms(fn, *args, repeats: int = 40) -> float:
  """Median wall time of `fn(*args)` in ms over `repeats` calls after one untimed call."""
  call = lambda: jax.block_until_ready(fn(*args))  # noqa: E731
  call()
  return statistics.median(timed(call) for _ in range(repeats)) * 1e3


def start_swap_benchmark(doc: str) -> int:
  """A formulation benchmark's start (batch_norm.py, dropout.py): its --repeats (turns of 10
  train steps per variant), the process-wide settings, the machine's line; returns the repeats."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=6, help="turns of 10 train steps per variant")
  args = parser.parse_args()
  runtime.configure(compilation_cache=False)
  print(machine.machine_line())
  return args.repeats


class SwappedStepRunner:
  """The train step of `config`'s model built inside `swap()` (a context that swaps one of its
  layers for another formulation), as `interleaved_rates` takes its runners."""

  def __init__(self, name: str, config, swap, images, labels):
    self.name = name
    with swap():
      model = models.create_model(config.model, num_classes=10, **config.model_kwargs)
      state = create_train_state(model, config, MNIST_SHAPE, 1000)
      # a function of its own per variant (no trace shared through jit's caches), traced here,
      # inside the swap, compiled as train_step is
      self.step = jax.jit(lambda state, images, labels: train_step.__wrapped__(state, images, labels),
                          donate_argnums=0, compiler_options=TRAIN_STEP_COMPILER_OPTIONS)
      self.state = jax.block_until_ready(self.step(state, images, labels)[0])

  def train_steps(self, images, labels, steps: int) -> None:
    for _ in range(steps):
      self.state, _ = self.step(self.state, images, labels)
    jax.block_until_ready(self.state)


def interleaved_rates(runners, work, items_per_call: int, repeats: int, warmup=None,
                      calls_per_turn: int = 1) -> dict:
  """Median items/s of `work(runner)` per runner, the runners taking turns in each repeat, each
  turn `calls_per_turn` timed calls. With `warmup`, a turn first calls `warmup(runner)` untimed:
  the first calls after another framework ran are slower (its threads asleep, the other's still
  spinning, its data out of cache), which a user's run of calls to one framework does not see (in
  blocks of 15 eval calls at batch 1024, JAX's first call took 26-44k img/s and the rest 41-45k,
  PyTorch eager's first 16-27k and the rest 29-31k; docs/benchmarks.md)."""
  rates = {r.name: [] for r in runners}
  for _ in range(repeats):
    for runner in runners:
      if warmup is not None:
        warmup(runner)
      for _ in range(calls_per_turn):
        rates[runner.name].append(items_per_call / timed(lambda: work(runner)))
  return {name: statistics.median(values) for name, values in rates.items()}


def interleaved_latencies(runners, image, calls: int, rounds: int = 4, warmup: int = 20) -> dict:
  """Batch-1 latency in ms (p50, p99) per runner: `calls` timed calls in `rounds` blocks per
  runner, the order of runners alternating from round to round, each block after `warmup` untimed
  calls. Blocks, not short alternating chunks: right after one framework ran, its thread pool's
  threads still spin-wait for work and take a core from the other (measured: JAX's p99 went from
  0.35 ms alone to 3-4 ms in chunks of 20 after PyTorch's), which says nothing about either
  framework serving requests on its own."""
  samples = {r.name: [] for r in runners}
  per_block = max(calls // rounds, 1)
  for round_index in range(rounds):
    for runner in (runners if round_index % 2 == 0 else runners[::-1]):
      for _ in range(warmup):
        runner.predict_one(image)
      for _ in range(per_block):
        samples[runner.name].append(timed(lambda: runner.predict_one(image)) * 1e3)
  return {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
          for name, v in samples.items()}


def peak_rss_mb(framework: str, model_name: str, batch_size: int, steps: int) -> dict:
  """Peak RSS of a fresh process that trains `steps` steps with one framework, and its RSS after
  the imports alone (so the difference is what the model's training adds)."""
  out = subprocess.run(
      [sys.executable, "-m", "flaxzoo.benchmarks.bench", "--memory-probe", framework, model_name,
       str(batch_size), str(steps)],
      capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def high_water_rss_mb() -> float:
  """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: a child started by a big parent
  inherits the parent's ru_maxrss through fork, so every child would report the parent's size."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_probe(framework: str, model_name: str, batch_size: int, steps: int) -> None:
  """Child side of `peak_rss_mb`."""
  runner = JaxRunner(model_name, batch_size, steps + 1)
  if framework != "jax":
    import_torch()
  baseline = high_water_rss_mb()
  if framework != "jax":
    runner = TorchRunner(runner, compiled=framework == "torch_compile", total_steps=steps + 1)
  runner.train_steps(*synthetic_batch(batch_size), steps)
  peak = high_water_rss_mb()
  print(json.dumps({"peak_rss_mb": round(peak, 1), "imports_rss_mb": round(baseline, 1)}))


def run_benchmark(model_name: str = "convnet", batch_size: int = 128, eval_batch_size: int = 1024,
                  steps: int = 20, repeats: int = 7, latency_calls: int = 200,
                  frameworks=FRAMEWORKS, memory: bool = True, log=print) -> dict:
  """Every figure of the side-by-side benchmark, as one flat-ish dict (see the module doc)."""
  unknown = sorted(set(frameworks) - set(FRAMEWORKS))
  if unknown or "jax" not in frameworks:
    raise ValueError(f"frameworks must include jax and be among {', '.join(FRAMEWORKS)}; "
                     f"got {', '.join(frameworks)}")
  total_steps = (repeats + 2) * steps + repeats + 10  # + each turn's warm-up step
  cpu = machine.cpu_description()
  result = {"model": model_name, "batch_size": batch_size, "eval_batch_size": eval_batch_size,
            "steps_per_repeat": steps, "repeats": repeats, "device": machine.device_line(cpu),
            "cpu": cpu["cpu"], "cores": cpu["cores"], "simd": cpu["simd"],
            "jax_version": jax.__version__}
  jax_runner = JaxRunner(model_name, batch_size, total_steps)
  runners = [jax_runner]
  if "torch_compile" in frameworks:  # a cold compile, like JAX's (no persistent cache either)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flaxzoo-bench-inductor-")
  if set(frameworks) - {"jax"}:
    torch = import_torch()
    result["torch_version"] = torch.__version__
    result["torch_threads"] = torch.get_num_threads()
    runners += [TorchRunner(jax_runner, compiled=name == "torch_compile", total_steps=total_steps)
                for name in ("torch_eager", "torch_compile") if name in frameworks]
  images, labels = synthetic_batch(batch_size)
  eval_images, _ = synthetic_batch(eval_batch_size, seed=1)
  one_image = eval_images[:1]

  log(f"benchmark: {model_name}, batch {batch_size}, on {result['device']}")
  for runner in runners:  # the first calls compile (JAX, torch.compile) or warm up (eager)
    result[f"{runner.name}_first_train_step_s"] = timed(lambda: runner.train_steps(images, labels, 1))
    result[f"{runner.name}_first_eval_s"] = timed(lambda: runner.evaluate(eval_images))
    result[f"{runner.name}_first_predict_s"] = timed(lambda: runner.predict_one(one_image))
    runner.train_steps(images, labels, 2)
  result["matmul_peak_gflops"] = machine.matmul_gflops()

  train = interleaved_rates(runners, lambda r: r.train_steps(images, labels, steps),
                            steps * batch_size, repeats, warmup=lambda r: r.train_steps(images, labels, 1))
  evaluation = interleaved_rates(runners, lambda r: r.evaluate(eval_images), eval_batch_size, repeats,
                                 warmup=lambda r: r.evaluate(eval_images), calls_per_turn=5)
  latency = interleaved_latencies(runners, one_image, latency_calls)
  flops = jax_runner.train_step_flops(images, labels)
  eval_flops = jax_runner.eval_flops(eval_images)
  result["train_step_gflop"] = flops / 1e9
  result["eval_batch_gflop"] = eval_flops / 1e9
  for runner in runners:
    name = runner.name
    result[f"{name}_train_img_s"] = train[name]
    result[f"{name}_eval_img_s"] = evaluation[name]
    result[f"{name}_latency_p50_ms"] = latency[name]["p50"]
    result[f"{name}_latency_p99_ms"] = latency[name]["p99"]
    gflops = flops * train[name] / batch_size / 1e9
    result[f"{name}_train_gflops"] = gflops
    result[f"{name}_train_pct_of_matmul_peak"] = 100 * gflops / result["matmul_peak_gflops"]
    eval_gflops = eval_flops * evaluation[name] / eval_batch_size / 1e9
    result[f"{name}_eval_gflops"] = eval_gflops
    result[f"{name}_eval_pct_of_matmul_peak"] = 100 * eval_gflops / result["matmul_peak_gflops"]
    if memory:
      rss = peak_rss_mb(name, model_name, batch_size, steps)
      result[f"{name}_peak_rss_mb"] = rss["peak_rss_mb"]
      result[f"{name}_imports_rss_mb"] = rss["imports_rss_mb"]
  for other in ("torch_eager", "torch_compile"):
    if other in frameworks:
      result[f"train_ratio_vs_{other}"] = train["jax"] / train[other]
      result[f"eval_ratio_vs_{other}"] = evaluation["jax"] / evaluation[other]
      result[f"latency_p50_ratio_vs_{other}"] = latency[other]["p50"] / latency["jax"]["p50"]
      result[f"latency_p99_ratio_vs_{other}"] = latency[other]["p99"] / latency["jax"]["p99"]
  return result


if __name__ == "__main__":  # python -m benchmarks.bench --memory-probe FRAMEWORK MODEL BATCH STEPS
  if sys.argv[1:2] != ["--memory-probe"] or len(sys.argv) != 6:
    sys.exit("usage: python -m benchmarks.bench --memory-probe FRAMEWORK MODEL BATCH_SIZE STEPS "
             "(the benchmark itself is: flaxzoo bench)")
  runtime.configure()  # as `flaxzoo bench` runs, before JAX computes
  _memory_probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
