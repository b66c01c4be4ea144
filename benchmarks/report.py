"""The whole `flaxzoo bench`: the side-by-side run (`benchmarks.bench`), the optional slow figures,
a printed summary, and, when asked (`--csv PATH`), one appended CSV row (the project's own runs go
to `results/bench.csv`)."""

import collections
import contextlib
import csv
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from flaxzoo import data, runtime
from flaxzoo.benchmarks import bench, machine
from flaxzoo.files import replace_atomically
from flaxzoo.training import checkpoint

SWEEP_BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
TARGET_ACCURACY = 0.99

CSV_COLUMNS = [
    "date", "model", "device", "matmul_peak_gflops", "batch_size", "jax_version", "torch_version",
    "jax_train_img_s", "torch_eager_train_img_s", "torch_compile_train_img_s",
    "train_ratio_vs_torch_eager", "train_ratio_vs_torch_compile",
    "jax_eval_img_s", "torch_eager_eval_img_s", "torch_compile_eval_img_s",
    "eval_ratio_vs_torch_eager", "eval_ratio_vs_torch_compile",
    "jax_latency_p50_ms", "torch_eager_latency_p50_ms", "torch_compile_latency_p50_ms",
    "jax_latency_p99_ms", "torch_eager_latency_p99_ms", "torch_compile_latency_p99_ms",
    "jax_first_train_step_s", "torch_eager_first_train_step_s", "torch_compile_first_train_step_s",
    "jax_train_pct_of_matmul_peak", "torch_eager_train_pct_of_matmul_peak",
    "torch_compile_train_pct_of_matmul_peak",
    "jax_peak_rss_mb", "torch_eager_peak_rss_mb", "torch_compile_peak_rss_mb",
    "real_data_ratio", "checkpoint_cost_pct",
    "jax_fast_seconds_to_99", "jax_fast_test_accuracy", "torch_script_seconds_to_99",
    "torch_script_test_accuracy", "time_to_99_ratio_torch_over_jax",
    "jax_fast_cached_seconds_to_99", "jax_eval_pct_of_matmul_peak",
    "torch_eager_eval_pct_of_matmul_peak", "torch_compile_eval_pct_of_matmul_peak",
    "streaming_ratio",
]


def mnist_manual_dir(manual_dir: str | None) -> str | None:
  if manual_dir:
    return manual_dir
  root = os.environ.get(data.MANUAL_DIR_ENV)
  return str(Path(root) / "mnist") if root else None


def load_mnist(manual_dir):
  """Real MNIST train/test arrays, prepared through tfds like every training run."""
  dataset = data.load_dataset("mnist", manual_dir=mnist_manual_dir(manual_dir))
  return dataset.splits["train"].arrays(), dataset.splits["test"].arrays()


def batch_size_sweep(model_name: str, frameworks, repeats: int, log) -> dict:
  """Train img/s for each batch size in SWEEP_BATCH_SIZES (torch.compile left out: it recompiles
  for every shape)."""
  sweep = {}
  for batch_size in SWEEP_BATCH_SIZES:
    jax_runner = bench.JaxRunner(model_name, batch_size, 10_000)
    runners = [jax_runner] + [bench.TorchRunner(jax_runner, False, 10_000)
                              for f in frameworks if f == "torch_eager"]
    images, labels = bench.synthetic_batch(batch_size)
    steps = max(2, 2048 // batch_size)
    for runner in runners:
      runner.train_steps(images, labels, 2)
    rates = bench.interleaved_rates(runners, lambda r: r.train_steps(images, labels, steps),
                                    steps * batch_size, repeats)
    sweep[batch_size] = rates
    log(f"  batch {batch_size:5d}: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items()))
  return sweep


def batches_rate(runner, batches, batch_size: int, steps: int) -> float:
  """img/s of `steps` train steps fed from `batches`, an iterator of (images, labels)."""
  def work():
    state = runner.state
    for _, (images, labels) in zip(range(steps), batches):
      state, _ = bench.train_step(state, images, labels)
    jax.block_until_ready(state.params)
    runner.state = state

  return steps * batch_size / bench.timed(work)


def real_batches_rate(runner, train_split, batch_size: int, steps: int, epoch: int) -> float:
  """img/s of `steps` train steps fed by the real input path (`data.train_batches`)."""
  return batches_rate(runner, data.train_batches(train_split, batch_size, seed=0, epoch=epoch),
                      batch_size, steps)


def taking_turns(measure: dict, repeats: int) -> dict:
  """{name: [measure[name](repeat + 1) for each repeat]}, the names taking turns in an order that
  rotates from repeat to repeat, so that a machine's drift favours none."""
  names = list(measure)
  results = {name: [] for name in names}
  for repeat in range(repeats):
    for name in names[repeat % len(names):] + names[:repeat % len(names)]:
      results[name].append(measure[name](repeat + 1))
  return results


def warm_jax_runner(model_name: str, batch_size: int) -> bench.JaxRunner:
  """A JaxRunner whose train step is compiled (the input-path figures time steps only)."""
  runner = bench.JaxRunner(model_name, batch_size, 100_000)
  runner.train_steps(*bench.synthetic_batch(batch_size), 3)
  return runner


def real_data_figures(runner: bench.JaxRunner, repeats: int, manual_dir, log) -> dict:
  """The input paths against a fixed synthetic batch (interleaved chunks of steps): real MNIST in
  memory, and streamed from its tfds ArrayRecord files by the default number of grain worker
  processes (one stream for all chunks: the workers' start is not timed); and the cost of one
  checkpoint save (written and waited for) as a share of one epoch's training."""
  train_split, _ = load_mnist(manual_dir)
  streamed_split = data.load_dataset("mnist", manual_dir=mnist_manual_dir(manual_dir),
                                     splits=("train",), streaming="on").splits["train"]
  batch_size = runner.config.batch_size
  images, labels = bench.synthetic_batch(batch_size)
  steps = 50
  workers = data.default_workers()
  stream = data.train_batches(streamed_split, batch_size, seed=0, epoch=0, workers=workers, epochs=1000)
  measure = {"real": lambda epoch: real_batches_rate(runner, train_split, batch_size, steps, epoch),
             "streaming": lambda epoch: batches_rate(runner, stream, batch_size, steps),
             "synthetic": lambda epoch: steps * batch_size / bench.timed(
                 lambda: runner.train_steps(images, labels, steps))}
  with contextlib.closing(stream):
    for name in measure:  # warm-up, untimed: the first chunk of each path runs slower
      measure[name](0)
    rates = taking_turns(measure, repeats)
    # The stream alone, no training: how far ahead of the step the workers can run given a core,
    # and the CPU time it takes per image, here and in the workers.
    loader_steps, loader_rates, cpu_here, cpu_workers = 200, [], [], []
    for _ in range(3):
      before = stream_cpu_seconds()
      loader_rates.append(loader_steps * batch_size / bench.timed(lambda: collections.deque(
          itertools.islice(stream, loader_steps), maxlen=0)))
      after = stream_cpu_seconds()
      cpu_here.append((after[0] - before[0]) / (loader_steps * batch_size) * 1e6)
      cpu_workers.append((after[1] - before[1]) / (loader_steps * batch_size) * 1e6)
    loader_rate = statistics.median(loader_rates)
  real_rate, synthetic_rate = statistics.median(rates["real"]), statistics.median(rates["synthetic"])
  streaming_rate = statistics.median(rates["streaming"])
  epoch_seconds = len(train_split[0]) / real_rate

  saves = []
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.open_manager(workdir)
    card = {"config": {}, "step": 0}
    for step in range(1, 6):
      start = time.perf_counter()
      checkpoint.save(manager, runner.state.replace(step=step), {**card, "step": step}, 3)
      checkpoint.wait(manager, 3)
      saves.append(time.perf_counter() - start)
    manager.close()
  save_seconds = statistics.median(saves)
  # Where training keeps every core busy, the stream's CPU time comes out of the step's: the
  # in-memory step takes cores / rate of CPU per image, the stream adds its own.
  cores = machine.cpu_description()["cores"]
  step_cpu_us = cores / real_rate * 1e6
  stream_cpu_us = statistics.median(cpu_here) + statistics.median(cpu_workers)
  result = {"real_data_img_s": real_rate, "synthetic_img_s": synthetic_rate,
            "real_data_ratio": real_rate / synthetic_rate, "streaming_img_s": streaming_rate,
            "streaming_workers": workers, "streaming_ratio": streaming_rate / real_rate,
            "streaming_loader_img_s": loader_rate,
            "streaming_cpu_us_per_image_main": statistics.median(cpu_here),
            "streaming_cpu_us_per_image_workers": statistics.median(cpu_workers),
            "streaming_ratio_bound_saturated": step_cpu_us / (step_cpu_us + stream_cpu_us),
            "checkpoint_save_s": save_seconds, "epoch_train_s": epoch_seconds,
            "checkpoint_cost_pct": 100 * save_seconds / epoch_seconds}
  log(f"  real-data input path {real_rate:,.0f} img/s vs synthetic {synthetic_rate:,.0f} "
      f"({result['real_data_ratio']:.3f}x); one checkpoint save {save_seconds * 1e3:.0f} ms = "
      f"{result['checkpoint_cost_pct']:.2f}% of a {epoch_seconds:.1f} s epoch")
  log(f"  streamed from ArrayRecord ({workers} worker process{'es' if workers > 1 else ''}) "
      f"{streaming_rate:,.0f} img/s = {result['streaming_ratio']:.3f}x the in-memory path; the "
      f"stream alone, not training, {loader_rate:,.0f} img/s")
  log(f"  the stream's CPU per image: {result['streaming_cpu_us_per_image_main']:.1f} us in this "
      f"process + {result['streaming_cpu_us_per_image_workers']:.1f} us in its workers; the "
      f"in-memory step's {cores} cores x 1/{real_rate:,.0f} s = {step_cpu_us:.0f} us: with every "
      f"core busy, streaming reaches at most {result['streaming_ratio_bound_saturated']:.3f}x")
  return result


def stream_cpu_seconds() -> tuple[float, float]:
  """CPU seconds (user + system) so far of this process and of its child processes alive now (a
  stream's grain workers)."""
  import psutil  # orbax-checkpoint's and tfds's dependency
  me = psutil.Process()
  here = sum(me.cpu_times()[:2])
  children = 0.0
  for child in me.children(recursive=True):
    try:
      children += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return here, children


def fraction_sweep(runner: bench.JaxRunner, manual_dir, log) -> dict:
  """Epoch time (JAX, real input path) on SWEEP_FRACTIONS of the MNIST training set."""
  train_split, _ = load_mnist(manual_dir)
  batch_size = runner.config.batch_size
  sweep = {}
  for fraction in SWEEP_FRACTIONS:
    count = int(len(train_split[0]) * fraction)
    part = (train_split[0][:count], train_split[1][:count])
    steps = data.steps_per_epoch(count, batch_size)
    rate = real_batches_rate(runner, part, batch_size, steps, epoch=0)
    sweep[fraction] = {"examples": count, "epoch_s": steps * batch_size / rate, "img_s": rate}
    log(f"  fraction {fraction:4.2f} ({count:5d} images): epoch {sweep[fraction]['epoch_s']:.1f} s, "
        f"{rate:,.0f} img/s")
  return sweep


def run_timed(command: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True,
                        env=None if env is None else {**os.environ, **env})
  return time.perf_counter() - start, done


def run_fast_config(workdir: str, raw_dir: str, cache_dir: str) -> tuple[float, dict]:
  """One fresh `flaxzoo train --config fast` process; its wall time and final test record."""
  seconds, done = run_timed([sys.executable, "-m", "flaxzoo.training", "train", "--config", "fast",
                             "--workdir", workdir, "--manual-dir", raw_dir],
                            env={runtime.CACHE_ENV: cache_dir})
  if done.returncode != 0:
    raise RuntimeError(f"flaxzoo train --config fast failed: {done.stderr.strip()[-2000:]}")
  records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return seconds, [r for r in records if r["split"] == "test"][-1]


def measure_time_to_accuracy(manual_dir, log) -> dict:
  """Wall time of fresh processes, start-up included, to TARGET_ACCURACY MNIST test accuracy:
  `flaxzoo train --config fast` (data already prepared and decoded) and the plain
  PyTorch script `benchmarks.torch_mnist` (reading the raw files).

  flaxzoo runs twice: first with an empty compilation cache (every program compiled: the headline
  figure), then again into a new workdir with the cache the first run filled, as a restarted or
  repeated run on the same machine would."""
  raw_dir = mnist_manual_dir(manual_dir)
  if not raw_dir:
    raise data.DataError(f"--time-to-accuracy needs the MNIST raw files: pass --manual-dir or set "
                         f"{data.MANUAL_DIR_ENV} to the folder holding mnist/")
  load_mnist(manual_dir)  # prepared once, outside the timing (both sides then read local files)
  result = {}
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "compilation-cache")
    seconds, test = run_fast_config(os.path.join(tmp, "cold"), raw_dir, cache)
    result.update(jax_fast_seconds_to_99=seconds, jax_fast_test_accuracy=test["accuracy"],
                  jax_fast_epochs=test["epoch"], jax_fast_reached=test["accuracy"] >= TARGET_ACCURACY)
    log(f"  flaxzoo train --config fast: {test['accuracy']:.2%} after {test['epoch']} epoch(s), "
        f"{seconds:.1f} s wall (empty compilation cache)")
    seconds, test = run_fast_config(os.path.join(tmp, "warm"), raw_dir, cache)
    result.update(jax_fast_cached_seconds_to_99=seconds, jax_fast_cached_test_accuracy=test["accuracy"])
    log(f"  flaxzoo train --config fast again: {test['accuracy']:.2%}, {seconds:.1f} s wall "
        f"(programs from the compilation cache)")
  seconds, done = run_timed([sys.executable, "-m", "flaxzoo.benchmarks.torch_mnist", "--mnist-dir", raw_dir,
                             "--target", str(TARGET_ACCURACY)])
  if done.returncode != 0:
    raise RuntimeError(f"benchmarks.torch_mnist failed: {done.stderr.strip()[-2000:]}")
  torch_run = json.loads(done.stdout.strip().splitlines()[-1])
  result.update(torch_script_seconds_to_99=seconds, torch_script_test_accuracy=torch_run["test_accuracy"],
                torch_script_epochs=torch_run["epochs"], torch_script_reached=torch_run["reached"])
  log(f"  plain PyTorch script: {torch_run['test_accuracy']:.2%} after {torch_run['epochs']} "
      f"epoch(s), {seconds:.1f} s wall")
  result["time_to_99_ratio_torch_over_jax"] = seconds / result["jax_fast_seconds_to_99"]
  return result


def append_csv(path: Path, result: dict) -> None:
  """Appends one row; a file written before a column was added is rewritten with the new header
  first (its old rows keep their values, the new column blank)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rows, rewrite = [], not path.exists()
  if path.exists():
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if reader.fieldnames != CSV_COLUMNS:
        rows, rewrite = list(reader), True
  if rewrite:
    def write_rows(tmp):
      with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    replace_atomically(path, write_rows)
  with open(path, "a", newline="") as f:
    csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow(
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})


def print_summary(result: dict, log) -> None:
  names = [n for n in bench.FRAMEWORKS if f"{n}_train_img_s" in result]
  log(f"\n{result['model']} on {result['device']}, FP32 matmul peak "
      f"{result['matmul_peak_gflops']:.0f} GFLOP/s (measured in this run)")
  log(f"{'':34s}" + "".join(f"{n:>15s}" for n in names))
  rows = [("train img/s (batch %d)" % result["batch_size"], "train_img_s", "{:,.0f}"),
          ("eval img/s (batch %d)" % result["eval_batch_size"], "eval_img_s", "{:,.0f}"),
          ("batch-1 latency p50 ms", "latency_p50_ms", "{:.3f}"),
          ("batch-1 latency p99 ms", "latency_p99_ms", "{:.3f}"),
          ("first train step s (compile)", "first_train_step_s", "{:.2f}"),
          ("train GFLOP/s", "train_gflops", "{:.1f}"),
          ("train % of matmul peak", "train_pct_of_matmul_peak", "{:.1f}"),
          ("eval GFLOP/s", "eval_gflops", "{:.1f}"),
          ("eval % of matmul peak", "eval_pct_of_matmul_peak", "{:.1f}"),
          ("peak RSS MB (training process)", "peak_rss_mb", "{:.0f}")]
  for label, key, fmt in rows:
    if f"jax_{key}" in result:
      log(f"{label:34s}" + "".join(f"{fmt.format(result[f'{n}_{key}']):>15s}" for n in names))
  for key in ("train_ratio_vs_torch_eager", "train_ratio_vs_torch_compile",
              "eval_ratio_vs_torch_eager", "eval_ratio_vs_torch_compile",
              "latency_p50_ratio_vs_torch_eager", "latency_p50_ratio_vs_torch_compile"):
    if key in result:
      log(f"{key:34s}{result[key]:15.2f}x")


def benchmark(model: str = "convnet", batch_size: int = 128, eval_batch_size: int = 1024,
          steps: int = 20, repeats: int = 7, latency_calls: int = 200,
          frameworks=bench.FRAMEWORKS, memory: bool = True, sweep: bool = False,
          real_data: bool = False, time_to_accuracy: bool = False, manual_dir=None,
          csv_path=None, devices=(), log=print) -> dict:
  """Runs `flaxzoo bench`; returns every figure (also appended as one row of `csv_path`, if
  given). `devices`: device counts for the data-parallel figures (`benchmarks.scale_out`)."""
  runtime.configure()
  result = {"date": datetime.datetime.now().isoformat(timespec="seconds")}
  result.update(bench.run_benchmark(model, batch_size, eval_batch_size, steps, repeats,
                                    latency_calls, frameworks, memory, log))
  print_summary(result, log)
  if devices:
    from flaxzoo.benchmarks import scale_out
    result["data_parallel"] = scale_out.device_figures(model, batch_size, devices, steps, repeats, log)
  runner = warm_jax_runner(model, batch_size) if sweep or real_data else None
  if sweep:
    log("scalability: train img/s against batch size")
    result["batch_size_sweep"] = batch_size_sweep(model, frameworks, max(3, repeats // 2), log)
    log("scalability: epoch time against dataset fraction (JAX, real MNIST)")
    result["fraction_sweep"] = fraction_sweep(runner, manual_dir, log)
  if real_data:
    log("input path and checkpoint cost (JAX, real MNIST)")
    result.update(real_data_figures(runner, repeats, manual_dir, log))
  if time_to_accuracy:
    log(f"time to {TARGET_ACCURACY:.1%} MNIST test accuracy (fresh processes, start-up included)")
    result.update(measure_time_to_accuracy(manual_dir, log))
  if csv_path:
    append_csv(Path(csv_path), result)
    log(f"appended to {csv_path}")
  return result
