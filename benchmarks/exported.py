"""Exported runtimes against JAX on this CPU: each checkpoint exported to every format (through
`flaxzoo export`'s own check), then batch-1 latency (p50, p99) and batch-1024 throughput on the
same real test images, in one process.

    .venv/bin/python -m flaxzoo.benchmarks.exported checkpoints/results/convnet checkpoints/results/resnet

With several workdirs it is also the zoo's export matrix: a format that cannot take a model is a
row saying so, with the converter's reason.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from flaxzoo import runtime
from flaxzoo.training import checkpoint, export
from flaxzoo.training.errors import ExportError
from flaxzoo.training.inference import checkpoint_split


def latency_ms(predict, images, calls: int) -> tuple[float, float]:
  """p50 and p99 of one-image calls, in ms (after 10 warm-up calls)."""
  for i in range(10):
    predict(images[i % len(images)][None])
  times = []
  for i in range(calls):
    start = time.perf_counter()
    np.asarray(predict(images[i % len(images)][None]))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(predict, images, repeats: int) -> float:
  """Median img/s of `repeats` calls on the whole batch (after one warm-up call)."""
  np.asarray(predict(images))
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    np.asarray(predict(images))
    rates.append(len(images) / (time.perf_counter() - start))
  return float(np.median(rates))


def measure(predict, images, calls: int, repeats: int) -> dict:
  p50, p99 = latency_ms(predict, images, calls)
  return {"latency_p50_ms": round(p50, 3), "latency_p99_ms": round(p99, 3),
          "img_per_s_1024": round(throughput(predict, images, repeats), 1)}


def bench_workdir(workdir, formats, calls: int, repeats: int, batch: int) -> list[dict]:
  model, variables, card = checkpoint.load_checkpoint(workdir)
  images = checkpoint_split(card, "test")[0][:batch]
  name = card["model"]["name"]
  serve = jax.jit(export.serving_function(model, variables))
  rows = [{"model": name, "runtime": "jax", "status": "ok", **measure(serve, images, calls, repeats)}]
  with tempfile.TemporaryDirectory() as folder:
    for fmt in formats:
      out = Path(folder) / fmt
      try:
        exported = export.export_checkpoint(workdir, fmt, out)
      except ExportError as e:
        rows.append({"model": name, "runtime": fmt, "status": f"cannot: {e}"})
        continue
      predict, _ = export.load_exported(out)
      rows.append({"model": name, "runtime": fmt, "status": "ok",
                   "max_abs_difference": max(exported["check"]["max_abs_difference"].values()),
                   **measure(predict, images, calls, repeats)})
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--formats", default=",".join(export.FORMATS))
  parser.add_argument("--calls", type=int, default=200, help="batch-1 calls per runtime (200)")
  parser.add_argument("--repeats", type=int, default=5, help="timed batch-1024 calls (5; median)")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--json", action="store_true", help="last line of stdout: one JSON list")
  args = parser.parse_args()
  runtime.configure()
  from flaxzoo.benchmarks.machine import machine_line
  print(machine_line())
  rows = []
  for workdir in args.workdirs:
    rows += bench_workdir(workdir, args.formats.split(","), args.calls, args.repeats, args.batch)
  print("| model | runtime | batch-1 p50 ms | p99 ms | batch-1024 img/s | x JAX | max abs diff |")
  print("|---|---|--:|--:|--:|--:|--:|")
  jax_rate = {}
  for row in rows:
    if row["runtime"] == "jax":
      jax_rate[row["model"]] = row["img_per_s_1024"]
    if row["status"] != "ok":
      print(f"| {row['model']} | {row['runtime']} | {row['status']} | | | | |")
      continue
    print(f"| {row['model']} | {row['runtime']} | {row['latency_p50_ms']:.3f} | "
          f"{row['latency_p99_ms']:.3f} | {row['img_per_s_1024']:,.0f} | "
          f"{row['img_per_s_1024'] / jax_rate[row['model']]:.2f} | "
          f"{row.get('max_abs_difference', 0):.1e} |")
  if args.json:
    print(json.dumps(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
