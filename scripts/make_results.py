"""Trains every registered model on MNIST with its default config and writes the results table.

  FLAXZOO_MANUAL_DIR=../shared/data .venv/bin/python scripts/make_results.py

For each model: `flaxzoo train --model NAME` (its registered defaults) into
checkpoints/results/NAME (a finished run is not trained again), a full evaluation of the final
checkpoint, the training time and img/s from its metrics.jsonl, and the median batch-1 latency of
the jitted eval forward pass. Writes results/mnist.csv and docs/results.md, with the machine.
`--train-examples/--test-examples/--epochs` make a quick run on a slice (CI does this, into a
temporary folder); such tables say so in their heading.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from flaxzoo import (
  models,
  runtime,
  training,
)
from flaxzoo.benchmarks.machine import machine_line
from flaxzoo.models import profile
from flaxzoo.training import analysis, checkpoint
from flaxzoo.training.configs import default_config
from flaxzoo.training.evaluation import predict_step
from flaxzoo.training.inference import checkpoint_split

COLUMNS = ["model", "params", "mflops_per_image", "epochs", "test_accuracy", "macro_f1",
           "train_seconds", "train_img_per_s", "latency_ms_batch1", "hessian_top_eigenvalue",
           "hessian_trace", "hessian_trace_std_error", "command"]


def training_time(metrics_path: Path, batch_size: int) -> tuple[float, float]:
  """(seconds, img/s) of the training steps recorded in metrics.jsonl (evaluation excluded)."""
  records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
  train = [r for r in records if r["split"] == "train"]
  images = sum(r["num_steps"] * batch_size for r in train)
  seconds = sum(r["num_steps"] * batch_size / r["img_per_s"] for r in train)
  return seconds, images / seconds


def batch1_latency_ms(model, variables, input_shape, repeats: int = 200) -> float:
  """Median wall time of one jitted eval forward pass on a single image, after warm-up."""
  image = np.zeros((1, *input_shape), np.uint8)
  predict_step(model, variables, image).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    predict_step(model, variables, image).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def command(name: str, overrides: dict) -> str:
  extra = "".join(f" --set {k}={json.dumps(v)}" for k, v in overrides.items() if k != "data_dir")
  return f"flaxzoo train --model {name}{extra}"


def result_row(name: str, workdir: Path, overrides: dict, hessian_examples: int) -> dict:
  config = default_config(name, **overrides)
  training.train_and_evaluate(config, workdir)
  result = training.evaluate_checkpoint(workdir)
  model, variables, card = checkpoint.load_checkpoint(workdir)
  seconds, img_per_s = training_time(workdir / "metrics.jsonl", config.batch_size)
  train_images, train_labels = checkpoint_split(card, "train")
  hessian = analysis.hessian_report(model, variables, train_images, train_labels,
                                    min(hessian_examples, len(train_labels)), top=1)
  return {"model": name, "params": profile.param_count(model),
          "mflops_per_image": round(profile.flops_per_image(model) / 1e6, 2),
          "epochs": config.epochs, "test_accuracy": round(result["accuracy"], 4),
          "macro_f1": round(result["macro_f1"], 4), "train_seconds": round(seconds, 1),
          "train_img_per_s": round(img_per_s), "latency_ms_batch1":
          round(batch1_latency_ms(model, variables, card["input_shape"]), 3),
          "hessian_top_eigenvalue": round(hessian["top_eigenvalues"][0], 4),
          "hessian_trace": round(hessian["trace"], 3),
          "hessian_trace_std_error": round(hessian["trace_std_error"], 3),
          "command": command(name, overrides)}


def markdown(rows: list[dict], machine: str, heading: str) -> str:
  lines = [f"# {heading}", "",
           "Written by `scripts/make_results.py` (see its docstring); every number below is what "
           "that script printed in the run that wrote this file.", "",
           f"Machine: {machine}. Backend: {jax.default_backend()}, jax {jax.__version__}.", "",
           "| model | params | MFLOPs/img | epochs | test accuracy | macro-F1 | train time | "
           "train img/s | batch-1 latency | Hessian top eigenvalue | Hessian trace | command |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['params']:,} | {r['mflops_per_image']} | {r['epochs']} | "
                 f"{r['test_accuracy']:.2%} | {r['macro_f1']:.4f} | {r['train_seconds']:.0f} s | "
                 f"{r['train_img_per_s']:,} | {r['latency_ms_batch1']:.2f} ms | "
                 f"{r['hessian_top_eigenvalue']:.3f} | {r['hessian_trace']:.2f} ± "
                 f"{r['hessian_trace_std_error']:.2f} | `{r['command']}` |")
  lines += ["", "MFLOPs/img: XLA's cost analysis of the compiled eval forward pass at batch 1 "
            "(`flaxzoo models`). Train time and img/s: the training steps only, from each run's "
            "metrics.jsonl (the first window includes jit compilation). Latency: median of 200 "
            "jitted single-image forward passes, after warm-up. Hessian: of the eval-mode training "
            "loss at the final checkpoint, on HESSIAN_EXAMPLES training examples chosen with seed 0, "
            "never formed: its largest eigenvalue by 30 Lanczos steps and its trace by Hutchinson's "
            "estimator with 50 probes (± one standard error), on Hessian-vector products "
            "(`flaxzoo.training.analysis`, as `flaxzoo analyze` reports them). "
            "A run already finished in the workdir root is not trained again: its row's training "
            "figures come from its metrics.jsonl, possibly from an earlier invocation of this "
            "script; accuracy, macro-F1 and latency are always measured by this one.", "",
            "What the Hessian columns say, and the ConvNet's five hardest test images: "
            "[analysis.md](analysis.md).", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", help="comma-separated names or wildcards (default: all)")
  parser.add_argument("--workdir-root", type=Path, default=Path("checkpoints/results"))
  parser.add_argument("--csv", type=Path, default=Path("results/mnist.csv"))
  parser.add_argument("--markdown", type=Path, default=Path("docs/results.md"))
  parser.add_argument("--train-examples", type=int, help="quick run: first N training images")
  parser.add_argument("--test-examples", type=int, help="quick run: first N test images")
  parser.add_argument("--epochs", type=int, help="quick run: epochs for every model")
  parser.add_argument("--data-dir", help="tfds data dir (default tfds's own)")
  parser.add_argument("--hessian-examples", type=int, default=1000,
                      help="training examples of each model's Hessian (1000)")
  args = parser.parse_args(argv)
  runtime.configure()  # process-wide settings, before JAX computes

  names = sorted({n for pattern in (args.models or "*").split(",")
                  for n in models.list_models(pattern.strip())})
  if not names:
    print(f"make_results: no registered model matches {args.models!r}; models: "
          f"{', '.join(models.list_models())}", file=sys.stderr)
    return 2
  overrides = {k: v for k, v in (("train_examples", args.train_examples),
                                 ("test_examples", args.test_examples),
                                 ("epochs", args.epochs)) if v}
  if args.data_dir:  # where data are, not how the models train: kept out of the commands shown
    overrides["data_dir"] = args.data_dir
  machine = machine_line()
  print(f"machine: {machine}", flush=True)
  rows = []
  for name in names:
    row = result_row(name, args.workdir_root / name, overrides, args.hessian_examples)
    print(json.dumps(row), flush=True)
    rows.append(row)

  args.csv.parent.mkdir(parents=True, exist_ok=True)
  with open(args.csv, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  quick = {k: v for k, v in overrides.items() if k != "data_dir"}
  heading = "MNIST results" + (f" (quick run: {quick})" if quick else "")
  args.markdown.parent.mkdir(parents=True, exist_ok=True)
  args.markdown.write_text(markdown(rows, machine, heading).replace(
      "HESSIAN_EXAMPLES", f"{args.hessian_examples:,}"))
  print(f"wrote {args.csv} and {args.markdown}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
