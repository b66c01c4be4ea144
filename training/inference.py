"""Using a trained checkpoint: class predictions for image files (with the card's class names),
and a full evaluation on its dataset."""

import json
import sys
from pathlib import Path

import numpy as np

from flaxzoo import data
from flaxzoo.data import folders
from flaxzoo.data import images as image_lib
from flaxzoo.files import replace_atomically
from flaxzoo.training import analysis, checkpoint, metrics, parallel
from flaxzoo.training.config import ConfigError, dataset_slug
from flaxzoo.training.evaluation import compiled_in_passes, evaluate, predict_step


def check_input_images(images) -> np.ndarray:
  """`images` as an array the models take: uint8 pixels, or floats already scaled to [0, 1].
  Anything else (0-255 floats, other integer types) raises DataError saying how to convert it."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise data.DataError(f"images must be an (N, H, W, C) array, got shape {images.shape}")
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if 0.0 <= low and high <= 1.0:
      return images
    raise data.DataError(f"float images must be scaled to [0, 1], got values in [{low:g}, {high:g}]; "
                         f"divide 0-255 pixels by 255, or pass them as uint8")
  raise data.DataError(f"images must be uint8 (0-255) or float in [0, 1], got {images.dtype}; "
                       f"convert them with .astype(np.uint8) if they are 0-255 pixels")


def predict_arrays(model, variables, images, batch_size: int = 1000, tta: str = "none") -> np.ndarray:
  """Class probabilities (N, num_classes) for uint8 or [0, 1] float images (N, H, W, C); an empty
  batch gives an empty result. Other inputs raise DataError (`check_input_images`). `tta`: see
  `evaluation.tta_log_probs`."""
  images = check_input_images(images)
  if not len(images):
    return np.zeros((0, model.num_classes), np.float32)
  probabilities = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    program = compiled_in_passes(predict_step, model, variables, batch, tta=tta)
    probabilities.append(np.asarray(program(variables, batch)))
  return np.concatenate(probabilities)


def run_tta(card: dict) -> str:
  """The test-time augmentation a checkpoint's run evaluated with ("none" before runs had one)."""
  return card["config"].get("tta", "none")


def predict_files(workdir, paths, top_k: int = 3, step: int | None = None, saliency: bool = False,
                  model_file=None):
  """`(predictions, errors, card)` for image files, using the checkpoint in `workdir` or, with
  `model_file`, a `flaxzoo export --format stablehlo` folder run without the model's code.

  predictions: one dict per readable file, `{"file", "top_k": [{"class", "probability"}, ...]}`,
  most probable first. errors: `{"file", "error"}` for each file that is not a readable image
  (the others are still predicted). Images are converted to the model's input shape; when any is,
  that is stated once on stderr. With `saliency`, each prediction also names the PNG written
  beside its image, `<name>.saliency.png` (see `analysis.saliency`).
  """
  if model_file is not None:
    from flaxzoo.training.export import load_exported
    if saliency:
      raise ConfigError("saliency needs the checkpoint (its gradients): use the workdir, not a model file")
    predict, card = load_exported(model_file)
    shape, class_names = tuple(card["input"]["shape"][1:]), card["class_names"]
  else:
    model, variables, card = checkpoint.load_checkpoint(workdir, step)
    shape, class_names = tuple(card["input_shape"]), card["dataset"]["class_names"]
    predict = lambda images: predict_arrays(model, variables, images, tta=run_tta(card))
  images, readable, errors = read_image_files(paths, shape)
  predictions = []
  if readable:
    probabilities = np.asarray(predict(images))
    k = max(1, min(top_k, len(class_names)))
    for path, probs in zip(readable, probabilities):
      best = np.argsort(-probs, kind="stable")[:k]
      predictions.append({"file": path, "top_k": [
          {"class": class_names[i], "probability": float(probs[i])} for i in best]})
    if saliency:
      for prediction, heat in zip(predictions, save_saliency(model, variables, images, readable)):
        prediction["saliency"] = heat
  return predictions, errors, card


def read_image_files(paths, shape):
  """`(images, readable paths, errors)`: the readable files converted to `shape` (N, H, W, C
  uint8), and `{"file", "error"}` for the others. A conversion is stated once on stderr."""
  images, readable, errors, shapes = [], [], [], []
  for path in paths:
    try:
      image = image_lib.open_image(path)
    except data.DataError as e:
      errors.append({"file": str(path), "error": str(e)})
      continue
    shapes.append(image_lib.pil_shape(image))
    images.append(image_lib.convert_pil_image(image, shape))
    readable.append(str(path))
  note = image_lib.conversion_note(f"{len(readable)} image file(s)", shapes, shape)
  if note:
    print(note, file=sys.stderr)
  return (np.stack(images) if images else None), readable, errors


def save_saliency(model, variables, images, paths) -> list[str]:
  """Writes `<image>.saliency.png` beside each image (its saliency map scaled to 0-255 at the
  model's input size); returns their paths."""
  from PIL import Image
  written = []
  for path, heat in zip(paths, np.asarray(analysis.saliency(model, variables, images))):
    pixels = ((255 * heat / heat.max()) if heat.max() > 0 else heat).astype(np.uint8)
    out = Path(path).with_name(Path(path).stem + ".saliency.png")
    replace_atomically(out, lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, "PNG"))
    written.append(str(out))
  return written


def evaluate_checkpoint(workdir, split: str = "test", step: int | None = None,
                        data_dir: str | None = None, manual_dir: str | None = None,
                        save: bool = True, dataset: str | None = None,
                        devices: int | None = None, streaming: str = "auto",
                        workers: int | None = None, tta: str | None = None) -> dict:
  """Accuracy, loss, macro-F1, per-class accuracy and confusion matrix of a checkpoint on its own
  dataset's `split` (the examples and input conversion it was trained with), with the run's
  test-time augmentation unless `tta` names one ("none" or "flip").

  With `save`, also writes WORKDIR/eval-<split>.json and WORKDIR/confusion-<split>.png; their
  paths are in the result's "files" (a folder that cannot be written to only gets a warning).
  Each batch is split over `devices` local devices (default: all). `streaming`, `workers`: how
  the split is read (see `training.Config`).
  """
  layout = parallel.make_layout(devices)
  model, variables, card = checkpoint.load_checkpoint(workdir, step)
  variables = parallel.replicate(layout, variables)
  if dataset:  # the image folder it was trained on, moved: the same classes at a new path
    dataset = data.canonical_name(dataset)
    folders.check_moved_folder(card["dataset"]["name"], dataset, card["dataset"]["class_names"])
    card = {**card, "dataset": {**card["dataset"], "name": dataset}}
  source = checkpoint_source(card, split, data_dir, manual_dir, workdir=workdir, streaming=streaming)
  result = evaluate(model, variables, source, card["config"].get("eval_batch_size", 1000),
                    card["dataset"]["class_names"], layout,
                    data.default_workers() if workers is None else workers,
                    run_tta(card) if tta is None else tta)
  result.update(step=card["step"], split=split, dataset=card["dataset"]["name"],
                model=card["model"]["name"], workdir=str(workdir))
  if save:
    result["files"] = save_evaluation(result, Path(workdir))
  return result


def checkpoint_split(card: dict, split: str, data_dir: str | None = None, manual_dir: str | None = None,
                     workdir=None):
  """`(images, labels)` arrays of `split` of a checkpoint's own dataset (see `checkpoint_source`)."""
  return checkpoint_source(card, split, data_dir, manual_dir, workdir).arrays()


def checkpoint_source(card: dict, split: str, data_dir: str | None = None, manual_dir: str | None = None,
                      workdir=None, streaming: str = "off"):
  """`split` of a checkpoint's own dataset as a source (`data.sources`; in memory unless
  `streaming`), with the examples and input conversion it was trained with. For an image folder,
  with `workdir`: a folder whose files changed since training is said in one line (how many new,
  how many gone)."""
  saved = card["config"]
  limit = {"test": saved.get("test_examples"), "train": saved.get("train_examples")}.get(split)
  dataset = data.load_dataset(
      card["dataset"]["name"], data_dir or saved.get("data_dir"), manual_dir or saved.get("manual_dir"),
      splits=(split,), limits={split: limit}, image_shape=card["input_shape"],
      test_fraction=saved.get("test_fraction", 0.2), streaming=streaming)
  recorded = Path(workdir) / folders.DATASET_FILES if workdir else None
  if dataset.info.files and recorded and recorded.exists():
    changes = folders.folder_changes(json.loads(recorded.read_text()), dataset.info.files)[split]
    if changes["new"] or changes["gone"]:
      print(f"flaxzoo: note: {card['dataset']['name']} changed since training: its {split} split has "
            f"{changes['new']} new and {changes['gone']} gone files; evaluating it as it is now",
            file=sys.stderr)
  return dataset.splits[split]


def save_evaluation(result: dict, workdir: Path) -> list[str]:
  """eval-<split>.json and confusion-<split>.png in `workdir`, each written whole or not at all."""
  split = result["split"]
  json_path, png_path = workdir / f"eval-{split}.json", workdir / f"confusion-{split}.png"
  try:
    replace_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    replace_atomically(png_path, lambda tmp: metrics.save_confusion_png(
        np.asarray(result["confusion_matrix"]), result["class_names"], tmp,
        f"{result['model']} step {result['step']}, accuracy {result['accuracy']:.2%}\n"
        f"{dataset_slug(result['dataset'])} {split}"))
  except OSError as e:
    print(f"flaxzoo: warning: could not write the evaluation files in {workdir} ({e.strerror}); "
          f"the result above is complete", file=sys.stderr)
    return []
  return [str(json_path), str(png_path)]
