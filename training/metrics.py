"""Classification metrics computed on the host from a confusion matrix, and its picture.

Everything here is plain numpy on already-gathered labels and predictions. matplotlib is imported
only inside `save_confusion_png`, so importing this module (or the package) never pulls it in.
"""

import os

import numpy as np

# Above this many classes the per-cell counts would be unreadable, so the heatmap shows colour only.
MAX_ANNOTATED_CLASSES = 20
# Tick labels longer than this are rotated so neighbouring names do not overlap.
MAX_UNROTATED_NAME = 3


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """An int64 (num_classes, num_classes) matrix: rows are true classes, columns predicted ones."""
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels and predictions differ in length: {labels.size} vs "
                     f"{predictions.size}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  _check_class_ids("labels", labels, num_classes)
  _check_class_ids("predictions", predictions, num_classes)
  # One flat index per (true, predicted) pair; bincount then counts each cell in a single pass.
  flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
  counts = np.bincount(flat, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def _check_class_ids(what: str, ids: np.ndarray, num_classes: int) -> None:
  # Negative or too-large ids would otherwise land silently in another class's cell.
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{what} must be integer class ids, got dtype {ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
    raise ValueError(f"{what} must lie in [0, {num_classes}), got values in "
                     f"[{ids.min()}, {ids.max()}]")


def classification_metrics(confusion, class_names) -> dict:
  """Accuracy, macro-F1 and per-class figures of a confusion matrix, as a JSON-ready dict.

  Values that are undefined (recall of a class with no examples, precision of a class never
  predicted, anything of an empty matrix) are None rather than NaN, so `json.dumps` accepts them.
  """
  confusion = _checked_confusion(confusion, class_names)
  names = [str(name) for name in class_names]
  per_class = [_class_metrics(confusion, index, name) for index, name in enumerate(names)]
  total = int(confusion.sum())
  return {
      "accuracy": _ratio(int(np.trace(confusion)), total),
      "macro_f1": _macro_f1(confusion, per_class),
      "per_class_accuracy": {entry["class"]: entry["accuracy"] for entry in per_class},
      "per_class": per_class,
      "confusion_matrix": confusion.tolist(),
      "class_names": names,
      "num_examples": total,
  }


def _checked_confusion(confusion, class_names) -> np.ndarray:
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion matrix must be square, got shape {confusion.shape}")
  if confusion.shape[0] != len(class_names):
    raise ValueError(f"confusion matrix has {confusion.shape[0]} classes but "
                     f"{len(class_names)} class names were given")
  names = [str(name) for name in class_names]
  if len(set(names)) != len(names):
    # per_class_accuracy is keyed by name: a repeated name would silently hide a class.
    raise ValueError(f"class names must be unique, got {names}")
  if confusion.size and (not np.issubdtype(confusion.dtype, np.integer) or confusion.min() < 0):
    raise ValueError("confusion matrix must hold non-negative integer counts")
  return confusion.astype(np.int64)


def _class_metrics(confusion: np.ndarray, index: int, name: str) -> dict:
  """Support, recall ("accuracy"), precision and F1 of one class."""
  true_positives = int(confusion[index, index])
  support = int(confusion[index, :].sum())
  predicted = int(confusion[:, index].sum())
  # 2PR / (P + R) simplified to 2TP / (support + predicted): the same where both are defined,
  # and 0 (sklearn's zero_division=0) where precision or recall is undefined or both are 0.
  f1 = 2 * true_positives / (support + predicted) if support + predicted else 0.0
  return {
      "class": name,
      "support": support,
      "accuracy": _ratio(true_positives, support),
      "precision": _ratio(true_positives, predicted),
      "f1": float(f1),
  }


def _macro_f1(confusion: np.ndarray, per_class: list[dict]) -> float | None:
  """Mean F1 over the classes that occur among the true labels or the predictions."""
  # Like sklearn's f1_score(average="macro"): a class absent from both never counts, while one
  # predicted but never true counts with F1 0.
  present = (confusion.sum(axis=1) > 0) | (confusion.sum(axis=0) > 0)
  scores = [entry["f1"] for entry, keep in zip(per_class, present) if keep]
  return float(np.mean(scores)) if scores else None


def _ratio(numerator: int, denominator: int) -> float | None:
  return numerator / denominator if denominator else None


def save_confusion_png(confusion, class_names, path, title: str) -> None:
  """Writes a heatmap of the row-normalised confusion matrix, with counts in the cells, as PNG."""
  # Imported here so that training never loads matplotlib unless a picture is asked for. Figure
  # with FigureCanvasAgg renders with Agg directly, leaving pyplot's global backend untouched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  confusion = _checked_confusion(confusion, class_names)
  names = [str(name) for name in class_names]
  if not names:
    raise ValueError("cannot draw a confusion matrix with no classes")
  normalised = _row_normalised(confusion)
  side = max(4.0, 0.5 * len(names))
  # A little extra width for the colour bar keeps the matrix cells roughly square.
  figure = Figure(figsize=(side * 1.2, side), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  figure.colorbar(image, ax=axes, label="share of the true class")
  _label_axes(axes, names, title)
  if len(names) <= MAX_ANNOTATED_CLASSES:
    _annotate_counts(axes, confusion, normalised)
  try:
    figure.savefig(os.fspath(path), format="png")
  finally:
    # Not registered with pyplot, so nothing global holds it; clearing frees artists promptly.
    figure.clear()


def _row_normalised(confusion: np.ndarray) -> np.ndarray:
  """Each row divided by its sum; rows of classes with no examples stay all zero."""
  supports = confusion.sum(axis=1, keepdims=True)
  return np.divide(confusion, supports, out=np.zeros(confusion.shape, dtype=np.float64),
                   where=supports > 0)


def _label_axes(axes, names: list[str], title: str) -> None:
  ticks = np.arange(len(names))
  rotate = any(len(name) > MAX_UNROTATED_NAME for name in names)
  axes.set_xticks(ticks, labels=names, rotation=45 if rotate else 0,
                  ha="right" if rotate else "center", rotation_mode="anchor")
  axes.set_yticks(ticks, labels=names)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  axes.set_title(title)


def _annotate_counts(axes, confusion: np.ndarray, normalised: np.ndarray) -> None:
  """The raw count in each cell, white on dark cells and black on light ones to stay legible."""
  size = confusion.shape[0]
  fontsize = 10 if size <= 10 else 7
  for row in range(size):
    for column in range(size):
      colour = "white" if normalised[row, column] > 0.5 else "black"
      axes.text(column, row, str(confusion[row, column]), ha="center", va="center",
                color=colour, fontsize=fontsize)
