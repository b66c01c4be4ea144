"""Writes part of a tfds image dataset as an image folder: OUT/{train,test}/<class name>/*.png.

For trying `--dataset folder:PATH` end to end with real images, e.g.

  .venv/bin/python scripts/make_image_folder.py fashion_mnist /tmp/clothes \
      --classes T-shirt/top,Trouser,Sneaker,Bag,Ankle\\ boot --train-per-class 300 \
      --test-per-class 50 --size 32 --rgb

Class names become folder names ('/' -> '_'). `--size`/`--rgb` write the images at another size
or as RGB, so that fine-tuning a 28x28 grayscale model on them exercises the input conversion.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flaxzoo import data


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", help="tfds dataset name")
  parser.add_argument("out", type=Path, help="folder to create (must not exist)")
  parser.add_argument("--classes", help="comma-separated class names (default: all)")
  parser.add_argument("--train-per-class", type=int, default=300)
  parser.add_argument("--test-per-class", type=int, default=50)
  parser.add_argument("--names", help="comma-separated folder names, one per class written (default: "
                      "the class names), e.g. zero,one,...,nine for MNIST's 0-9")
  parser.add_argument("--size", type=int, help="write SIZE x SIZE images (default: as stored)")
  parser.add_argument("--rgb", action="store_true", help="write RGB images")
  parser.add_argument("--manual-dir", help="the dataset's raw files (see flaxzoo train --help)")
  parser.add_argument("--data-dir")
  args = parser.parse_args(argv)
  if args.out.exists():
    print(f"make_image_folder: {args.out} exists; choose a new folder", file=sys.stderr)
    return 2
  dataset = data.load_dataset(args.dataset, args.data_dir, args.manual_dir)
  names = list(dataset.info.class_names)
  wanted = args.classes.split(",") if args.classes else names
  unknown = [c for c in wanted if c not in names]
  if unknown:
    print(f"make_image_folder: unknown class(es) {unknown}; {args.dataset} has {names}",
          file=sys.stderr)
    return 2
  folder_names = args.names.split(",") if args.names else [c.replace("/", "_") for c in wanted]
  if len(folder_names) != len(wanted):
    print(f"make_image_folder: --names gives {len(folder_names)} names for {len(wanted)} classes",
          file=sys.stderr)
    return 2
  for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
    images, labels = dataset.splits[split].arrays()
    for name, folder_name in zip(wanted, folder_names):
      folder = args.out / split / folder_name
      folder.mkdir(parents=True)
      for index in np.flatnonzero(labels == names.index(name))[:per_class]:
        pixels = images[index]
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        if args.rgb:
          image = image.convert("RGB")
        if args.size:
          image = image.resize((args.size, args.size), Image.Resampling.BILINEAR)
        image.save(folder / f"{split}-{index:05d}.png")
  print(f"wrote {args.out}: {len(wanted)} classes, up to {args.train_per_class} train and "
        f"{args.test_per_class} test images each")
  return 0


if __name__ == "__main__":
  sys.exit(main())
