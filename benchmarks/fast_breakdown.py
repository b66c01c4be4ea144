"""Where the wall time of `flaxzoo train --config fast` goes, from process start to exit.

Runs the command in a fresh child process whose phases are timed by wrapping the functions that do
them: Python's start, imports, XLA's setup (`runtime.configure`), loading the data, creating the
train state (initialisation and its compilation), the first train step (its compilation), the
other train steps, the evaluations, checkpoint saves and waits, the curves picture, the rest of
the training loop (batches, metrics, logging), and what is left (the CLI's own work, process exit).
MNIST must be prepared (and decoded) already, as for `flaxzoo bench --time-to-accuracy`.

  python -m flaxzoo.benchmarks.fast_breakdown [--runs N] [-- more flaxzoo train flags]
"""

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("Python start", "imports", "XLA setup", "data load", "train state (init, compile)",
          "first train step (compile)", "other train steps", "evaluations", "checkpoint saves",
          "curves picture", "rest of the training loop", "CLI, exit and the rest")


def _child(out_path: str, spawned_at: float, train_args: list[str]) -> int:
  """In the fresh process: times the phases of one `flaxzoo train`, writes them to out_path and
  returns the command's exit code. `spawned_at`: the parent's time.time() as it started this
  process (a process's own create_time is off by ~0.9 s in a KVM guest: psutil's boot time)."""
  seconds = collections.Counter({"Python start": time.time() - spawned_at})
  start = time.perf_counter()
  import jax  # what the command imports on its way (none of it starts XLA's backend)

  from flaxzoo import data, runtime
  from flaxzoo.training import checkpoint, cli, parallel, train
  seconds["imports"] = time.perf_counter() - start

  def timed(phase, fn):
    def wrapper(*args, **kwargs):
      began = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        seconds[phase] += time.perf_counter() - began
    return wrapper

  runtime.configure = timed("XLA setup", runtime.configure)
  data.load_dataset = timed("data load", data.load_dataset)
  train.create_train_state = timed("train state (init, compile)", train.create_train_state)
  train.evaluate = timed("evaluations", train.evaluate)
  train.draw_curves = timed("curves picture", train.draw_curves)
  checkpoint.save = timed("checkpoint saves", checkpoint.save)
  checkpoint.wait = timed("checkpoint saves", checkpoint.wait)
  train.train_epochs = timed("training loop", train.train_epochs)
  sharded_train_step = parallel.sharded_train_step

  def timed_step_fn(layout):
    step_fn, calls = sharded_train_step(layout), [0]

    def step(*args):
      began = time.perf_counter()
      result = jax.block_until_ready(step_fn(*args))  # async dispatch is off on CPU anyway
      calls[0] += 1
      seconds["first train step (compile)" if calls[0] == 1 else "other train steps"] += (
          time.perf_counter() - began)
      return result
    return step

  parallel.sharded_train_step = timed_step_fn
  code = cli.main(["train", "--config", "fast", *train_args])
  with open(out_path, "w") as f:
    json.dump(seconds, f)
  return code


def breakdown(seconds: dict, wall: float) -> dict:
  """The phases of one run, summing to its wall time."""
  inside_loop = sum(seconds.get(p, 0.0) for p in ("first train step (compile)", "other train steps",
                                                   "evaluations", "checkpoint saves", "curves picture"))
  phases = {p: seconds.get(p, 0.0) for p in PHASES[:-2]}
  phases["rest of the training loop"] = seconds.get("training loop", 0.0) - inside_loop
  phases["CLI, exit and the rest"] = wall - sum(phases.values())
  return phases


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", type=int, default=1, help="fresh processes, one after another (1)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
  args, train_args = parser.parse_known_args(argv)
  train_args = [a for a in train_args if a != "--"]
  if args.child:
    return _child(args.child, args.spawned_at, train_args)
  from flaxzoo.benchmarks import machine
  print(machine.machine_line())
  runs = []
  for run in range(args.runs):
    with tempfile.TemporaryDirectory() as scratch:
      out = os.path.join(scratch, "phases.json")
      workdir = os.path.join(scratch, "run")
      began = time.perf_counter()
      command = [sys.executable, "-m", "flaxzoo.benchmarks.fast_breakdown", "--child", out,
                 "--spawned-at", repr(time.time()), "--workdir", workdir, *train_args]
      done = subprocess.run(command, capture_output=True, text=True)
      wall = time.perf_counter() - began
      if done.returncode or not os.path.exists(out):
        print(f"flaxzoo train --config fast failed: {done.stderr.strip()[-2000:]}", file=sys.stderr)
        return 1
      with open(out) as f:
        phases = breakdown(json.load(f), wall)
      with contextlib.suppress(StopIteration):
        accuracy = next(line for line in reversed(done.stdout.splitlines()) if "test accuracy" in line)
        print(f"run {run + 1}: {accuracy.strip()}")
      runs.append((wall, phases))
  print(f"\n{'phase':32s}" + "".join(f"{f'run {i + 1}':>10s}" for i in range(len(runs))))
  for phase in PHASES:
    print(f"{phase:32s}" + "".join(f"{phases[phase]:9.2f}s" for _, phases in runs))
  print(f"{'wall time':32s}" + "".join(f"{wall:9.2f}s" for wall, _ in runs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
