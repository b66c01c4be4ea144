"""Trains every registered model on MNIST with its default config and writes the results table;
with `--recipes`, trains named recipes at several seeds and writes their table.

  FLAXZOO_MANUAL_DIR=../shared/data .venv/bin/python scripts/make_results.py
  FLAXZOO_MANUAL_DIR=../shared/data .venv/bin/python scripts/make_results.py \
      --recipes mnist_convnet,fashion_convnet --seeds 0,1,2

For each model: `flaxzoo train --model NAME` (its registered defaults) into
checkpoints/results/NAME (a finished run is not trained again), a full evaluation of the final
checkpoint, the training time and img/s from its metrics.jsonl, and the median batch-1 latency of
the jitted eval forward pass. Writes results/mnist.csv and docs/results.md, with the machine.
`--train-examples/--test-examples/--epochs` make a quick run on a slice (CI does this, into a
temporary folder); such tables say so in their heading.

Recipes (`--recipes NAME,...`, config files in configs/): `flaxzoo train --config NAME --seed S`
for each seed into checkpoints/results/NAME/seed-S, a full evaluation of each final checkpoint,
the run's wall time (data loading, compilation, every epoch's evaluation and checkpoint included);
rows (mean, sample standard deviation, each seed's accuracy) replace that recipe's rows in
results/recipes.csv, and docs/results.md's recipe section is written from that file: per dataset,
the recipes' table, then each model's most accurate recipe beside its most accurate one in at most
60 s (the "fast" column). Each part of docs/results.md is written by its own mode; the other part
is kept.
"""

import argparse
import csv
import json
import statistics
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
from flaxzoo.training.configs import default_config, named_config
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


RECIPE_COLUMNS = ["recipe", "dataset", "model", "params", "epochs", "seeds", "accuracies",
                  "mean_accuracy", "std_accuracy", "mean_macro_f1", "mean_wall_seconds", "machine",
                  "command", "tta", "single_view_accuracies"]
RECIPES_MARKER = "<!-- Recipes: written by scripts/make_results.py --recipes; kept by the other mode -->"
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# Published figures each dataset's table is read against (the sources named in the text).
PUBLISHED = {
    "mnist": "Published test accuracies on MNIST: LeNet-5 99.05 % without and 99.20 % with "
             "distorted training images (LeCun et al., 1998, 0.95 % and 0.8 % error); a committee "
             "of 35 CNNs 99.77 % (Ciresan et al., 2012); DropConnect 99.79 % (Wan et al., 2013).",
    "fashion_mnist": "Published test accuracies on Fashion-MNIST, from the benchmark table in "
                     "zalandoresearch/fashion-mnist's README (submitted results, untested by its "
                     "maintainers): networks of 2 conv layers 87.6-92.5 %, 2 conv layers and 3 "
                     "dense (1.8M parameters) 93.2 %, VGG16 93.5 %, a capsule network 93.6 %, "
                     "ResNet18 94.9 %, MobileNet 95.0 %, WRN-28-10 with random erasing 96.3 %; "
                     "human labellers 83.5 %.",
}


def seed_run(recipe: str, seed: int, workdir: Path, overrides: dict, machine: str) -> dict:
  """One recipe at one seed: trained (unless finished before), evaluated; its wall time and the
  machine it trained on (kept in WORKDIR/wall_seconds.json for later invocations)."""
  config = named_config(recipe, seed=seed, **overrides)
  wall_file = workdir / "wall_seconds.json"
  if not wall_file.exists() or not checkpoint.saved_steps(workdir):
    start = time.perf_counter()
    training.train_and_evaluate(config, workdir)
    wall_file.write_text(json.dumps({"wall_seconds": round(time.perf_counter() - start, 1),
                                     "machine": machine}))
  else:
    training.train_and_evaluate(config, workdir)  # says it is finished; trains what is missing
  result = training.evaluate_checkpoint(workdir, data_dir=config.data_dir, tta=config.tta)
  single_view = result if config.tta == "none" else training.evaluate_checkpoint(
      workdir, data_dir=config.data_dir, tta="none", save=False)
  timing = json.loads(wall_file.read_text())
  return {"config": config, "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
          "single_view_accuracy": single_view["accuracy"],
          "wall_seconds": timing["wall_seconds"],
          "machine": timing.get("machine", "machine not recorded")}  # runs timed before it was


def recipe_row(recipe: str, seeds: list[int], root: Path, overrides: dict, machine: str) -> dict:
  runs = [seed_run(recipe, seed, root / recipe / f"seed-{seed}", overrides, machine) for seed in seeds]
  config = runs[0]["config"]
  accuracies = [r["accuracy"] for r in runs]
  model = models.create_model(config.model, **config.model_kwargs)
  extra = "".join(f" --set {k}={json.dumps(v)}" for k, v in overrides.items() if k != "data_dir")
  return {"recipe": recipe, "dataset": config.dataset, "model": config.model,
          "params": profile.param_count(model), "epochs": config.epochs,
          "seeds": " ".join(map(str, seeds)), "accuracies": " ".join(f"{a:.4f}" for a in accuracies),
          "mean_accuracy": round(statistics.mean(accuracies), 5),
          "std_accuracy": round(statistics.stdev(accuracies), 5) if len(accuracies) > 1 else 0.0,
          "mean_macro_f1": round(statistics.mean(r["macro_f1"] for r in runs), 4),
          "mean_wall_seconds": round(statistics.mean(r["wall_seconds"] for r in runs), 1),
          "machine": "; ".join(sorted({r["machine"] for r in runs})),
          "command": f"flaxzoo train --config {recipe} --seed S{extra}", "tta": config.tta,
          "single_view_accuracies": " ".join(f"{r['single_view_accuracy']:.4f}" for r in runs)}


def recipes_markdown(rows: list[dict]) -> str:
  lines = [RECIPES_MARKER, "", "## Recipes", "",
           "Written by `scripts/make_results.py --recipes NAME,... --seeds 0,1,2` from "
           "results/recipes.csv: each recipe (a config file in `configs/`) trained once per seed; "
           "accuracy is the full test split's, of the weights eval reads (the EMA's where the "
           "recipe keeps one), with the recipe's test-time augmentation where it has one (TTA: "
           "the images alone in brackets); ± is the sample standard deviation over the seeds; wall time is "
           "one run's, start to end (data loading, compilation, each epoch's evaluation and "
           "checkpoint included), averaged over the seeds."]
  for dataset in sorted({r["dataset"] for r in rows}, key=lambda d: d != "mnist"):
    ours = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: -float(r["mean_accuracy"]))
    lines += ["", f"### {DATASET_TITLES.get(dataset, dataset)}", "",
              "| recipe | model | params | epochs | seeds | test accuracy | each seed | macro-F1 | "
              "wall time per run | command |", "|---|---|--:|--:|--:|--:|---|--:|--:|---|"]
    for r in ours:
      lines.append(f"| {r['recipe']} | {r['model']} | {int(r['params']):,} | {r['epochs']} | "
                   f"{r['seeds']} | {float(r['mean_accuracy']):.2%} ± {float(r['std_accuracy']):.2%}"
                   f"{single_view_note(r)} | "
                   f"{' '.join(f'{float(a):.2%}' for a in r['accuracies'].split())} | "
                   f"{float(r['mean_macro_f1']):.4f} | {wall_time(r)} | `{r['command']}` |")
    lines += ["", "Machines: " + "; ".join(sorted({r["machine"] for r in ours})) + ".", ""]
    lines += best_by_model_markdown(ours)
    if dataset in PUBLISHED:
      best = ours[0]
      lines += [f"{PUBLISHED[dataset]} Here the best recipe, {best['recipe']} ({best['model']}, "
                f"{int(best['params']):,} parameters), averages {float(best['mean_accuracy']):.2%}"
                f"{single_view_note(best)} over seeds {best['seeds']}."]
  return "\n".join(lines)


# The "fast" column: each model's best in at most a minute of training, counted as the run's whole
# wall time (start-up, compilation and evaluations included), which is more than its training.
FAST_SECONDS = 60


def best_by_model_markdown(by_accuracy: list[dict]) -> list[str]:
  """Per model: its most accurate recipe, and its most accurate one whose runs took <= FAST_SECONDS
  (`by_accuracy`: one dataset's rows, most accurate first)."""
  lines = [f"Each model's most accurate recipe, and its most accurate in at most {FAST_SECONDS} s "
           "(a run's mean wall time, start to end):", "",
           f"| model | best recipe | test accuracy | wall time | best in ≤ {FAST_SECONDS} s | "
           "test accuracy | wall time |", "|---|---|--:|--:|---|--:|--:|"]
  for model in dict.fromkeys(r["model"] for r in by_accuracy):
    best = next(r for r in by_accuracy if r["model"] == model)
    fast = next((r for r in by_accuracy if r["model"] == model
                 and float(r["mean_wall_seconds"]) <= FAST_SECONDS), None)
    fast_cells = (f"{fast['recipe']} | {mean_accuracy(fast)} | {wall_time(fast)}"
                  if fast else "none | – | –")
    lines.append(f"| {model} | {best['recipe']} | {mean_accuracy(best)} | {wall_time(best)} | "
                 f"{fast_cells} |")
  return lines + [""]


def mean_accuracy(row: dict) -> str:
  tta = row.get("tta", "none") or "none"
  return f"{float(row['mean_accuracy']):.2%}" + ("" if tta == "none" else f" ({tta} TTA)")


def wall_time(row: dict) -> str:
  seconds = float(row["mean_wall_seconds"])
  return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def single_view_note(row: dict) -> str:
  """For a recipe evaluated with test-time augmentation: what it does, and the mean accuracy of
  the same checkpoints on the images alone."""
  if row.get("tta", "none") in ("none", "", None):
    return ""
  single = [float(a) for a in row["single_view_accuracies"].split()]
  spread = statistics.stdev(single) if len(single) > 1 else 0.0
  return f" ({row['tta']} TTA; the images alone {statistics.mean(single):.2%} ± {spread:.2%})"


def read_rows(path: Path) -> list[dict]:
  return list(csv.DictReader(path.open())) if path.exists() else []


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def write_markdown(path: Path, zoo_part: str | None = None, recipes_part: str | None = None) -> None:
  """docs/results.md: the zoo table, then the recipes' section; a part not given is kept."""
  old = path.read_text() if path.exists() else ""
  old_zoo, _, old_recipes = old.partition(RECIPES_MARKER)
  zoo = zoo_part if zoo_part is not None else old_zoo.rstrip() + "\n"
  recipes = recipes_part if recipes_part is not None else (
      RECIPES_MARKER + old_recipes if old_recipes else "")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(zoo.rstrip() + "\n" + ("\n" + recipes.rstrip() + "\n" if recipes else ""))


def main_recipes(args, overrides: dict) -> int:
  recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  seeds = [int(s) for s in args.seeds.split(",")]
  machine = machine_line()
  print(f"machine: {machine}", flush=True)
  rows = [r for r in read_rows(args.recipes_csv) if r["recipe"] not in recipes]
  for recipe in recipes:
    row = recipe_row(recipe, seeds, args.workdir_root, overrides, machine)
    print(json.dumps(row), flush=True)
    rows.append(row)
  write_rows(args.recipes_csv, RECIPE_COLUMNS, rows)
  write_markdown(args.markdown, recipes_part=recipes_markdown(rows))
  print(f"wrote {args.recipes_csv} and {args.markdown}")
  return 0


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
  parser.add_argument("--recipes", help="comma-separated recipe configs (configs/NAME.toml) to "
                      "train at each of --seeds, instead of the zoo table")
  parser.add_argument("--seeds", default="0,1,2", help="the recipes' seeds (0,1,2)")
  parser.add_argument("--recipes-csv", type=Path, default=Path("results/recipes.csv"))
  args = parser.parse_args(argv)
  runtime.configure()  # process-wide settings, before JAX computes

  overrides = {k: v for k, v in (("train_examples", args.train_examples),
                                 ("test_examples", args.test_examples),
                                 ("epochs", args.epochs)) if v}
  if args.data_dir:  # where data are, not how the models train: kept out of the commands shown
    overrides["data_dir"] = args.data_dir
  if args.recipes:
    return main_recipes(args, overrides)
  names = sorted({n for pattern in (args.models or "*").split(",")
                  for n in models.list_models(pattern.strip())})
  if not names:
    print(f"make_results: no registered model matches {args.models!r}; models: "
          f"{', '.join(models.list_models())}", file=sys.stderr)
    return 2
  machine = machine_line()
  print(f"machine: {machine}", flush=True)
  rows = []
  for name in names:
    row = result_row(name, args.workdir_root / name, overrides, args.hessian_examples)
    print(json.dumps(row), flush=True)
    rows.append(row)

  write_rows(args.csv, COLUMNS, rows)
  quick = {k: v for k, v in overrides.items() if k != "data_dir"}
  heading = "MNIST results" + (f" (quick run: {quick})" if quick else "")
  write_markdown(args.markdown, zoo_part=markdown(rows, machine, heading).replace(
      "HESSIAN_EXAMPLES", f"{args.hessian_examples:,}"))
  print(f"wrote {args.csv} and {args.markdown}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
