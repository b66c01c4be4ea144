"""The same run on 1 device, on 4 emulated CPU devices, and as 2 processes of 2 devices: trains
each (fresh processes, `flaxzoo train` and `flaxzoo launch`), evaluates each checkpoint in a plain
one-device process, and prints the largest parameter difference from the 1-device run and the
test accuracies (docs/scale-out.md).

    .venv/bin/python scripts/scale_out_check.py --workroot /tmp/scale-out [--epochs 1] [-- TRAIN FLAGS]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from flaxzoo import models
from flaxzoo.training import checkpoint
from flaxzoo.training import config as config_lib
from flaxzoo.training.state import create_train_state

LAYOUTS = {"1 device": (1, None), "4 devices": (4, None), "2 processes x 2 devices": (2, 2)}


def run(args, devices: int) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "flaxzoo.training", *map(str, args)], env=env,
                        capture_output=True, text=True)


def final_params(workdir):
  card = checkpoint.read_card(workdir)
  config = config_lib.from_dict(card["config"])
  model = models.create_model(config.model, num_classes=card["num_classes"], **config.model_kwargs)
  target = create_train_state(model, config, card["input_shape"], total_steps=card["step"])
  return checkpoint.restore_latest(workdir, target)[0].params


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workroot", required=True)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("train_flags", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  extra = [f for f in args.train_flags if f != "--"]
  root = Path(args.workroot)
  report = {}
  for name, (devices, processes) in LAYOUTS.items():
    workdir = root / name.replace(" ", "-")
    train = ["train", "--workdir", workdir, "--epochs", args.epochs, *extra]
    command = (["launch", "--num-processes", processes, "--devices-per-process", devices, "--", *train]
               if processes else train)
    start = time.perf_counter()
    trained = run(command, devices)
    seconds = time.perf_counter() - start
    if trained.returncode:
      print(trained.stderr, file=sys.stderr)
      return trained.returncode
    evaluated = run(["eval", "--workdir", workdir, "--json", "--devices", 1], 1)
    report[name] = {"workdir": str(workdir), "wall_s": round(seconds, 1),
                    "epoch_line": [line for line in trained.stdout.splitlines() if line.startswith("epoch")][-1],
                    "eval_1_device_accuracy": json.loads(evaluated.stdout.splitlines()[-1])["accuracy"]}
  reference = final_params(report["1 device"]["workdir"])
  for name, row in report.items():
    params = final_params(row["workdir"])
    row["max_abs_param_difference_vs_1_device"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)))
    print(f"{name:<26} {row['epoch_line']}\n{'':<26} eval in a 1-device process: "
          f"{row['eval_1_device_accuracy']:.2%}; max |param - 1-device param| "
          f"{row['max_abs_param_difference_vs_1_device']:.2e}; wall {row['wall_s']} s")
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
