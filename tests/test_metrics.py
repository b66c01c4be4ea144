import json
import subprocess
import sys

import numpy as np
import pytest

from flaxzoo.training import metrics

# Hand example: 3 classes, 6 examples.
LABELS = [0, 0, 0, 1, 1, 2]
PREDICTIONS = [0, 0, 1, 1, 2, 2]
NAMES = ["cat", "dog", "bird"]


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
  confusion = metrics.confusion_matrix(LABELS, PREDICTIONS, 3)
  assert confusion.dtype == np.int64
  assert confusion.tolist() == [[2, 1, 0],
                                [0, 1, 1],
                                [0, 0, 1]]


def test_confusion_matrix_rejects_out_of_range_and_mismatched_inputs():
  with pytest.raises(ValueError, match="labels"):
    metrics.confusion_matrix([0, 3], [0, 0], 3)
  with pytest.raises(ValueError, match="predictions"):
    metrics.confusion_matrix([0, 0], [0, -1], 3)
  with pytest.raises(ValueError, match="length"):
    metrics.confusion_matrix([0, 1], [0], 3)
  assert metrics.confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


def test_hand_computed_example():
  result = metrics.classification_metrics(metrics.confusion_matrix(LABELS, PREDICTIONS, 3), NAMES)
  recall = [2 / 3, 1 / 2, 1]
  precision = [1, 1 / 2, 1 / 2]
  # F1 = 2PR / (P + R): cat 2*(2/3)/(5/3) = 4/5, dog 2*(1/4)/1 = 1/2, bird 2*(1/2)/(3/2) = 2/3.
  f1 = [4 / 5, 1 / 2, 2 / 3]
  assert result["accuracy"] == pytest.approx(4 / 6)
  assert result["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
  assert result["per_class_accuracy"] == pytest.approx(dict(zip(NAMES, recall)))
  assert [c["class"] for c in result["per_class"]] == NAMES
  assert [c["support"] for c in result["per_class"]] == [3, 2, 1]
  assert [c["accuracy"] for c in result["per_class"]] == pytest.approx(recall)
  assert [c["precision"] for c in result["per_class"]] == pytest.approx(precision)
  assert [c["f1"] for c in result["per_class"]] == pytest.approx(f1)
  assert result["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
  assert result["class_names"] == NAMES
  assert result["num_examples"] == 6


def test_absent_class_is_left_out_of_macro_f1():
  # Class 2 has no examples and is never predicted.
  confusion = metrics.confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 3)
  result = metrics.classification_metrics(confusion, ["a", "b", "c"])
  absent = result["per_class"][2]
  assert absent == {"class": "c", "support": 0, "accuracy": None, "precision": None, "f1": 0.0}
  assert result["per_class_accuracy"]["c"] is None
  f1_a = 2 * 1 * (1 / 2) / (1 + 1 / 2)  # precision 1, recall 1/2
  f1_b = 2 * (2 / 3) * 1 / (2 / 3 + 1)  # precision 2/3, recall 1
  assert result["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


def test_class_predicted_but_never_true_counts_with_f1_zero():
  # Class 2 is predicted once but never the true class.
  confusion = metrics.confusion_matrix([0, 0, 1, 1], [0, 2, 1, 1], 3)
  result = metrics.classification_metrics(confusion, ["a", "b", "c"])
  spurious = result["per_class"][2]
  assert spurious["support"] == 0
  assert spurious["accuracy"] is None
  assert spurious["precision"] == 0.0
  assert spurious["f1"] == 0.0
  f1_a = 2 * 1 * (1 / 2) / (1 + 1 / 2)  # precision 1, recall 1/2
  f1_b = 1.0  # precision 1, recall 1
  assert result["macro_f1"] == pytest.approx((f1_a + f1_b + 0.0) / 3)


def test_result_is_strict_json_with_plain_python_types():
  confusion = metrics.confusion_matrix([0, 0, 1], [0, 2, 1], 4)  # class 3 absent, 2 spurious
  result = metrics.classification_metrics(confusion, ["a", "b", "c", "d"])
  assert json.loads(json.dumps(result, allow_nan=False)) == result
  assert type(result["num_examples"]) is int
  assert type(result["accuracy"]) is float
  assert all(type(v) is int for row in result["confusion_matrix"] for v in row)
  assert all(type(c["support"]) is int for c in result["per_class"])


def test_empty_matrix_has_undefined_accuracy_and_macro_f1():
  result = metrics.classification_metrics(np.zeros((2, 2), np.int64), ["a", "b"])
  assert result["accuracy"] is None
  assert result["macro_f1"] is None
  json.dumps(result, allow_nan=False)


def test_mismatched_or_malformed_input_raises():
  confusion = metrics.confusion_matrix(LABELS, PREDICTIONS, 3)
  with pytest.raises(ValueError, match="class names"):
    metrics.classification_metrics(confusion, ["a", "b"])
  with pytest.raises(ValueError, match="square"):
    metrics.classification_metrics(np.zeros((2, 3), np.int64), ["a", "b"])
  with pytest.raises(ValueError, match="unique"):
    metrics.classification_metrics(confusion, ["a", "a", "b"])


@pytest.mark.parametrize("names", [NAMES, [str(i) for i in range(25)]])
def test_save_confusion_png_writes_a_png(tmp_path, names):
  from PIL import Image
  rng = np.random.default_rng(0)
  n = len(names)
  labels = rng.integers(0, n - 1, size=200)  # last class never true: its row stays zero
  predictions = rng.integers(0, n, size=200)
  path = tmp_path / "confusion.png"
  metrics.save_confusion_png(metrics.confusion_matrix(labels, predictions, n), names, path,
                             title="test")
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.mode in ("RGB", "RGBA")
    width, height = image.size
  assert width > 0 and height > 0
  if n == 25:
    assert height >= 0.5 * 25 * 72  # the figure grows with the class count (>= 72 dpi)


def test_save_confusion_png_rejects_mismatched_names(tmp_path):
  with pytest.raises(ValueError):
    metrics.save_confusion_png(np.eye(3, dtype=np.int64), ["a", "b"], tmp_path / "x.png", "t")
  assert not (tmp_path / "x.png").exists()


def test_importing_metrics_does_not_load_matplotlib():
  code = "import sys, training.metrics; assert 'matplotlib' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=metrics.__file__.rsplit("/", 2)[0])
