"""Fashion-MNIST test accuracy: the MNIST ConvNet fine-tuned, vs the same model trained from
scratch, vs fine-tuning only its head (frozen backbone) — same epochs and settings for all three.

  FLAXZOO_MANUAL_DIR=../shared/data .venv/bin/python scripts/compare_finetune.py

The source is the README's main run (checkpoints/mnist-convnet; trained first if missing). Runs go
to checkpoints/finetune-comparison/<name>; a finished run is not trained again (its card's numbers
are reported, without a time). Prints the machine and a Markdown table.
"""

import argparse
import sys
import time
from pathlib import Path

from flaxzoo import runtime, training
from flaxzoo.benchmarks.machine import machine_line
from flaxzoo.training import checkpoint
from flaxzoo.training.config import Config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", default="checkpoints/mnist-convnet")
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--out", type=Path, default=Path("checkpoints/finetune-comparison"))
  parser.add_argument("--head-learning-rate", type=float, default=None,
                      help="for the frozen-backbone run (default: the source's learning rate)")
  args = parser.parse_args(argv)
  runtime.configure()  # process-wide settings, before JAX computes

  print(f"machine: {machine_line()}", flush=True)
  training.train_and_evaluate(Config(), args.source)  # returns at once when already trained
  source = checkpoint.read_card(args.source)
  base = Config(**{k: v for k, v in source["config"].items() if k in Config.__dataclass_fields__})
  runs = {
      "from scratch": lambda workdir: training.train_and_evaluate(
          Config(model=base.model, model_kwargs=base.model_kwargs, dataset=args.dataset,
                 epochs=base.epochs, batch_size=base.batch_size, learning_rate=base.learning_rate,
                 seed=base.seed), workdir),
      "fine-tuned (all layers)": lambda workdir: training.finetune(
          args.source, args.dataset, workdir),
      "fine-tuned head only (frozen backbone)": lambda workdir: training.finetune(
          args.source, args.dataset, workdir, freeze="backbone",
          head_learning_rate=args.head_learning_rate),
  }
  rows = []
  for name, run in runs.items():
    workdir = args.out / name.split(" (")[0].replace(" ", "-")
    trained_before = bool(checkpoint.saved_steps(workdir))
    start = time.perf_counter()
    run(workdir)
    seconds = time.perf_counter() - start
    test = checkpoint.read_card(workdir)["metrics"]["test"]
    rows.append((name, test["accuracy"], test.get("macro_f1"),
                 "" if trained_before else f"{seconds:.0f} s", workdir))

  print(f"\n{args.dataset}, {base.epochs} epochs each, batch {base.batch_size}, peak learning "
        f"rate {base.learning_rate}; source {args.source} step {source['step']} "
        f"(MNIST test accuracy {source['metrics']['test']['accuracy']:.2%})\n")
  print("| run | test accuracy | macro-F1 | wall time | workdir |")
  print("|---|---|---|---|---|")
  for name, accuracy, macro_f1, seconds, workdir in rows:
    f1 = f"{macro_f1:.4f}" if macro_f1 is not None else "-"
    print(f"| {name} | {accuracy:.2%} | {f1} | {seconds} | {workdir} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
