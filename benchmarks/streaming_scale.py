"""Memory and epoch time of streamed training against dataset size (docs/streaming.md).

  python -m flaxzoo.benchmarks.streaming_scale mnist mnist10x mnist \\
      folder:/tmp/mnist1x folder:/tmp/mnist10x folder:/tmp/mnist1x --data-dir /tmp/tfds

Each dataset trains the ConvNet (`flaxzoo train --streaming on`, a fresh workdir) in its own
process, one after the other; while it runs, its memory is sampled every 50 ms. Printed per run:
the training process's peak RSS (the kernel's high-water mark, VmHWM), the peak of the RSS summed
over it and its worker processes (shared pages counted in each) and of its anonymous part (no
pages of mapped files), the last epoch's time and img/s as the trainer printed them, and the share
of CPU time the hypervisor took (steal). Then each run against the reference of its kind (the
first tfds dataset, the first folder; the mean of its runs): RSS ratio, and the epoch time ratio
over the size ratio (1.0: epoch time exactly linear in size).

Runs minutes apart on a virtual machine see different shares of its CPU (steal), so last, in this
one process, the datasets' streams feed one compiled train step in turns (`--turns`): the ratio
of their img/s is the per-image cost, the same figure free of that drift.
"""

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from flaxzoo.benchmarks import machine

EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+\s+step (\d+)\s.*?([\d.]+) img/s\s+([\d.]+) s$")
TRAINING_IMAGES_LINE = re.compile(r"Streaming \S+ (\d+) training images")
SAMPLE_SECONDS = 0.05
BATCH_SIZE = 128  # flaxzoo train's default


def status_bytes(pid: int, field: str) -> int:
  """A memory figure of /proc/PID/status (VmHWM, RssAnon, ...) in bytes; 0 once the process is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def cpu_times() -> list[int]:
  """The machine's CPU time counters (/proc/stat: user ... steal), in ticks."""
  with open("/proc/stat") as f:
    return [int(x) for x in f.readline().split()[1:9]]


def steal_share(before: list[int], after: list[int]) -> float:
  """Share of the CPU time between two readings that the hypervisor gave to other machines: a
  virtual machine's timings are only comparable at similar shares."""
  spent = [b - a for a, b in zip(before, after)]
  return spent[7] / max(1, sum(spent))


def tree_memory(process: psutil.Process) -> tuple[int, int]:
  """Resident bytes summed over `process` and its descendants: all of it, and the anonymous part
  (without pages of mapped files, such as ArrayRecord files read through mmap, which the kernel
  can drop)."""
  total = anonymous = 0
  for p in [process, *process.children(recursive=True)]:
    total += status_bytes(p.pid, "VmRSS")
    anonymous += status_bytes(p.pid, "RssAnon")
  return total, anonymous


def measured_run(dataset: str, workdir: Path, epochs: int, extra: list[str]) -> dict:
  """Trains on `dataset` in a child process; its memory peaks and epoch figures."""
  command = [sys.executable, "-m", "flaxzoo.training", "train", "--dataset", dataset, "--workdir", str(workdir),
             "--epochs", str(epochs), "--streaming", "on", *extra]
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
    process = psutil.Process(child.pid)
    main_peak = tree_peak = tree_anonymous_peak = 0
    start, ticks = time.perf_counter(), cpu_times()
    while child.poll() is None:
      main_peak = max(main_peak, status_bytes(child.pid, "VmHWM"))
      total, anonymous = tree_memory(process)
      tree_peak, tree_anonymous_peak = max(tree_peak, total), max(tree_anonymous_peak, anonymous)
      time.sleep(SAMPLE_SECONDS)
    seconds, steal = time.perf_counter() - start, steal_share(ticks, cpu_times())
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  if child.returncode != 0:
    raise SystemExit(f"streaming_scale: {' '.join(command)} failed ({child.returncode}):\n{stderr[-2000:]}")
  epoch_lines = [m.groups() for m in map(EPOCH_LINE.match, stdout.splitlines()) if m]
  images = TRAINING_IMAGES_LINE.search(stderr)
  if not (epoch_lines and images):
    raise SystemExit(f"streaming_scale: {' '.join(command)} printed no epoch line or no streaming line; "
                     f"has the trainer's output changed? (EPOCH_LINE, TRAINING_IMAGES_LINE)")
  _, step, img_s, epoch_s = epoch_lines[-1]
  return {"dataset": dataset, "train_images": int(images.group(1)),
          "steps": int(step), "main_peak_rss_mb": main_peak / 2**20, "tree_peak_rss_mb": tree_peak / 2**20,
          "tree_peak_anonymous_mb": tree_anonymous_peak / 2**20,
          "last_epoch_s": float(epoch_s), "last_epoch_img_s": float(img_s), "run_s": seconds, "cpu_steal": steal}


def kind(dataset: str) -> str:
  return "folder" if dataset.startswith("folder:") else "tfds"


def references_of(datasets) -> dict:
  """{kind: the first dataset of that kind}: what the others of the kind are compared with."""
  references = {}
  for dataset in datasets:
    references.setdefault(kind(dataset), dataset)
  return references


def compare(runs: list[dict], log) -> None:
  """Adds to each run its ratios against the reference of its kind (the first tfds dataset, the
  first folder), taken as the mean of every run of the reference: running it before and after
  the large one evens out a machine whose speed drifts."""
  references = references_of(run["dataset"] for run in runs)
  keys = ("train_images", "main_peak_rss_mb", "tree_peak_rss_mb", "tree_peak_anonymous_mb", "last_epoch_s")
  for run in runs:
    name = references[kind(run["dataset"])]
    if run["dataset"] == name:
      continue
    same = [r for r in runs if r["dataset"] == name]
    reference = {key: sum(r[key] for r in same) / len(same) for key in keys}
    size_ratio = run["train_images"] / reference["train_images"]
    run["rss_ratio"] = run["main_peak_rss_mb"] / reference["main_peak_rss_mb"]
    run["tree_rss_ratio"] = run["tree_peak_rss_mb"] / reference["tree_peak_rss_mb"]
    run["tree_anonymous_ratio"] = run["tree_peak_anonymous_mb"] / reference["tree_peak_anonymous_mb"]
    run["epoch_time_over_size_ratio"] = run["last_epoch_s"] / reference["last_epoch_s"] / size_ratio
    log(f"{run['dataset']} vs {name} ({len(same)} run{'s' if len(same) > 1 else ''}): {size_ratio:.1f}x "
        f"the images; peak RSS {run['rss_ratio']:.3f}x (with workers {run['tree_rss_ratio']:.3f}x, "
        f"their anonymous memory {run['tree_anonymous_ratio']:.3f}x); epoch time "
        f"{run['epoch_time_over_size_ratio']:.3f}x linear")


def interleaved_rates(datasets: list[str], data_dir, workers, steps: int, repeats: int, log) -> dict:
  """Train img/s fed by each dataset's stream in this one process, the datasets taking turns in
  chunks of `steps` (the step compiled and every stream started and warmed, untimed): the
  per-image cost of each, free of the drift between runs minutes apart (on a virtual machine,
  other machines' load). Medians of `repeats` turns."""
  from flaxzoo import data
  from flaxzoo.benchmarks import report
  runner = report.warm_jax_runner("convnet", BATCH_SIZE)
  workers = data.default_workers() if workers is None else workers
  names = list(dict.fromkeys(datasets))
  with contextlib.ExitStack() as stack:
    streams = {}
    for name in names:
      split = data.load_dataset(name, data_dir, splits=("train",), streaming="on").splits["train"]
      streams[name] = stack.enter_context(contextlib.closing(data.train_batches(
          split, BATCH_SIZE, seed=0, epoch=0, workers=workers, epochs=2)))
      report.batches_rate(runner, streams[name], BATCH_SIZE, steps)  # warm-up, untimed
    rates = report.taking_turns({name: lambda _, stream=stream: report.batches_rate(
        runner, stream, BATCH_SIZE, steps) for name, stream in streams.items()}, repeats)
  medians = {name: statistics.median(values) for name, values in rates.items()}
  log(f"in one process, taking turns ({repeats} x {steps} steps each, {workers} worker "
      f"process{'es' if workers > 1 else ''} per stream): " +
      ", ".join(f"{name} {rate:,.0f} img/s" for name, rate in medians.items()))
  references = references_of(names)
  for name in names:
    reference = references[kind(name)]
    if name != reference:
      log(f"  {name} vs {reference}: per-image time {medians[reference] / medians[name]:.3f}x "
          f"(1.0: epoch time exactly linear in size)")
  return medians


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("datasets", nargs="+", help="tfds names or folder:PATH; the first of each "
                      "kind is the reference (give it again after the others to even out drift)")
  parser.add_argument("--epochs", type=int, default=2, help="per run; the last epoch is timed (2; 0: no "
                      "training runs, only the turns)")
  parser.add_argument("--workers", type=int, help="streaming worker processes (default: train's)")
  parser.add_argument("--data-dir", help="tfds data dir holding the datasets")
  parser.add_argument("--turns", type=int, default=7, help="turns per dataset of the in-process "
                      "comparison (7; 0 skips it)")
  parser.add_argument("--turn-steps", type=int, default=50, help="train steps per turn (50)")
  parser.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
  args = parser.parse_args(argv)
  extra = (["--data-dir", args.data_dir] if args.data_dir else []) + \
          (["--workers", str(args.workers)] if args.workers is not None else [])
  print(machine.machine_line(), flush=True)
  runs = []
  with tempfile.TemporaryDirectory() as root:
    for number, dataset in enumerate(args.datasets if args.epochs > 0 else []):
      runs.append(measured_run(dataset, Path(root) / str(number), args.epochs, extra))
      run = runs[-1]
      print(f"{dataset}: {run['train_images']:,} training images, {run['steps']:,} steps; peak RSS "
            f"{run['main_peak_rss_mb']:,.0f} MB (training process), {run['tree_peak_rss_mb']:,.0f} MB "
            f"(with workers; {run['tree_peak_anonymous_mb']:,.0f} MB anonymous); "
            f"epoch {args.epochs}: {run['last_epoch_s']:.1f} s, "
            f"{run['last_epoch_img_s']:,.0f} img/s; CPU steal {run['cpu_steal']:.0%}", flush=True)
  compare(runs, print)
  rates = interleaved_rates(args.datasets, args.data_dir, args.workers, args.turn_steps, args.turns,
                            print) if args.turns else {}
  if args.json:
    print(json.dumps({"runs": runs, "interleaved_img_s": rates}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
