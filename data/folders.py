"""Image-folder datasets: `folder:PATH`, one subfolder per class of PNG/JPEG files.

Layouts: `PATH/train/<class>/…` with `PATH/test/<class>/…`; or `PATH/train/<class>/…` alone, or
`PATH/<class>/…`, where a fixed, stratified `test_fraction` of each class is held out as the test
split. tfds's `ImageFolder` finds the splits, the classes (sorted folder names) and the files; it
needs TensorFlow, so like preparing a tfds dataset it runs in the `data.prepare` subprocess. The
files are then decoded here with PIL and converted to one input shape.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from flaxzoo.data import images as image_lib
from flaxzoo.data.types import DataError, Dataset, DatasetInfo

PREFIX = "folder:"


def is_folder_dataset(name: str) -> bool:
  return name.startswith(PREFIX)


def folder_path(name: str) -> Path:
  return Path(name[len(PREFIX):]).expanduser()


def canonical_name(name: str) -> str:
  """`folder:` plus the absolute path, so that a model card names the folder from anywhere."""
  return PREFIX + str(folder_path(name).absolute()) if is_folder_dataset(name) else name


def list_folder(root: Path) -> dict:
  """`{"class_names": [...], "splits": {split: [[file, label], ...]}}` via tfds's ImageFolder."""
  if not root.is_dir():
    raise DataError(f"image folder {root} does not exist or is not a folder; --dataset folder:PATH "
                    f"needs PATH/<class>/*.png, or PATH/train/<class>/… and PATH/test/<class>/…")
  with tempfile.NamedTemporaryFile("r", suffix=".json") as out, \
       tempfile.NamedTemporaryFile("r", suffix=".txt") as error_file:
    command = [sys.executable, "-m", "flaxzoo.data.prepare", PREFIX + str(root), "--list-file", out.name,
               "--error-file", error_file.name]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    code = subprocess.run(command, env=env, stderr=subprocess.DEVNULL).returncode
    if code != 0:
      raise DataError(f"cannot read image folder {root}: "
                      f"{error_file.read().strip() or f'data.prepare exited with status {code}'}")
    return json.load(out)


def scan_with_image_folder(root: Path) -> dict:
  """Runs in the `data.prepare` subprocess (it imports TensorFlow through tfds)."""
  import tensorflow_datasets as tfds
  flat = "train" not in {p.name for p in root.iterdir() if p.is_dir()}
  with tempfile.TemporaryDirectory() as tmp:
    if flat:  # PATH/<class>/…: presented to ImageFolder as the train split
      os.symlink(root.absolute(), os.path.join(tmp, "train"))
    builder = tfds.folder_dataset.ImageFolder(tmp if flat else str(root))
    class_names = builder.info.features["label"].names

    def real_path(path):  # the listing names files through the temporary link
      return str(root / Path(path).relative_to(Path(tmp) / "train")) if flat else path

    splits = {split: [[real_path(e.image_path), class_names.index(e.label)]
                      for e in builder._split_examples.get(split, [])]  # its fixed order
              for split in ("train", "test")}
  if not splits["train"]:
    where = root if flat else root / "train"
    raise ValueError(f"no PNG/JPEG files in class subfolders of {where}")
  return {"class_names": class_names, "splits": splits}


def hold_out(examples: list, fraction: float, num_classes: int) -> tuple[list, list]:
  """(train, test): the first ceil(fraction * n) files of each class (in ImageFolder's fixed
  order) are the test split; a class with a single file stays in train."""
  train, test = [], []
  for label in range(num_classes):
    files = [e for e in examples if e[1] == label]
    cut = min(math.ceil(fraction * len(files)), len(files) - 1)
    test += files[:cut]
    train += files[cut:]
  return train, test


def load_folder_dataset(name: str, image_shape=None, test_fraction: float = 0.2,
                        splits=("train", "test"), limits: dict | None = None) -> Dataset:
  """An image folder in memory as uint8 arrays of one shape: `image_shape` (H, W, C) when given
  (a fine-tuned model's input), else the most common size, RGB if any image is colour."""
  root = folder_path(name)
  listing = list_folder(root)
  class_names = listing["class_names"]
  files = listing["splits"]
  held_out = not files["test"]
  if held_out:
    files["train"], files["test"] = hold_out(files["train"], test_fraction, len(class_names))
  limits = limits or {}
  files = {split: files[split][:limits.get(split) or None] for split in splits}
  shapes = {split: [image_lib.header_shape(path) for path, _ in files[split]] for split in splits}
  target = tuple(image_shape) if image_shape else image_lib.common_shape(shapes.get("train")
                                                                        or sum(shapes.values(), []))
  note = image_lib.conversion_note(f"{PREFIX}{root}", sum(shapes.values(), []), target)
  if note:
    print(note, file=sys.stderr)
  if held_out and "test" in splits:
    print(f"{PREFIX}{root}: no test/ folder; holding out {test_fraction:.0%} of each class as the "
          f"test split ({len(files['test'])} images)", file=sys.stderr)
  arrays = {}
  for split in splits:
    images = np.empty((len(files[split]), *target), np.uint8)
    for i, (path, _) in enumerate(files[split]):
      images[i] = image_lib.convert_pil_image(image_lib.open_image(path), target)
    labels = np.asarray([label for _, label in files[split]], np.int32)
    images.flags.writeable = labels.flags.writeable = False
    arrays[split] = (images, labels)
  info = DatasetInfo(name=canonical_name(name), num_classes=len(class_names),
                     class_names=tuple(class_names), image_shape=target,
                     num_examples={split: len(files[split]) for split in splits})
  return Dataset(info, arrays)
