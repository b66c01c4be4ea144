"""`flaxzoo analyze`: the per-example gradients and the Hessian of a checkpoint (the transforms are
`training.analysis`), on its own dataset, written as JSON and pictures and summarised in lines."""

import json
import time
from pathlib import Path

import numpy as np

from flaxzoo.files import replace_atomically
from flaxzoo.training import analysis, checkpoint
from flaxzoo.training.config import ConfigError
from flaxzoo.training.inference import checkpoint_split


def _entries(indices, result, labels, names) -> list[dict]:
  return [{"index": int(i), "label": names[labels[i]], "predicted": names[result["predicted"][i]],
           "probability": float(result["probability"][i]), "loss": float(result["loss"][i]),
           "grad_norm": float(result["grad_norm"][i])} for i in indices]


def analyze_checkpoint(workdir, split: str = "test", top: int = 16, hessian_examples: int = 1000,
                       hessian_top: int = 5, lanczos_steps: int = 30, probes: int = 50, seed: int = 0,
                       step: int | None = None, data_dir: str | None = None,
                       manual_dir: str | None = None, save: bool = True) -> dict:
  """What `flaxzoo analyze` reports: per-example losses and gradient norms over `split` (the `top`
  largest of each, per-class means) and the Hessian of the training loss on `hessian_examples`
  training examples chosen with `seed` (top eigenvalues, trace). With `save`, writes
  WORKDIR/analysis-<split>.json and a picture of the top examples by gradient norm and by loss."""

  if top < 1:
    raise ConfigError(f"--top must be at least 1, got {top}")
  for flag, value in (("--hessian-examples", hessian_examples), ("--hessian-top", hessian_top),
                      ("--lanczos-steps", lanczos_steps), ("--probes", probes)):
    if value < 1:
      raise ConfigError(f"{flag} must be at least 1, got {value}")
  model, variables, card = checkpoint.load_checkpoint(workdir, step)
  names = list(card["dataset"]["class_names"])
  images, labels = checkpoint_split(card, split, data_dir, manual_dir)
  train_images, train_labels = (images, labels) if split == "train" else checkpoint_split(
      card, "train", data_dir, manual_dir)
  if hessian_examples > len(train_images):
    raise ConfigError(f"--hessian-examples {hessian_examples} is more than the {len(train_images)} "
                      f"training examples; give at most {len(train_images)}")

  start = time.perf_counter()
  result = analysis.per_example_grad_norms(model, variables, images, labels)
  per_example_seconds = time.perf_counter() - start
  per_class = {name: (float(result["grad_norm"][labels == c].mean()) if np.any(labels == c) else None)
               for c, name in enumerate(names)}
  report = {
      "workdir": str(workdir), "step": card["step"], "model": card["model"]["name"],
      "dataset": card["dataset"]["name"], "split": split, "num_examples": int(len(labels)),
      "per_example": {"seconds": per_example_seconds, "mean_loss": float(result["loss"].mean()),
                      "mean_grad_norm": float(result["grad_norm"].mean()),
                      "per_class_mean_grad_norm": per_class},
      "top_by_grad_norm": _entries(np.argsort(-result["grad_norm"], kind="stable")[:top], result, labels, names),
      "top_by_loss": _entries(np.argsort(-result["loss"], kind="stable")[:top], result, labels, names),
      "hessian": analysis.hessian_report(model, variables, train_images, train_labels, hessian_examples,
                                hessian_top, lanczos_steps, probes, seed),
  }
  if save:
    report["files"] = save_analysis(report, images, workdir)
  return report


def save_analysis(report: dict, images, workdir) -> list[str]:
  """analysis-<split>.json and the two grids of top examples, each written whole."""
  workdir, split = Path(workdir), report["split"]
  files = []
  for key, what in (("top_by_grad_norm", "grad-norm"), ("top_by_loss", "loss")):
    path = workdir / f"analysis-{split}-{what}.png"
    title = f"{report['model']} step {report['step']}: {split} examples with the largest {what.replace('-', ' ')}"
    replace_atomically(path, lambda tmp, key=key, title=title: save_examples_png(images, report[key], tmp, title))
    files.append(str(path))
  json_path = workdir / f"analysis-{split}.json"
  files.insert(0, str(json_path))
  replace_atomically(json_path, lambda tmp: tmp.write_text(json.dumps({**report, "files": files}, indent=1) + "\n"))
  return files


def save_examples_png(images, entries: list[dict], path, title: str) -> None:
  """A grid of the examples in `entries`, each titled 'label → prediction p=0.97'."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # only when a picture is drawn
  from matplotlib.figure import Figure
  columns = min(len(entries), 8)
  rows = -(-len(entries) // columns)
  figure = Figure(figsize=(1.6 * columns, 1.8 * rows + 0.4), layout="constrained")
  FigureCanvasAgg(figure)
  figure.suptitle(title, fontsize=9)
  for n, entry in enumerate(entries):
    axes = figure.add_subplot(rows, columns, n + 1)
    pixels = np.asarray(images[entry["index"]])
    axes.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
    axes.set_title(f"#{entry['index']}: {entry['label']} → {entry['predicted']}\np={entry['probability']:.2f}",
                   fontsize=8)
    axes.axis("off")
  try:
    figure.savefig(str(path), format="png")
  finally:
    figure.clear()


def summary_lines(report: dict) -> list[str]:
  per_example, hessian = report["per_example"], report["hessian"]
  hardest = ", ".join(f"#{e['index']} {e['label']}→{e['predicted']} p={e['probability']:.2f} "
                      f"(|g| {e['grad_norm']:.3g})" for e in report["top_by_grad_norm"][:5])
  by_class = sorted(((v, k) for k, v in per_example["per_class_mean_grad_norm"].items() if v is not None),
                    reverse=True)
  eigen = ", ".join(f"{v:.4g}" for v in hessian["top_eigenvalues"])
  return [
      f"{report['workdir']} step {report['step']}: per-example gradients of {report['num_examples']} "
      f"{report['split']} examples in {per_example['seconds']:.1f} s; mean loss {per_example['mean_loss']:.4f}, "
      f"mean |g| {per_example['mean_grad_norm']:.4g}",
      f"largest gradient norms: {hardest}",
      f"mean |g| by class, largest first: {', '.join(f'{k} {v:.3g}' for v, k in by_class[:5])}",
      f"Hessian of the training loss on {hessian['examples']} examples: top eigenvalues {eigen} "
      f"(Lanczos, {hessian['lanczos_steps']} steps, largest residual {max(hessian['residuals']):.2g}); "
      f"trace {hessian['trace']:.4g} ± {hessian['trace_std_error']:.2g} (Hutchinson, {hessian['probes']} "
      f"probes); {hessian['hvps']} Hessian-vector products in {hessian['seconds']:.1f} s",
  ]
