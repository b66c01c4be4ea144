"""Prepares a tfds dataset as ArrayRecord; run as a subprocess by `data.datasets.prepare`.

tfds needs TensorFlow for it; running it in its own process keeps TensorFlow out of the training
process. On failure the reason goes to --error-file as one line.
"""

import argparse
import os
import sys
import tempfile


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("name")
  parser.add_argument("--data-dir")
  parser.add_argument("--manual-dir")
  parser.add_argument("--error-file")
  args = parser.parse_args(argv)
  try:
    import tensorflow_datasets as tfds
    builder = tfds.builder(args.name, data_dir=args.data_dir, file_format="array_record")
    # tfds names a manual file's extraction after the file alone (extracted/GZIP.<file name>) and
    # reuses one that exists: mnist and fashion_mnist share file names, so with the shared default
    # extract dir fashion_mnist would silently be built from mnist's pixels. Extract privately.
    os.makedirs(args.data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.data_dir, prefix=f".{args.name}-extract-") as tmp:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=args.manual_dir, extract_dir=tmp))
  except Exception as e:  # reported to the parent process in one line
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    if len(reason) > 400:
      reason = reason[:400] + "..."
    if args.error_file:
      with open(args.error_file, "w") as f:
        f.write(reason)
    print(f"data.prepare: {reason}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
