"""Datasets through tensorflow-datasets' own builders, loaded into memory as numpy arrays.

Raw files come from, in this order: an explicit manual dir (`--manual-dir`), then
`$FLAXZOO_MANUAL_DIR/<dataset>/`, then tfds's normal download. tfds verifies every raw file against
the sha256 it has registered for it. Preparing (extracting) runs `data.prepare` in a subprocess so
that TensorFlow, which tfds needs only for that step, never loads into the training process; the
prepared ArrayRecord files are then read through `tfds.data_source`, which does not import it.
Splits decoded once are kept as arrays (`DECODED_CACHE`); with tfds's info recorded beside them
(`decoded_record`), later loads of those splits need no tfds at all.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from flaxzoo.data import folders, sources
from flaxzoo.data import images as image_lib
from flaxzoo.data.types import DataError, Dataset, DatasetInfo
from flaxzoo.files import replace_atomically

MANUAL_DIR_ENV = "FLAXZOO_MANUAL_DIR"


def _tfds():
  # Imported lazily: `flaxzoo models` and the model code need none of it.
  import tensorflow_datasets as tfds
  return tfds


TFDS_DEFAULT_DATA_DIR = "~/tensorflow_datasets"  # tensorflow_datasets.core.constants.DATA_DIR


def default_data_dir() -> str:
  """tfds's own default (honours TFDS_DATA_DIR), without importing tfds (tests/test_data.py
  checks the constant against tfds's)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or TFDS_DEFAULT_DATA_DIR)


def _builder_class(name: str, data_dir: str | None = None):
  tfds = _tfds()
  try:
    return tfds.builder_cls(name)
  except Exception as e:  # tfds raises DatasetNotFoundError with a long listing
    import difflib
    close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    where = f", and none is prepared in {data_dir}" if data_dir else ""
    raise DataError(f"unknown dataset {name!r}: tensorflow-datasets has no builder by that "
                    f"name{where}.{hint}") from e


def raw_files(name: str) -> dict[str, tuple[str, str]]:
  """The files tfds would download for `name`: file name -> (url, registered sha256)."""
  url_infos = _builder_class(name).url_infos or {}
  return {info.filename or url.rsplit("/", 1)[-1]: (url, info.checksum)
          for url, info in url_infos.items()}


def resolve_manual_dir(name: str, manual_dir: str | None = None) -> tuple[Path | None, str]:
  """Where raw files for `name` are looked for, and which setting chose that place."""
  if manual_dir:
    return Path(manual_dir).expanduser(), "--manual-dir"
  root = os.environ.get(MANUAL_DIR_ENV)
  if root:
    return Path(root).expanduser() / name, f"${MANUAL_DIR_ENV}"
  return None, ""


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def check_manual_files(name: str, manual_dir: Path, source: str) -> bool:
  """True when every raw file is in `manual_dir` with tfds's registered checksum.

  False when none is there and the setting was the environment variable (tfds may still download).
  Anything else — some files missing, a wrong checksum, an explicit dir without them — raises.
  """
  expected = raw_files(name)
  present = [f for f in expected if (manual_dir / f).is_file()]
  if not present and source != "--manual-dir":
    return False
  missing = [f for f in expected if f not in present]
  if missing:
    raise DataError(f"{name}: raw file(s) {', '.join(missing)} missing from {manual_dir} "
                    f"(chosen by {source}); copy the original files there, or point --manual-dir "
                    f"(or {MANUAL_DIR_ENV}=PARENT, for PARENT/{name}/) at a folder that has them")
  for filename in present:
    actual = _sha256(manual_dir / filename)
    if actual != expected[filename][1]:
      raise DataError(f"{name}: {manual_dir / filename} has sha256 {actual} but tfds expects "
                      f"{expected[filename][1]}; replace it with the original file")
  return True


def _builder(name: str, data_dir: str):
  return _tfds().builder(name, data_dir=data_dir, file_format="array_record")


def is_prepared(name: str, data_dir: str) -> bool:
  """Whether `name` is prepared in `data_dir`: a tfds dataset, or one that a builder not registered
  here (a user's own) prepared there, which tfds reads from its files alone."""
  try:
    return _builder(name, data_dir).is_prepared()
  except _tfds().core.registered.DatasetNotFoundError:
    return False


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> None:
  """Makes sure `name` is prepared in `data_dir`; raises DataError saying how to fix it if not."""
  data_dir = data_dir or default_data_dir()
  if is_prepared(name, data_dir):
    return
  _builder_class(name, data_dir)  # unknown names fail here, before anything is written
  local_dir, source = resolve_manual_dir(name, manual_dir)
  has_local = local_dir is not None and check_manual_files(name, local_dir, source)
  if not has_local:
    unreachable = _first_unreachable_host(url for url, _ in raw_files(name).values())
    if unreachable:
      _raise_not_obtainable(name, data_dir, local_dir, source, unreachable)
  origin = f"raw files in {local_dir}" if has_local else "a download by tfds"
  print(f"Preparing {name} in {data_dir} from {origin} (once per data dir)...", file=sys.stderr)
  with tempfile.NamedTemporaryFile("r", suffix=".txt") as error_file:
    command = [sys.executable, "-m", "flaxzoo.data.prepare", name, "--data-dir", data_dir,
               "--error-file", error_file.name]
    if has_local:
      command += ["--manual-dir", str(local_dir)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    code = subprocess.run(command, env=env).returncode
    reason = error_file.read().strip()
  if code != 0:
    reason = reason or f"data.prepare exited with status {code}"
    if has_local:
      raise DataError(f"could not prepare {name} from {local_dir}: {reason}")
    _raise_not_obtainable(name, data_dir, local_dir, source, reason)


def _first_unreachable_host(urls) -> str | None:
  """A fast offline check: tfds itself retries a failing download for minutes before giving up."""
  import socket
  from urllib.parse import urlsplit
  for host, port in sorted({(u.hostname, u.port or (443 if u.scheme == "https" else 80))
                            for u in map(urlsplit, urls)}):
    try:
      socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
      return f"cannot reach {host} ({e.strerror or type(e).__name__})"
  return None


def _raise_not_obtainable(name, data_dir, local_dir, source, reason):
  files = list(raw_files(name))
  searched = f" and {local_dir} (from {source}) has none of its raw files" if local_dir else ""
  raise DataError(f"{name} is not prepared in {data_dir}{searched}, and tfds cannot download it: "
                  f"{reason}. To work offline, put {', '.join(files)} (the original files) in a "
                  f"folder and pass --manual-dir DIR, or set {MANUAL_DIR_ENV}=PARENT with them in "
                  f"PARENT/{name}/")


def _decode_images(encoded: list[bytes], image_shape) -> np.ndarray:
  # tfds's own decoder is ~2x slower per image than decoding in bulk here
  images = np.empty((len(encoded), *image_shape), np.uint8)
  for i, data in enumerate(encoded):
    images[i] = sources.decode_encoded_image(data, image_shape, image_shape)
  return images


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  return _info_of(name, _builder(name, data_dir or default_data_dir()))


def _info_of(name: str, builder) -> DatasetInfo:
  features = builder.info.features
  image = features["image"] if "image" in features else None
  label = features["label"] if "label" in features else None
  tfds = _tfds()
  if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
    raise DataError(f"{name} is not an image classification dataset: flaxzoo needs an 'image' and "
                    f"a class 'label' feature, it has {', '.join(features.keys())}")
  if None in image.shape:
    raise DataError(f"{name} has images of varying size {image.shape}; export it as an image "
                    f"folder and use --dataset folder:PATH, which converts every image to one size")
  return DatasetInfo(
      name=name,
      num_classes=label.num_classes,
      class_names=tuple(label.names),
      image_shape=tuple(image.shape),
      num_examples={split: info.num_examples for split, info in builder.info.splits.items()})


def load_split(name: str, split: str, data_dir: str | None = None,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One prepared split, in memory: uint8 images (N, H, W, C) and int32 labels (N,), read-only.

  `limit` reads only the first `limit` examples (quick runs decode only what they use). Cached per
  process: a second run in the same process (a notebook, a test session) does not decode again.
  """
  return _load_split_cached(name, split, os.path.abspath(data_dir or default_data_dir()), limit or None)


@functools.lru_cache(maxsize=8)
def _load_split_cached(name: str, split: str, data_dir: str, limit: int | None):
  record = decoded_record(name, data_dir)
  if record and split in record[1].num_examples:
    cached = _read_decoded(record[0], split, record[1].num_examples[split])
    if cached is not None:
      return _read_only(cached[0][:limit], cached[1][:limit])
  tfds = _tfds()
  builder = _builder(name, data_dir)
  if not builder.is_prepared():  # tfds's own error here wrongly says it is prepared as TFRecord
    raise DataError(f"{name} is not prepared in {data_dir}; prepare it once with "
                    f"data.prepare({name!r}, data_dir, manual_dir) or data.load_dataset({name!r}), "
                    f"or train on it with flaxzoo train --dataset {name}")
  info = _info_of(name, builder)
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  count = len(source) if limit is None else min(limit, len(source))
  cache_dir = Path(builder.data_dir) / DECODED_CACHE
  cached = _read_decoded(cache_dir, split, len(source))
  if cached is not None:
    images, labels = cached[0][:count], cached[1][:count]
  else:
    records = source.__getitems__(list(range(count)))
    images = _decode_images([r["image"] for r in records], info.image_shape)
    labels = np.fromiter((r["label"] for r in records), np.int32, len(records))
    if count == len(source):
      _write_decoded(cache_dir, split, images, labels)
  _record_decoded_info(cache_dir, info)
  return _read_only(images, labels)


def _read_only(images: np.ndarray, labels: np.ndarray):
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


# Decoded splits, kept inside the prepared dataset's own (versioned) folder so that they go with it:
# decoding 70,000 PNGs took ~7 s of every run's start-up; reading the arrays back takes ~0.1 s.
DECODED_CACHE = "flaxzoo-decoded"


def _read_decoded(cache_dir: Path, split: str, count: int):
  """(images, labels) saved by `_write_decoded`, or None if absent, unreadable or not `count` long.
  Plain .npy arrays, read with allow_pickle=False: nothing in them can run code."""
  try:
    images = np.load(cache_dir / f"{split}-images.npy", allow_pickle=False)
    labels = np.load(cache_dir / f"{split}-labels.npy", allow_pickle=False)
  except (OSError, ValueError):
    return None
  if len(images) != count or len(labels) != count or images.dtype != np.uint8:
    return None
  return images, labels.astype(np.int32, copy=False)


# What tfds said about a dataset whose splits are decoded in DECODED_CACHE, and tfds's version: a
# command whose splits are all decoded then reads them without importing tfds and building its
# builder (~0.75 s of each command's start-up on a 2-core CPU). Another tfds version asks tfds.
DECODED_INFO = "info.json"


def decoded_record(name: str, data_dir: str) -> tuple[Path, DatasetInfo] | None:
  """`(decoded cache dir, info)` of `name`'s prepared version in `data_dir` whose decoded cache
  the installed tfds recorded; None when there is none (or, left to tfds to choose, several)."""
  if not re.fullmatch(r"\w+(/\w+)?", name):  # a plain tfds name (and config), nothing to glob
    return None
  version = _installed_tfds_version()
  found = []
  for path in Path(data_dir, name).glob(f"*/{DECODED_CACHE}/{DECODED_INFO}"):
    try:
      record = json.loads(path.read_text())
      info = DatasetInfo(name=record["name"], num_classes=int(record["num_classes"]),
                         class_names=tuple(record["class_names"]),
                         image_shape=tuple(record["image_shape"]),
                         num_examples={k: int(v) for k, v in record["num_examples"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      continue
    prepared = (path.parent.parent / "dataset_info.json").is_file()  # tfds's own mark
    if record.get("tfds_version") == version and info.name == name and prepared:
      found.append((path.parent, info))
  return found[0] if len(found) == 1 else None


def _installed_tfds_version() -> str | None:
  try:
    return importlib.metadata.version("tensorflow-datasets")
  except importlib.metadata.PackageNotFoundError:
    return None


def _record_decoded_info(cache_dir: Path, info: DatasetInfo) -> None:
  """Best effort, like the arrays: without the record, tfds is asked as before."""
  record = {"tfds_version": _installed_tfds_version(), "name": info.name,
            "num_classes": info.num_classes, "class_names": list(info.class_names),
            "image_shape": list(info.image_shape), "num_examples": info.num_examples}
  text = json.dumps(record, indent=1)
  try:
    if (cache_dir / DECODED_INFO).read_text() == text:
      return
  except OSError:
    pass
  try:
    cache_dir.mkdir(exist_ok=True)
    replace_atomically(cache_dir / DECODED_INFO, lambda tmp: Path(tmp).write_text(text))
  except OSError:
    pass


def _write_decoded(cache_dir: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Best effort (a read-only data dir just means decoding again next time); each file appears
  whole or not at all."""
  try:
    cache_dir.mkdir(exist_ok=True)
    for suffix, array in (("labels", labels), ("images", images)):  # images last: read first
      replace_atomically(cache_dir / f"{split}-{suffix}.npy",
                         lambda tmp, array=array: np.save(tmp, array, allow_pickle=False))
  except OSError:
    pass


def _split_count(info: DatasetInfo, split: str, limits: dict) -> int:
  """How many of `split`'s first examples a load uses: its `limits` entry (absent or 0: all)."""
  available = info.num_examples.get(split, 0)
  return min(limits.get(split) or available, available)


def _target_shape(info: DatasetInfo, image_shape) -> tuple:
  return tuple(image_shape) if image_shape else info.image_shape


def _any_split_streams(info: DatasetInfo, splits, limits: dict, image_shape, streaming: str) -> bool:
  target = _target_shape(info, image_shape)
  return any(sources.streams(streaming, _split_count(info, split, limits), target) for split in splits)


def load_dataset(name: str, data_dir: str | None = None, manual_dir: str | None = None,
                 splits=("train", "test"), limits: dict | None = None, image_shape=None,
                 test_fraction: float = 0.2, streaming: str = "off") -> Dataset:
  """`name`'s `splits`: a tfds dataset (prepared first if needed, see `prepare`) or an image
  folder, `folder:PATH` (see `data.folders`), each split a source (`data.sources`) in memory or,
  by `streaming` (see `sources.streams`), read by index from disk.

  `limits` maps a split to the number of its first examples to use (absent or 0: all).
  `image_shape` (H, W, C): convert the images to it (a fine-tuned model's input); the conversion
  is stated once on stderr. `test_fraction`: what an image folder without test/ holds out.
  """
  if folders.is_folder_dataset(name):
    return folders.load_folder_dataset(name, image_shape, test_fraction, splits, limits, streaming)
  data_dir = data_dir or default_data_dir()
  limits = limits or {}
  record = decoded_record(name, data_dir)
  if record and not _any_split_streams(record[1], splits, limits, image_shape, streaming):
    info = record[1]  # prepared and decoded already: no tfds for splits held in memory
  else:  # tfds, imported here in the main thread (its lazy imports race in threads started later)
    prepare(name, data_dir, manual_dir)
    info = dataset_info(name, data_dir)
  for split in splits:
    if split not in info.num_examples:
      raise DataError(f"{name} has no split {split!r}; it has {', '.join(info.num_examples)}")
  target = _target_shape(info, image_shape)
  if target != info.image_shape:
    print(image_lib.conversion_note(name, [info.image_shape], target), file=sys.stderr)
  split_sources = {}
  for split in splits:
    count = _split_count(info, split, limits)
    if sources.streams(streaming, count, target):
      split_sources[split] = sources.TfdsRecords(name, split, os.path.abspath(data_dir), count,
                                                 info.image_shape, target)
    else:
      images, labels = load_split(name, split, data_dir, limits.get(split))
      split_sources[split] = sources.ArraySource(image_lib.convert_images(images, target), labels)
  return Dataset(dataclasses.replace(info, image_shape=target), split_sources)
