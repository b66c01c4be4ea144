"""Image-folder datasets: `folder:PATH`, one subfolder per class of PNG/JPEG files.

Layouts: `PATH/train/<class>/…` with `PATH/test/<class>/…`; or `PATH/train/<class>/…` alone, or
`PATH/<class>/…`, where about `test_fraction` of each class is held out as the test split, each file
by a hash of its path within its class folder, so adding or removing files never moves another file
between the splits. Classes are the sorted visible folder names (hidden and `__MACOSX` folders are
ignored); images in nested folders belong to their class. The files are decoded with PIL and
converted to one input shape, all at load (in memory) or each as it is read (streaming).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from flaxzoo.data import images as image_lib
from flaxzoo.data import sources
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


def _visible(name: str) -> bool:
  return not name.startswith(".") and name not in IGNORED_NAMES


def _class_folders(where: Path) -> list[Path]:
  return sorted((p for p in where.iterdir() if p.is_dir() and _visible(p.name)), key=lambda p: p.name)


def _images_in(class_folder: Path) -> list[str]:
  """Image files anywhere below a class folder (nested folders belong to the class), as paths
  relative to it, sorted; hidden files and folders are skipped."""
  found = []
  for dirpath, dirnames, filenames in os.walk(class_folder):  # strings, not Paths: 10x faster
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    relative = os.path.relpath(dirpath, class_folder)
    prefix = "" if relative == "." else relative + os.sep
    found.extend(prefix + name for name in filenames
                 if _visible(name) and name.lower().endswith(image_lib.IMAGE_SUFFIXES))
  found.sort()
  return found


def _compact(paths: list[str]) -> np.ndarray:
  """Paths as one bytes array: a million short paths take tens of MB, not the hundreds that
  Python strings in lists would."""
  return np.array([p.encode() for p in paths], dtype=bytes) if paths else np.array([], "S1")


def list_folder(root: Path) -> dict:
  """`{"class_names": [...], "splits": {split: (paths, labels)}, "layout": ...}`: paths relative to
  `root` as a bytes array (`_compact`), labels int32.

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
  parts = {"train": [], "test": []}
  for label, name in enumerate(class_names):
    files = _images_in(train_root / name)
    if not files:
      raise DataError(f"class {name!r} has no training images in {train_root / name} (PNG or JPEG, "
                      f"nested folders included); add some or remove the folder")
    prefix = str((train_root / name).relative_to(root))
    parts["train"].append((_compact([f"{prefix}/{f}" for f in files]), label))
  if split_layout and (root / "test").is_dir():
    test_classes = [p.name for p in _class_folders(root / "test")]
    extra = sorted(set(test_classes) - set(class_names))
    if extra:
      raise DataError(f"{root / 'test'} has classes that {train_root} lacks: {', '.join(extra)}; a "
                      f"model cannot learn a class it never trains on: add them to train/ or remove them")
    for name in test_classes:
      files = _images_in(root / "test" / name)
      parts["test"].append((_compact([f"test/{name}/{f}" for f in files]), class_names.index(name)))
  splits = {split: _join(found) for split, found in parts.items()}
  return {"class_names": class_names, "splits": splits,
          "layout": "train/ and test/" if len(splits["test"][0]) else "held out by hash"}


def _join(parts: list) -> tuple[np.ndarray, np.ndarray]:
  """(paths, labels) from [(paths of one class, its label), ...]."""
  if not parts:
    return _compact([]), np.array([], np.int32)
  paths = np.concatenate([p for p, _ in parts]) if parts else _compact([])
  labels = np.concatenate([np.full(len(p), label, np.int32) for p, label in parts])
  return paths, labels


def _hold_out_position(relative: bytes) -> float:
  """A file's place in [0, 1) from its path relative to its class folder: adding or removing
  other files never changes it."""
  return int.from_bytes(hashlib.sha256(relative).digest(), "big") / 2**256


def hold_out(paths: np.ndarray, labels: np.ndarray, fraction: float, class_folders) -> tuple:
  """((train paths, labels), (test paths, labels)): a file is held out when its
  `_hold_out_position` is below `fraction` (`HOLD_OUT_RULE`), so a file never moves between splits
  when others are added or removed. A class all of whose files would be held out keeps its
  last-placed file in train."""
  held = np.zeros(len(paths), bool)
  for label, folder in enumerate(class_folders):  # each class folder's path relative to the root
    members = np.flatnonzero(labels == label)
    skip = len(folder.encode()) + 1  # the path relative to the class folder follows "<folder>/"
    places = np.array([_hold_out_position(p[skip:]) for p in paths[members]])
    chosen = places < fraction
    if chosen.all():
      chosen[np.argmax(places)] = False
    held[members[chosen]] = True
  return (paths[~held], labels[~held]), (paths[held], labels[held])


# The input shape of a folder is the most common size among at most this many of its training
# files, spread evenly over them: reading every header of a million-file folder took minutes.
SHAPE_SAMPLE = 1000


def sampled_shapes(root: Path, paths: np.ndarray) -> list:
  """Header shapes of up to SHAPE_SAMPLE of `paths` (relative to `root`), spread evenly."""
  picks = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), SHAPE_SAMPLE)).astype(int))
  return [image_lib.header_shape(root / paths[i].decode()) for i in picks]


def load_folder_dataset(name: str, image_shape=None, test_fraction: float = 0.2,
                        splits=("train", "test"), limits: dict | None = None,
                        streaming: str = "off") -> Dataset:
  """An image folder's splits as sources of one image shape: `image_shape` (H, W, C) when given
  (a fine-tuned model's input), else the most common size (`sampled_shapes`), RGB if any sampled
  image is colour. `streaming` as in `sources.streams`: in memory, or decoded as read."""
  root = folder_path(name)
  listing = list_folder(root)
  class_names = listing["class_names"]
  files = listing["splits"]
  held_out = not len(files["test"][0])
  if held_out:
    train_root = root / "train" if (root / "train").is_dir() else root
    class_folders = [str((train_root / name).relative_to(root)) for name in class_names]
    files["train"], files["test"] = hold_out(*files["train"], test_fraction, class_folders)
  limits = limits or {}
  files = {split: tuple(a[:limits.get(split) or None] for a in files[split]) for split in splits}
  shapes = {split: sampled_shapes(root, files[split][0]) for split in splits}
  target = tuple(image_shape) if image_shape else image_lib.common_shape(shapes.get("train")
                                                                        or sum(shapes.values(), []))
  note = image_lib.conversion_note(f"{PREFIX}{root}", sum(shapes.values(), []), target)
  if note:
    print(note, file=sys.stderr)
  if held_out and "test" in splits:
    print(f"{PREFIX}{root}: no test/ folder; holding out {test_fraction:.0%} of each class as the "
          f"test split ({len(files['test'][0])} images)", file=sys.stderr)
  split_sources = {}
  for split in splits:
    source = sources.FolderFiles(root, *files[split], target)
    split_sources[split] = source if sources.streams(streaming, len(source), target) else \
        sources.ArraySource(*source.arrays())
  rule = (f"held out by hash: {HOLD_OUT_RULE}, test_fraction {test_fraction}" if held_out
          else "PATH/train/ and PATH/test/ folders")
  info = DatasetInfo(name=canonical_name(name), num_classes=len(class_names),
                     class_names=tuple(class_names), image_shape=target,
                     num_examples={split: len(files[split][0]) for split in splits}, split_rule=rule,
                     files={split: files[split][0] for split in splits})
  return Dataset(info, split_sources)


def write_files_json(path: Path, files: dict) -> None:
  """Writes `DatasetInfo.files` (bytes arrays) to `path` as the JSON of WORKDIR/dataset-files.json,
  a path at a time: a million paths never sit in memory as Python strings or as one JSON text."""
  with open(path, "w") as out:
    out.write("{")
    for n, (split, paths) in enumerate(files.items()):
      out.write(f"{', ' if n else ''}{json.dumps(split)}: [")
      for i, relative in enumerate(paths):
        out.write(f"{', ' if i else ''}{json.dumps(relative.decode())}")
      out.write("]")
    out.write("}")


def folder_changes(recorded: dict, now: dict) -> dict:
  """Per split, how many files are new and how many gone between two `DatasetInfo.files` (lists
  of paths, or bytes arrays as `load_folder_dataset` gives them)."""
  def names(paths):
    return {p.decode() if isinstance(p, bytes) else p for p in paths}
  return {split: {"new": len(names(now[split]) - names(recorded.get(split, []))),
                  "gone": len(names(recorded.get(split, [])) - names(now[split]))}
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
