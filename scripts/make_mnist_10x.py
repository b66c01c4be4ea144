"""Builds a 10x MNIST for the streaming figures (docs/streaming.md): every training digit in COPIES
shifted versions (600,000 images for 10), the test split unchanged.

  .venv/bin/python scripts/make_mnist_10x.py --tfds /tmp/tfds      # tfds dataset `mnist10x`
  .venv/bin/python scripts/make_mnist_10x.py --folder /tmp/mnist10x  # image folder of PNGs

`--tfds DATA_DIR` prepares it through tfds into ArrayRecord files, like any tfds dataset; flaxzoo
then reads it by name from that data dir (`flaxzoo train --dataset mnist10x --data-dir DATA_DIR`),
without this script's builder class. `--folder PATH` writes PATH/{train,test}/<digit>/*.png.
MNIST itself comes from tfds as for training (FLAXZOO_MANUAL_DIR or --manual-dir for its files).
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from flaxzoo import data

# (rows, columns) each copy moves the digit by; copy 0 is MNIST itself.
SHIFTS = ((0, 0), (-2, 0), (2, 0), (0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1), (-3, 0))


def shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
  """`images` (N, H, W, C) moved by (rows, columns), the uncovered border black."""
  out = np.zeros_like(images)
  height, width = images.shape[1:3]
  out[:, max(rows, 0):height + min(rows, 0), max(columns, 0):width + min(columns, 0)] = \
      images[:, max(-rows, 0):height + min(-rows, 0), max(-columns, 0):width + min(-columns, 0)]
  return out


def examples(images: np.ndarray, labels: np.ndarray, copies: int):
  """(key, copy's image, label) for each copy of each example."""
  for copy, (rows, columns) in enumerate(SHIFTS[:copies]):
    moved = shifted(images, rows, columns) if copy else images
    for index in range(len(images)):
      yield f"{copy}-{index:05d}", moved[index], int(labels[index])


def png(image: np.ndarray) -> bytes:
  # zlib level 6 with libpng's adaptive filters, as tfds's own MNIST (tf.image.encode_png): OpenCV's
  # default (level 1, SUB filter, RLE) made 24 % larger PNGs that decoded 18-32 % slower.
  ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
  assert ok
  return encoded.tobytes()


def write_tfds(mnist: data.Dataset, data_dir: str, copies: int, name: str, count: int | None) -> None:
  import tensorflow_datasets as tfds

  dataset_name = name

  class Builder(tfds.core.GeneratorBasedBuilder):
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(28, 28, 1)),
              "label": tfds.features.ClassLabel(names=list(mnist.info.class_names))}),
          supervised_keys=("image", "label"),
          description=f"MNIST, each training digit in {copies} shifted copies; test unchanged.")

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train", copies), "test": self._generate_examples("test", 1)}

    def _generate_examples(self, split, split_copies):
      images, labels = mnist.splits[split].arrays()
      for key, image, label in examples(images[:count], labels[:count], split_copies):
        yield key, {"image": png(image), "label": label}

  builder = Builder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  print(f"prepared {name} in {builder.data_dir}: "
        f"{ {k: v.num_examples for k, v in builder.info.splits.items()} }")


def write_folder(mnist: data.Dataset, out: Path, copies: int, count: int | None) -> None:
  for split, split_copies in (("train", copies), ("test", 1)):
    images, labels = (a[:count] for a in mnist.splits[split].arrays())
    for digit in mnist.info.class_names:
      (out / split / digit).mkdir(parents=True)
    written = 0
    for key, image, label in examples(images, labels, split_copies):
      (out / split / mnist.info.class_names[label] / f"{key}.png").write_bytes(png(image))
      written += 1
    print(f"wrote {written} images to {out / split}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tfds", metavar="DATA_DIR", help="prepare the tfds dataset in this data dir")
  parser.add_argument("--folder", type=Path, help="write an image folder here (must not exist)")
  parser.add_argument("--copies", type=int, default=10, help=f"copies of each training digit, "
                      f"1..{len(SHIFTS)} (10)")
  parser.add_argument("--examples", type=int, help="use only the first N digits of each MNIST split")
  parser.add_argument("--name", help="tfds dataset name (default mnist10x, or mnist<COPIES>x)")
  parser.add_argument("--manual-dir", help="MNIST's raw files (see flaxzoo train --help)")
  parser.add_argument("--data-dir", help="tfds data dir of MNIST itself")
  args = parser.parse_args(argv)
  if not (args.tfds or args.folder):
    parser.error("give --tfds DATA_DIR, --folder PATH or both")
  if not 1 <= args.copies <= len(SHIFTS):
    parser.error(f"--copies must be 1..{len(SHIFTS)}")
  if args.folder and args.folder.exists():
    print(f"make_mnist_10x: {args.folder} exists; choose a new folder", file=sys.stderr)
    return 2
  mnist = data.load_dataset("mnist", args.data_dir, args.manual_dir)
  if args.tfds:
    write_tfds(mnist, args.tfds, args.copies, args.name or f"mnist{args.copies}x", args.examples)
  if args.folder:
    write_folder(mnist, args.folder, args.copies, args.examples)
  return 0


if __name__ == "__main__":
  sys.exit(main())
