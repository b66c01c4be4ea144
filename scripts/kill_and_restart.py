"""Kills `flaxzoo train` with SIGKILL at random moments, restarts it each time, and checks that the
run it finally completes is bit for bit the run that was never interrupted.

    .venv/bin/python scripts/kill_and_restart.py [--kills 20] [--seed 0] [--root DIR]
        [--min-seconds 5] [--max-seconds 35] [--processes P --devices-per-process D] [-- TRAIN_ARGS...]

Default TRAIN_ARGS: the default ConvNet on MNIST with a checkpoint every 50 steps (so each attempt
keeps some progress). Raw data: --manual-dir in TRAIN_ARGS, or $FLAXZOO_MANUAL_DIR (default
../shared/data when it exists). A kill "survives" when the attempt after it starts from a readable
checkpoint no older than the last one committed before the kill, without an error. Prints
`survived K/N, bit-identical: yes/no` as its last line; exit status 0 only for N/N and yes.
With --processes, every attempt is `flaxzoo launch` of P processes (D emulated CPU devices each),
and kill -9 of the launcher takes all of them down at once. Not part of CI: on the default ConvNet
it takes ~10 minutes on a 2-core machine.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_ARGS = ["--checkpoint-every-steps", "50"]


LAUNCH: list[str] = []  # `launch --num-processes P ... --` before `train`, with --processes


def train_command(workdir: Path, train_args: list[str]) -> list[str]:
  return [sys.executable, "-m", "flaxzoo.training", *LAUNCH, "train", "--workdir", str(workdir), *train_args]


def committed_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in workdir.glob("[0-9]*") if p.name.isdigit()) if workdir.is_dir() else []


def run_to_completion(workdir: Path, train_args, env) -> subprocess.CompletedProcess:
  result = subprocess.run(train_command(workdir, train_args), capture_output=True, text=True,
                          cwd=ROOT, env=env)
  if result.returncode != 0:
    sys.exit(f"training in {workdir} failed:\n{result.stderr[-2000:]}")
  return result


def restore_newest(workdir: Path):
  """(step, skipped steps, state as numpy arrays by part) of the newest readable checkpoint."""
  import jax
  import numpy as np

  from flaxzoo import models
  from flaxzoo.training import checkpoint
  from flaxzoo.training import config as config_lib
  from flaxzoo.training.state import create_train_state
  card = checkpoint.read_card(workdir)
  config = config_lib.from_dict(card["config"])
  model = models.create_model(config.model, num_classes=card["num_classes"], **config.model_kwargs)
  target = create_train_state(model, config, card["input_shape"], total_steps=card["step"])
  state, card, skipped = checkpoint.restore_latest(workdir, target)
  arrays = {part: [np.asarray(x) for x in jax.tree.leaves(getattr(state, part))]
            for part in checkpoint.STATE_PARTS}
  return card["step"], [e.step for e in skipped], arrays


def metrics_without_timing(workdir: Path) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k != "img_per_s"} for l in lines]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
  parser.add_argument("--root", default="checkpoints/kill-and-restart",
                      help="holds the uninterrupted/ and killed/ workdirs")
  parser.add_argument("--min-seconds", type=float, default=5.0)
  parser.add_argument("--max-seconds", type=float, default=35.0)
  parser.add_argument("--keep", action="store_true", help="reuse a finished uninterrupted/ run")
  parser.add_argument("--processes", type=int, help="run every attempt as this many processes")
  parser.add_argument("--devices-per-process", type=int, default=1)
  parser.add_argument("train_args", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  train_args = (args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args) or DEFAULT_TRAIN_ARGS
  if args.processes:
    LAUNCH[:] = ["launch", "--num-processes", str(args.processes), "--devices-per-process",
                 str(args.devices_per_process), "--"]
  env = dict(os.environ)
  shared = ROOT.parent / "shared" / "data"
  if "FLAXZOO_MANUAL_DIR" not in env and shared.is_dir():
    env["FLAXZOO_MANUAL_DIR"] = str(shared)

  root = ROOT / args.root
  reference, killed = root / "uninterrupted", root / "killed"
  if not args.keep:
    shutil.rmtree(reference, ignore_errors=True)
  shutil.rmtree(killed, ignore_errors=True)
  started = time.monotonic()
  print(f"uninterrupted run: {' '.join(train_command(reference, train_args))}", flush=True)
  run_to_completion(reference, train_args, env)
  print(f"  done in {time.monotonic() - started:.0f} s; steps {committed_steps(reference)}", flush=True)

  rng = random.Random(args.seed)
  survived = 0
  for kill in range(1, args.kills + 1):
    before = committed_steps(killed)
    delay = rng.uniform(args.min_seconds, args.max_seconds)
    process = subprocess.Popen(train_command(killed, train_args), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
      out, err = process.communicate(timeout=delay)
      finished_early = True
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGKILL)
      out, err = process.communicate()
      finished_early = False
    after = committed_steps(killed)
    # Survived: the newest committed checkpoint reads back exactly (nothing skipped) and no
    # checkpoint committed before the kill was lost to it.
    if after:
      step, skipped, _ = restore_newest(killed)
      ok = not skipped and step == max(after) and (not before or step >= max(before))
    else:
      ok = not before
    ok = ok and "error:" not in err
    survived += ok
    print(f"kill {kill:2d}/{args.kills}: after {delay:5.1f} s"
          f"{' (finished before the kill)' if finished_early else ''}; committed steps "
          f"{before} -> {after}; {'ok' if ok else 'FAILED: ' + err[-500:]}", flush=True)
    if finished_early:
      break

  final = run_to_completion(killed, train_args, env)
  resumed = re.search(r"Resuming .* from step (\d+)", final.stderr)
  print(f"final attempt started at step {resumed.group(1) if resumed else 0} and finished",
        flush=True)
  a, b = restore_newest(reference)[2], restore_newest(killed)[2]
  same_state = all(len(a[p]) == len(b[p]) and all(x.dtype == y.dtype and x.shape == y.shape and
                                                  x.tobytes() == y.tobytes()
                                                  for x, y in zip(a[p], b[p])) for p in a)
  same_metrics = metrics_without_timing(reference) == metrics_without_timing(killed)
  identical = same_state and same_metrics
  print(f"params/optimizer state/step/rng identical: {same_state}; metrics.jsonl records "
        f"identical: {same_metrics}; total {time.monotonic() - started:.0f} s")
  print(f"survived {survived}/{args.kills}, bit-identical: {'yes' if identical else 'no'}")
  return 0 if survived == args.kills and identical else 1


if __name__ == "__main__":
  sys.exit(main())
