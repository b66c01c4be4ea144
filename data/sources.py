"""Splits read by index: `read(indices)` -> (uint8 images (n, H, W, C), int32 labels (n,)).

`ArraySource` holds a split in memory. `TfdsRecords` and `FolderFiles` hold only where the examples
are (a prepared tfds split's ArrayRecord files; an image folder's file names) and decode what is
read, so their memory does not grow with the dataset; they are what grain's worker processes read
(`data.streaming`). Every kind decodes and converts with the same functions, so a batch is the same
array whichever kind it is read from.
"""

import io
import math
from pathlib import Path

import numpy as np

from flaxzoo.data import images as image_lib
from flaxzoo.data.types import DataError

# Where `streaming` is "auto", a split whose decoded images would take more than this is read by
# index from disk instead of into memory (docs/streaming.md: what each path costs).
IN_MEMORY_MAX_BYTES = 256 << 20
STREAMING_CHOICES = ("auto", "on", "off")


def streams(streaming: str, num_examples: int, image_shape) -> bool:
  """Whether a split is read by index (`on`), held in memory (`off`), or, for `auto`, whether its
  decoded images would exceed IN_MEMORY_MAX_BYTES."""
  if streaming not in STREAMING_CHOICES:
    raise DataError(f"streaming must be {', '.join(STREAMING_CHOICES)}, not {streaming!r}")
  if streaming == "auto":
    return num_examples * math.prod(image_shape) > IN_MEMORY_MAX_BYTES
  return streaming == "on"


class ArraySource:
  """A split in memory."""
  streams = False

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.images.shape[1:])

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    return self.images, self.labels


def as_source(split):
  """A source for `split`: a source already, or an `(images, labels)` pair of arrays."""
  return split if hasattr(split, "read") else ArraySource(*split)


class _StreamingSource:
  """What the streaming kinds share: reading everything at once, for tools that need arrays."""
  streams = True

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    images, labels = self.read(np.arange(len(self)))
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _opencv():
  try:
    import cv2
  except ImportError:
    return None
  return cv2


def _decode_png_with_opencv(encoded: bytes, channels: int) -> np.ndarray | None:
  """An 8-bit gray or RGB PNG's pixels (H, W, C) by OpenCV, or None for anything else (PIL then
  decodes it). PNG is lossless, so these are PIL's pixels; OpenCV's call costs 16 us for an
  MNIST digit where PIL's costs 85 us (benchmarks/decode_cost.py)."""
  cv2 = _opencv()
  if cv2 is None or not encoded.startswith(PNG_SIGNATURE):
    return None
  pixels = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
  if pixels is None or pixels.dtype != np.uint8:
    return None
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.shape[-1] != channels:  # alpha, or a palette OpenCV expanded: PIL's rules apply
    return None
  return pixels[..., ::-1] if channels == 3 else pixels  # OpenCV gives BGR


def decode_encoded_image(encoded: bytes, stored_shape, image_shape) -> np.ndarray:
  """A tfds image record's pixels as uint8 `image_shape`: decoded at its `stored_shape`,
  converted (`images.convert_pil_image`) only when the two differ."""
  from PIL import Image
  pixels = _decode_png_with_opencv(encoded, stored_shape[-1])
  if pixels is None:
    pixels = np.asarray(Image.open(io.BytesIO(encoded)))
  pixels = pixels.reshape(stored_shape)
  if tuple(stored_shape) == tuple(image_shape):
    return pixels
  return image_lib.convert_pil_image(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels),
                                     image_shape)


class ArrayRecordShards:
  """Serialized records of a tfds split by index, from its ArrayRecord shards (tfds's
  `FileInstruction`s), one range read per record.

  array_record's read of a list of indices (0.8.6, `ParallelReadRecordsWithIndices`) allocates a
  vector over every record of the shard on each call, so a batch of 128 sorted indices cost 52.7 us
  per record from two 300,000-record shards against 19.9 from MNIST's 60,000; one range read per
  record cost 9.3 and 10.4 (benchmarks/decode_cost.py, docs/streaming.md). Readers open lazily, as
  array_record's data source opens them.
  """

  def __init__(self, file_instructions):
    self.files = [str(f.filename) for f in file_instructions]
    self.skips = np.array([f.skip for f in file_instructions], np.int64)
    self.ends = np.cumsum([f.take for f in file_instructions])  # global index past each shard
    self.readers = [None] * len(self.files)

  def _reader(self, shard: int):
    if self.readers[shard] is None:
      from array_record.python.array_record_module import ArrayRecordReader
      # array_record's data source's settings for random access: no readahead, 32 KiB reads.
      self.readers[shard] = ArrayRecordReader(self.files[shard], options="readahead_buffer_size:0",
                                              file_reader_buffer_size=32768)
    return self.readers[shard]

  def read(self, indices) -> list[bytes]:
    shards = np.searchsorted(self.ends, indices, side="right")
    records = []
    for index, shard in zip(indices, shards):
      if not 0 <= index < self.ends[-1]:
        raise IndexError(f"record {index} is outside the split's {self.ends[-1]} records")
      position = int(index - (self.ends[shard - 1] if shard else 0) + self.skips[shard])
      try:
        records.append(self._reader(shard).read(position, position + 1)[0])
      except RuntimeError as e:  # riegeli's complaint about a damaged chunk
        raise DataError(f"{self.files[shard]}: record {position} cannot be read ({str(e)[:200]}); "
                        f"the file is damaged: prepare the dataset again (delete its folder)") from e
    return records


class TfdsRecords(_StreamingSource):
  """The first `count` records of a prepared tfds split, read from its ArrayRecord files by index.

  The serialized examples are parsed here (tfds's own proto, no TensorFlow): tfds's read and
  deserialisation cost 49 us per MNIST record, the raw read and this parse 10 us
  (benchmarks/decode_cost.py). tfds locates the files; `ArrayRecordShards` reads them.
  The open files are not pickled: each worker process opens its own.
  """

  def __init__(self, name: str, split: str, data_dir: str, count: int, stored_shape, image_shape):
    self.name, self.split, self.data_dir, self.count = name, split, data_dir, count
    self.stored_shape, self.image_shape = tuple(stored_shape), tuple(image_shape)
    self._records = None

  def __getstate__(self):
    return {**self.__dict__, "_records": None}

  def __len__(self) -> int:
    return self.count

  def _open(self):
    if self._records is None:
      import tensorflow_datasets as tfds
      source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
      self._records = ArrayRecordShards(source.dataset_info.splits[self.split].file_instructions)
    return self._records

  def describe(self, index: int) -> str:
    return f"{self.name} {self.split} record {index} (in {self.data_dir})"

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    from tensorflow_datasets.proto import tf_example_pb2
    indices = [int(i) for i in indices]
    records = self._open().read(indices)
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    labels = np.empty(len(indices), np.int32)
    for i, (index, record) in enumerate(zip(indices, records)):
      try:
        feature = tf_example_pb2.Example.FromString(record).features.feature
        labels[i] = feature["label"].int64_list.value[0]
        images[i] = decode_encoded_image(feature["image"].bytes_list.value[0], self.stored_shape,
                                         self.image_shape)
      except Exception as e:  # a damaged record: named, whatever the decoder's complaint
        raise DataError(f"{self.describe(index)}: cannot decode it ({type(e).__name__}: "
                        f"{str(e)[:200]}); prepare the dataset again (delete its folder)") from e
    return images, labels


class FolderFiles(_StreamingSource):
  """An image folder's files (paths relative to `root`, as bytes: compact for millions of files),
  each decoded and converted to `image_shape` when read."""

  def __init__(self, root, paths: np.ndarray, labels: np.ndarray, image_shape):
    self.root, self.paths, self.labels = str(root), paths, labels
    self.image_shape = tuple(image_shape)

  def __len__(self) -> int:
    return len(self.paths)

  def path(self, index: int) -> Path:
    return Path(self.root) / self.paths[index].decode()

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    for i, index in enumerate(indices):
      images[i] = image_lib.convert_pil_image(image_lib.open_image(self.path(index)), self.image_shape)
    return images, self.labels[indices]
