"""Per-record cost of streaming a tfds image split, step by step, in one process: the raw
ArrayRecord read (all records in one call, and in batches of 128 as training reads them, by
array_record's data source and by flaxzoo's `ArrayRecordShards`), tfds's own deserialisation,
flaxzoo's proto parse, the PNG decode by PIL and by OpenCV, and `TfdsRecords.read` whole (what a
grain worker does per batch). docs/streaming.md.

  python -m flaxzoo.benchmarks.decode_cost --dataset mnist --data-dir /tmp/tfds
"""

import argparse
import io
import sys
import time

import numpy as np

from flaxzoo import data
from flaxzoo.benchmarks import machine
from flaxzoo.data import sources


def microseconds_each(work, count: int, repeats: int = 3) -> float:
  """Best of `repeats` timings of `work()`, per item of `count`, in us."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    work()
    best = min(best, time.perf_counter() - start)
  return best / count * 1e6


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default="mnist", help="a prepared tfds image dataset (mnist)")
  parser.add_argument("--data-dir", help="its tfds data dir (default tfds's own)")
  parser.add_argument("--records", type=int, default=12_800, help="records read, as sorted random "
                      "batches are (12,800)")
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds
  from PIL import Image
  from tensorflow_datasets.proto import tf_example_pb2
  data_dir = args.data_dir or data.default_data_dir()
  info = data.dataset_info(args.dataset, data_dir)
  raw = tfds.data_source(args.dataset, split="train", data_dir=data_dir, download=False)
  order = np.random.default_rng(0).permutation(len(raw))[:args.records]
  indices = sorted(int(i) for i in order)
  count = len(indices)
  records = raw.data_source.__getitems__(indices)
  # As training reads them: each batch of 128 sorted indices in its own call.
  batches = [sorted(int(i) for i in order[start:start + 128]) for start in range(0, count, 128)]
  shards = sources.ArrayRecordShards(raw.dataset_info.splits["train"].file_instructions)
  encoded = [tf_example_pb2.Example.FromString(r).features.feature["image"].bytes_list.value[0]
             for r in records]
  channels = info.image_shape[-1]
  streamed = sources.TfdsRecords(args.dataset, "train", data_dir, len(raw), info.image_shape,
                                 info.image_shape)
  deserialised = tfds.data_source(args.dataset, split="train", data_dir=data_dir, download=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
  costs = {
      "raw ArrayRecord read, all at once": lambda: raw.data_source.__getitems__(indices),
      "raw ArrayRecord read, batches of 128, array_record's": lambda: [
          raw.data_source.__getitems__(batch) for batch in batches],
      "raw ArrayRecord read, batches of 128, ArrayRecordShards": lambda: [
          shards.read(batch) for batch in batches],
      "tfds's read and deserialisation (image left encoded)": lambda: deserialised.__getitems__(indices),
      "flaxzoo's proto parse (tf_example_pb2)": lambda: [
          tf_example_pb2.Example.FromString(r).features.feature for r in records],
      "PNG decode, PIL": lambda: [np.asarray(Image.open(io.BytesIO(b))) for b in encoded],
      "PNG decode, OpenCV": lambda: [sources._decode_png_with_opencv(b, channels) for b in encoded],
      "TfdsRecords.read (read, parse, decode)": lambda: streamed.read(indices),
  }
  print(machine.machine_line())
  print(f"{args.dataset} train, {count:,} records {info.image_shape}, best of 3:")
  for name, work in costs.items():
    print(f"  {name:55s} {microseconds_each(work, count):7.1f} us/record")
  return 0


if __name__ == "__main__":
  sys.exit(main())
