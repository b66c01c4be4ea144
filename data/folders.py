"""Image-folder datasets: `folder:PATH`, one subfolder per class of PNG/JPEG files.

Layouts: `PATH/train/<class>/…` with `PATH/test/<class>/…`; or `PATH/train/<class>/…` alone, or
`PATH/<class>/…`, where about `test_fraction` of each class is held out as the test split, each file
by a hash of its path within its class folder, so adding or removing files never moves another file
between the splits. Classes are the sorted visible folder names (hidden and `__MACOSX` folders are
ignored); images in nested folders belong to their class. The files are decoded with PIL and
converted to one input shape.
"""

import hashlib
import os
import sys
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


IGNORED_NAMES = {"__MACOSX"}  # OS folders that zip tools add; hidden names (".x") are ignored too
DATASET_FILES = "dataset-files.json"  # in a workdir: an image folder's files at training time
HOLD_OUT_RULE = "sha256('<path relative to its class folder>') / 2**256 < test_fraction"


def _visible(path: Path) -> bool:
  return not path.name.startswith(".") and path.name not in IGNORED_NAMES


def _class_folders(where: Path) -> list[Path]:
  return sorted((p for p in where.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _images_in(class_folder: Path) -> list[str]:
  """Image files anywhere below a class folder (nested folders belong to the class), as paths
  relative to it, sorted; hidden files and folders are skipped."""
  found = []
  for dirpath, dirnames, filenames in os.walk(class_folder):
    dirnames[:] = sorted(d for d in dirnames if _visible(Path(d)))
    for name in filenames:
      if _visible(Path(name)) and name.lower().endswith(image_lib.IMAGE_SUFFIXES):
        found.append(str((Path(dirpath) / name).relative_to(class_folder)))
  return sorted(found)


def list_folder(root: Path) -> dict:
  """`{"class_names": [...], "splits": {split: [[file, label], ...]}, "layout": ...}`.

  Classes are the visible subfolders of PATH/train/ (or of PATH), sorted by name; images in
  nested folders belong to their class folder. Raises DataError for fewer than two classes, a
  class without training images, or a test class the training split lacks.
  """
  usage = "--dataset folder:PATH needs PATH/<class>/*.png, or PATH/train/<class>/… and PATH/test/<class>/…"
  if not root.is_dir():
    raise DataError(f"image folder {root} does not exist or is not a folder; {usage}")
  split_layout = (root / "train").is_dir()
  train_root = root / "train" if split_layout else root
  class_names = [p.name for p in _class_folders(train_root)]
  if len(class_names) < 2:
    raise DataError(f"{train_root} has {len(class_names)} class folder(s) ({', '.join(class_names) or 'none'}); "
                    f"a classifier needs at least two. {usage}")
  splits = {"train": [], "test": []}
  for label, name in enumerate(class_names):
    files = _images_in(train_root / name)
    if not files:
      raise DataError(f"class {name!r} has no training images in {train_root / name} (PNG or JPEG, "
                      f"nested folders included); add some or remove the folder")
    splits["train"] += [[str(train_root / name / f), label] for f in files]
  if split_layout and (root / "test").is_dir():
    test_classes = [p.name for p in _class_folders(root / "test")]
    extra = sorted(set(test_classes) - set(class_names))
    if extra:
      raise DataError(f"{root / 'test'} has classes that {train_root} lacks: {', '.join(extra)}; a "
                      f"model cannot learn a class it never trains on: add them to train/ or remove them")
    for name in test_classes:
      splits["test"] += [[str(root / "test" / name / f), class_names.index(name)]
                         for f in _images_in(root / "test" / name)]
  return {"class_names": class_names, "splits": splits,
          "layout": "train/ and test/" if splits["test"] else "held out by hash"}


def _hold_out_position(path: str, class_folder: Path) -> float:
  """A file's place in [0, 1) from its path relative to its class folder: adding or removing
  other files never changes it."""
  relative = str(Path(path).relative_to(class_folder))
  return int.from_bytes(hashlib.sha256(relative.encode()).digest(), "big") / 2**256


def hold_out(examples: list, fraction: float, class_folders: list[Path]) -> tuple[list, list]:
  """(train, test): a file is held out when its `_hold_out_position` is below `fraction`
  (`HOLD_OUT_RULE`), so a file never moves between splits when others are added or removed. A
  class all of whose files would be held out keeps its last-placed file in train."""
  train, test = [], []
  for label, folder in enumerate(class_folders):
    files = [e for e in examples if e[1] == label]
    place = {e[0]: _hold_out_position(e[0], folder) for e in files}
    held = [e for e in files if place[e[0]] < fraction]
    if len(held) == len(files):
      held.remove(max(held, key=lambda e: place[e[0]]))
    test += held
    held_paths = {e[0] for e in held}
    train += [e for e in files if e[0] not in held_paths]
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
    train_root = root / "train" if (root / "train").is_dir() else root
    files["train"], files["test"] = hold_out(files["train"], test_fraction,
                                             [train_root / name for name in class_names])
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
  rule = (f"held out by hash: {HOLD_OUT_RULE}, test_fraction {test_fraction}" if held_out
          else "PATH/train/ and PATH/test/ folders")
  info = DatasetInfo(name=canonical_name(name), num_classes=len(class_names),
                     class_names=tuple(class_names), image_shape=target,
                     num_examples={split: len(files[split]) for split in splits}, split_rule=rule,
                     files={split: [str(Path(path).relative_to(root)) for path, _ in files[split]]
                            for split in splits})
  return Dataset(info, arrays)


def folder_changes(recorded: dict, now: dict) -> dict:
  """Per split, how many files are new and how many gone between two `DatasetInfo.files`."""
  return {split: {"new": len(set(now[split]) - set(recorded.get(split, []))),
                  "gone": len(set(recorded.get(split, [])) - set(now[split]))}
          for split in now}


def check_moved_folder(recorded: str, new: str, class_names) -> None:
  """Raises DataError unless `new` is an image folder holding the classes `class_names` that the
  folder `recorded` held (the same data, moved)."""
  if not (is_folder_dataset(recorded) and is_folder_dataset(new)):
    raise DataError(f"--dataset {new} differs from the checkpoint's {recorded}; only an image folder "
                    f"that has moved can be given anew (folder:NEWPATH)")
  found = list_folder(folder_path(new))["class_names"]
  if list(found) != list(class_names):
    raise DataError(f"{new} has classes {', '.join(found)}; the checkpoint was trained on "
                    f"{', '.join(class_names)}: give the folder it was trained on, moved")
