"""The training-curve picture: loss and accuracy per epoch, train and test, from metrics.jsonl."""

import json
from pathlib import Path

import numpy as np

from flaxzoo.files import replace_atomically


def epoch_curves(records: list[dict]) -> dict:
  """Per-epoch series from metrics.jsonl records: train values are the step-weighted means of
  that epoch's train records; test values are the epoch-end evaluation."""
  epochs = sorted({r["epoch"] for r in records if r.get("split") == "test"})
  curves = {"epoch": epochs}
  for split in ("train", "test"):
    for metric in ("loss", "accuracy"):
      values = []
      for epoch in epochs:
        rows = [r for r in records if r.get("split") == split and r["epoch"] == epoch]
        weights = [r.get("num_steps", 1) for r in rows]
        values.append(float(np.average([r[metric] for r in rows], weights=weights))
                      if rows else float("nan"))
      curves[f"{split}_{metric}"] = values
  return curves


def save_training_curves(metrics_path, png_path, title: str) -> None:
  """Draws `png_path` from the records in `metrics_path`, replacing any older picture whole."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # only when a picture is drawn
  from matplotlib.figure import Figure
  records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
  curves = epoch_curves(records)
  figure = Figure(figsize=(9, 3.6), layout="constrained")
  FigureCanvasAgg(figure)
  figure.suptitle(title)
  for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
    for split, style in (("train", "o-"), ("test", "s-")):
      axes.plot(curves["epoch"], curves[f"{split}_{metric}"], style, label=split)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_xticks(curves["epoch"])
    axes.grid(alpha=0.3)
    axes.legend()
  try:
    replace_atomically(png_path, lambda tmp: figure.savefig(tmp, format="png"))
  finally:
    figure.clear()
