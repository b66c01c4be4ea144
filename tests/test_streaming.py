"""Streaming input: batches read by index in grain workers equal the in-memory ones; image folders
of mixed sizes and formats; a file that fails mid-stream is one line, checkpoints kept."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_main

from flaxzoo import data


def write_mixed_folder(root, per_class=8):
  """Two classes of PNGs and JPEGs in several sizes, gray and colour."""
  from PIL import Image
  rng = np.random.default_rng(0)
  sizes = [(20, 20), (28, 28), (33, 17), (40, 52)]
  for label, name in enumerate(("circle", "square")):
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(per_class):
      height, width = sizes[i % len(sizes)]
      pixels = rng.integers(0, 80, (height, width, 3), np.uint8) + 100 * label
      image = Image.fromarray(pixels)
      if i % 3 == 0:
        image = image.convert("L")
      image.save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")


def assert_same_batches(a, b):
  a, b = list(a), list(b)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert all(np.array_equal(p, q) for p, q in zip(x, y))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_folder_of_mixed_sizes_gives_the_in_memory_batches(tmp_path, workers):
  write_mixed_folder(tmp_path)
  name = f"folder:{tmp_path}"
  in_memory = data.load_dataset(name, streaming="off", test_fraction=0.25)
  streamed = data.load_dataset(name, streaming="on", test_fraction=0.25)
  assert streamed.splits["train"].streams and not in_memory.splits["train"].streams
  assert in_memory.info.image_shape == streamed.info.image_shape == (40, 52, 3)  # the commonest size
  for split in ("train", "test"):  # the same files in each split
    assert np.array_equal(in_memory.info.files[split], streamed.info.files[split])
  kwargs = dict(batch_size=3, seed=5, epoch=1, start=1, rows=slice(1, 3), epochs=2)
  assert_same_batches(data.train_batches(in_memory.splits["train"], **kwargs),
                      data.train_batches(streamed.splits["train"], workers=workers, **kwargs))
  assert_same_batches(data.eval_batches(in_memory.splits["test"], 3),
                      data.eval_batches(streamed.splits["test"], 3, workers=workers))


def test_streamed_tfds_records_are_the_in_memory_arrays(mnist_data_dir):
  limits = {"train": 640, "test": 300}
  in_memory = data.load_dataset("mnist", mnist_data_dir, limits=limits)
  streamed = data.load_dataset("mnist", mnist_data_dir, limits=limits, streaming="on")
  assert isinstance(streamed.splits["train"], data.TfdsRecords) and len(streamed.splits["train"]) == 640
  kwargs = dict(batch_size=64, seed=3, epoch=2, start=4, rows=slice(16, 48))
  assert_same_batches(data.train_batches(in_memory.splits["train"], **kwargs),
                      data.train_batches(streamed.splits["train"], workers=1, **kwargs))
  assert_same_batches(data.eval_batches(in_memory.splits["test"], 128),
                      data.eval_batches(streamed.splits["test"], 128, workers=2))


def test_array_record_shards_read_each_index_from_its_shard(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  instructions, expected = [], []
  for shard, (count, skip) in enumerate([(5, 0), (7, 2), (4, 1)]):  # a shard read from record `skip` on
    path = tmp_path / f"split.array_record-{shard:05d}-of-00003"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(count):
      writer.write(f"shard {shard} record {i}".encode())
    writer.close()
    instructions.append(SimpleNamespace(filename=path, skip=skip, take=count - skip))
    expected += [f"shard {shard} record {i}".encode() for i in range(skip, count)]
  shards = data.sources.ArrayRecordShards(instructions)
  indices = [0, 4, 5, 9, 10, 12]  # first and last of each shard's part
  assert shards.read(indices) == [expected[i] for i in indices]
  assert shards.read(list(range(len(expected)))) == expected
  with pytest.raises(IndexError, match="record 13 is outside the split's 13 records"):
    shards.read([13])
  damaged = bytearray(instructions[1].filename.read_bytes())
  damaged[256:512] = bytes(256)  # inside the records' chunks (they start at byte ~200), not the index
  instructions[1].filename.write_bytes(bytes(damaged))
  with pytest.raises(data.DataError, match=r"00001-of-00003: record \d+ cannot be read .*damaged"):
    data.sources.ArrayRecordShards(instructions).read(list(range(5, 10)))


def truncated_png(size=(20, 20)) -> bytes:
  """A PNG whose header reads but whose pixels do not: found only when it is decoded."""
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size, 3), np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()[:120]


def test_a_file_that_fails_mid_stream_is_one_line_and_keeps_the_checkpoints(tmp_path, capsys):
  root = tmp_path / "images"
  for split in ("train", "test"):
    write_mixed_folder(root / split, per_class=10)
  streamed = data.load_dataset(f"folder:{root}", streaming="on")
  train = streamed.splits["train"]
  bad_index = int(data.epoch_permutation(0, 0, len(train))[9])  # in the batch of step 3 (of 4)
  bad = train.path(bad_index)
  bad.write_bytes(truncated_png())
  workdir = tmp_path / "run"
  status, _, err = run_main(capsys, "train", "--dataset", f"folder:{root}", "--workdir", workdir,
                    "--epochs", 1, "--batch-size", 4, "--checkpoint-every-steps", 1,
                    "--streaming", "on", "--workers", 1, "--set", 'model_kwargs={"widths": [4, 8], "hidden": 16}')
  assert status == 2, err
  line = [x for x in err.splitlines() if x.startswith("flaxzoo: error:")]
  assert len(line) == 1, err
  line = line[0]
  assert line.startswith("flaxzoo: error: ") and str(bad) in line and "train step 3" in line, line
  from flaxzoo.training import checkpoint
  assert checkpoint.saved_steps(workdir) == [1, 2]


def test_a_users_own_tfds_dataset_prepared_in_the_data_dir_streams_by_name(tmp_path, mnist_data_dir):
  """scripts/make_mnist_10x.py prepares MNIST x2 through its own tfds builder; flaxzoo reads it
  from the data dir by name, without that builder class."""
  import importlib.util
  import subprocess
  import sys

  from conftest import ROOT
  data_dir = str(tmp_path / "tfds")
  script = ROOT / "scripts" / "make_mnist_10x.py"
  done = subprocess.run([sys.executable, str(script), "--tfds", data_dir, "--copies", "2", "--examples",
                         "150", "--name", "mnist_tiny2x", "--data-dir", mnist_data_dir],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  streamed = data.load_dataset("mnist_tiny2x", data_dir, streaming="on")
  assert streamed.info.num_examples == {"train": 300, "test": 150}
  assert streamed.info.image_shape == (28, 28, 1)
  spec = importlib.util.spec_from_file_location("make_mnist_10x", script)
  maker = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(maker)
  mnist = data.load_dataset("mnist", mnist_data_dir, limits={"train": 150})
  images, labels = mnist.splits["train"].arrays()
  rows, columns = maker.SHIFTS[1]
  expected = sorted((image.tobytes(), int(label)) for copy in (images, maker.shifted(images, rows, columns))
                    for image, label in zip(copy, labels))
  got_images, got_labels = streamed.splits["train"].read(np.arange(300))
  assert sorted((image.tobytes(), int(label)) for image, label in zip(got_images, got_labels)) == expected
  with pytest.raises(data.DataError, match="no builder by that name, and none is prepared in"):
    data.load_dataset("mnist_tiny3x", data_dir)
