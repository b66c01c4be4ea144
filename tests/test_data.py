import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_snapshot

from flaxzoo import data


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  a = data.epoch_permutation(0, 3, 1000)
  assert np.array_equal(a, data.epoch_permutation(0, 3, 1000))
  assert sorted(a) == list(range(1000))
  assert not np.array_equal(a, data.epoch_permutation(0, 4, 1000))
  assert not np.array_equal(a, data.epoch_permutation(1, 3, 1000))


def test_resumed_batches_equal_the_uninterrupted_tail():
  images = np.arange(100 * 4, dtype=np.uint8).reshape(100, 2, 2, 1)
  labels = np.arange(100, dtype=np.int32)
  full = list(data.train_batches((images, labels), 16, seed=7, epoch=2))
  tail = list(data.train_batches((images, labels), 16, seed=7, epoch=2, start=4))
  assert len(full) == data.steps_per_epoch(100, 16) == 6
  assert len(tail) == 2
  for (xa, ya), (xb, yb) in zip(full[4:], tail):
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
  seen = np.concatenate([y for _, y in full])
  assert len(set(seen)) == len(seen) == 96  # no repeats within an epoch; last partial batch dropped


def test_eval_batches_cover_every_example_once():
  images = np.ones((10, 2, 2, 1), np.uint8)
  labels = np.arange(10, dtype=np.int32)
  batches = list(data.eval_batches((images, labels), 4))
  assert [x.shape[0] for x, _, _ in batches] == [4, 4, 4]
  assert sum(m.sum() for _, _, m in batches) == 10
  assert np.array_equal(np.concatenate([y[m > 0] for _, y, m in batches]), labels)


def test_offline_without_files_says_where_to_put_them(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise OSError(-2, "Name or service not known")
  monkeypatch.setattr(socket, "create_connection", offline)
  monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
  with pytest.raises(data.DataError) as e:
    data.prepare("mnist", str(tmp_path / "tfds"))
  message = str(e.value)
  assert "cannot reach" in message and "train-images-idx3-ubyte.gz" in message
  assert "--manual-dir" in message and "FLAXZOO_MANUAL_DIR" in message
  assert tree_snapshot(tmp_path) == {}


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_real_mnist_through_tfds(mnist_data_dir, streaming):
  info = data.dataset_info("mnist", mnist_data_dir)
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1)
  if streaming == "off":
    (images, labels), (test_images, test_labels) = (
        data.load_split("mnist", split, mnist_data_dir) for split in ("train", "test"))
    assert data.load_split("mnist", "train", mnist_data_dir)[0] is images  # loaded once per process
  else:  # every record read by index from the ArrayRecord files, as grain's workers read them
    splits = data.load_dataset("mnist", mnist_data_dir, streaming="on").splits
    assert splits["train"].streams and splits["test"].streams
    (images, labels), (test_images, test_labels) = splits["train"].arrays(), splits["test"].arrays()
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  # Label counts and pixel mean of the original files (../shared/data/mnist/README.md).
  assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
  assert abs(images.mean() / 255 - 0.130660) < 1e-5
  assert test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_loading_an_unprepared_split_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DataError, match=r"not prepared in .*data\.prepare\('mnist'"):
    data.load_split("mnist", "test", str(tmp_path / "tfds"))
  assert tree_snapshot(tmp_path) == {}


def test_a_decoded_dataset_loads_without_tfds(mnist_data_dir, tmp_path, monkeypatch):
  """Once its splits are decoded, a dataset's info and arrays come from the decoded cache and its
  record of what tfds said, without importing tfds; another tfds version's record is not used."""
  data_dir = str(shutil.copytree(mnist_data_dir, tmp_path / "tfds"))
  data.load_split("mnist", "train", data_dir)  # decoded and recorded, if the copy was not yet
  by_tfds = data.dataset_info("mnist", data_dir)
  arrays = {split: data.load_split("mnist", split, data_dir) for split in ("train", "test")}
  data.datasets._load_split_cached.cache_clear()
  monkeypatch.setattr(data.datasets, "_tfds", lambda: pytest.fail("tfds was used"))
  quick = data.load_dataset("mnist", data_dir, limits={"test": 100})
  assert quick.info == by_tfds
  images, labels = quick.splits["train"].arrays()
  assert np.array_equal(images, arrays["train"][0]) and np.array_equal(labels, arrays["train"][1])
  assert np.array_equal(quick.splits["test"].arrays()[1], arrays["test"][1][:100])
  assert not images.flags.writeable
  record_path = next(Path(data_dir).glob(f"mnist/*/{data.datasets.DECODED_CACHE}/{data.datasets.DECODED_INFO}"))
  record = json.loads(record_path.read_text())
  record_path.write_text(json.dumps({**record, "tfds_version": "0.1"}))
  assert data.datasets.decoded_record("mnist", data_dir) is None  # tfds is asked again
  record_path.write_text(json.dumps(record))
  assert data.datasets.decoded_record("mnist", data_dir)[1] == by_tfds
  assert data.datasets.decoded_record("mni*", data_dir) is None


def test_default_data_dir_is_tfds_own(monkeypatch):
  from tensorflow_datasets.core import constants
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)  # tfds's DATA_DIR read it at import
  assert data.default_data_dir() == os.path.expanduser(constants.get_default_data_dir())
  monkeypatch.setenv("TFDS_DATA_DIR", "/somewhere/else")
  assert data.default_data_dir() == "/somewhere/else"


def test_env_var_manual_dir_is_used(tmp_path, monkeypatch, mnist_raw_dir):
  monkeypatch.setenv(data.MANUAL_DIR_ENV, str(mnist_raw_dir.parent))
  local_dir, source = data.datasets.resolve_manual_dir("mnist")
  assert local_dir == mnist_raw_dir and source == "$FLAXZOO_MANUAL_DIR"
  assert data.datasets.check_manual_files("mnist", local_dir, source)
  local_dir, source = data.datasets.resolve_manual_dir("mnist", str(tmp_path))
  assert local_dir == tmp_path and source == "--manual-dir"  # the flag wins over the variable


def test_decoded_splits_are_kept_beside_the_prepared_data(mnist_data_dir, tmp_path):
  """The first full load writes the decoded arrays into the prepared dataset's folder; later
  processes read them instead of decoding 70,000 PNGs; a damaged file is ignored, not trusted."""
  data_dir = str(shutil.copytree(mnist_data_dir, tmp_path / "tfds"))  # damaged below: not the shared one
  images, labels = data.load_split("mnist", "test", data_dir)
  cache_dir = next(Path(data_dir).glob(f"mnist/*/{data.datasets.DECODED_CACHE}"))
  cached = data.datasets._read_decoded(cache_dir, "test", len(labels))
  assert np.array_equal(cached[0], images) and np.array_equal(cached[1], labels)
  assert data.datasets._read_decoded(cache_dir, "test", len(labels) + 1) is None  # another size
  saved = (cache_dir / "test-images.npy").read_bytes()
  try:
    (cache_dir / "test-images.npy").write_bytes(saved[:1000])  # cut short, as by a full disk
    assert data.datasets._read_decoded(cache_dir, "test", len(labels)) is None
    data.datasets._load_split_cached.cache_clear()
    again, _ = data.load_split("mnist", "test", data_dir)  # decoded again, and rewritten
    assert np.array_equal(again, images)
    assert (cache_dir / "test-images.npy").read_bytes() == saved
  finally:
    (cache_dir / "test-images.npy").write_bytes(saved)


# Images read faithfully: bit depth, alpha, palettes, and files too large to open.

def read_back(path, shape):
  from flaxzoo.data import images as image_lib
  image = image_lib.open_image(path)
  return image_lib.pil_shape(image), image_lib.convert_pil_image(image, shape)


def test_a_16_bit_png_is_scaled_to_8_bits_not_binarised(tmp_path):
  from PIL import Image
  pixels = np.array([[0, 257 * 100, 65535, 257]], np.uint16)
  Image.fromarray(pixels).save(tmp_path / "deep.png")
  shape, converted = read_back(tmp_path / "deep.png", (1, 4, 1))
  assert shape == (1, 4, 1)
  assert converted[..., 0].tolist() == [[0, 100, 255, 1]]


def test_gray_with_alpha_and_gray_palettes_are_grayscale(tmp_path):
  from PIL import Image
  la = Image.new("LA", (2, 1))
  la.putpixel((0, 0), (50, 255))  # opaque gray
  la.putpixel((1, 0), (0, 0))  # fully transparent: the background shows
  la.save(tmp_path / "la.png")
  shape, converted = read_back(tmp_path / "la.png", (1, 2, 1))
  assert shape == (1, 2, 1) and converted[..., 0].tolist() == [[50, 255]]

  gray_palette = Image.fromarray(np.array([[0, 128]], np.uint8), "L").convert("P")
  gray_palette.save(tmp_path / "p.png")
  assert read_back(tmp_path / "p.png", (1, 2, 1))[0] == (1, 2, 1)
  colour_palette = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8), "RGB").convert("P")
  colour_palette.save(tmp_path / "colour.png")
  assert read_back(tmp_path / "colour.png", (1, 2, 3))[0] == (1, 2, 3)


def test_an_image_too_large_to_open_is_one_line_and_the_others_are_predicted(tmp_path, capsys):
  from conftest import run_main, write_checkpoint
  from PIL import Image
  write_checkpoint(tmp_path / "run")
  Image.new("L", (300, 300)).save(tmp_path / "big.png")  # 90,000 pixels
  Image.new("L", (28, 28)).save(tmp_path / "small.png")
  limit = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = 20_000  # PIL refuses above twice its limit
    status, out, err = run_main(capsys, "predict", "--workdir", tmp_path / "run", tmp_path / "big.png",
                                tmp_path / "small.png")
    assert status == 2 and err.count("flaxzoo: error:") == 1 and "Traceback" not in err
    assert "big.png: too large to open" in err and "--max-image-pixels" in err
    assert "small.png:" in out
    status, out, _ = run_main(capsys, "predict", "--workdir", tmp_path / "run", tmp_path / "big.png",
                              "--max-image-pixels", 100_000)
    assert status == 0 and "big.png:" in out
  finally:
    Image.MAX_IMAGE_PIXELS = limit


# Image folders: a hold-out that never moves, and what counts as a class.

def write_pngs(folder, names):
  from PIL import Image
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    Image.new("L", (8, 8), color=len(name)).save(folder / name)


def split_of(root):
  from flaxzoo.data import folders
  files = folders.load_folder_dataset(f"folder:{root}").info.files
  return {path: split for split, paths in files.items() for path in paths}


def test_the_held_out_split_of_a_folder_never_moves_a_file(tmp_path):
  for name in ("cat", "dog"):
    write_pngs(tmp_path / name, [f"{i}.png" for i in range(30)])
  before = split_of(tmp_path)
  assert 6 <= sum(split == "test" for split in before.values()) <= 20  # about 20 % of 60
  write_pngs(tmp_path / "cat", [f"new-{i}.png" for i in range(10)])
  for i in range(5):
    (tmp_path / "dog" / f"{i}.png").unlink()
  after = split_of(tmp_path)
  assert {path: before[path] for path in after if path in before} == \
         {path: split for path, split in after.items() if path in before}


def test_what_a_folder_dataset_counts_as_a_class(tmp_path):
  from flaxzoo.data import folders
  write_pngs(tmp_path / "a", ["1.png", "2.png"])
  write_pngs(tmp_path / "a" / "nested" / "deeper", ["3.png"])  # belongs to class a
  write_pngs(tmp_path / "b", ["1.png", "2.png"])
  write_pngs(tmp_path / ".hidden", ["1.png"])
  write_pngs(tmp_path / "__MACOSX" / "a", ["1.png"])
  listing = folders.list_folder(tmp_path)
  assert listing["class_names"] == ["a", "b"]
  assert sum(listing["splits"]["train"][1] == 0) == 3

  one_class = tmp_path / "one"
  write_pngs(one_class / "only", ["1.png", "2.png"])
  with pytest.raises(data.DataError, match="has 1 class folder.*at least two"):
    folders.list_folder(one_class)
  (tmp_path / "c").mkdir()  # an empty class folder
  with pytest.raises(data.DataError, match="class 'c' has no training images"):
    folders.list_folder(tmp_path)

  split = tmp_path / "split"
  for name in ("x", "y"):
    write_pngs(split / "train" / name, ["1.png"])
    write_pngs(split / "test" / name, ["1.png"])
  write_pngs(split / "test" / "z", ["1.png"])
  with pytest.raises(data.DataError, match="has classes that .* lacks: z"):
    folders.list_folder(split)


def test_folder_changes_count_new_and_gone_files():
  from flaxzoo.data import folders
  recorded = {"train": ["a/1.png", "a/2.png"], "test": ["b/1.png"]}
  now = {"train": ["a/1.png", "a/3.png", "a/4.png"], "test": []}
  assert folders.folder_changes(recorded, now) == {"train": {"new": 2, "gone": 1},
                                                   "test": {"new": 0, "gone": 1}}


def test_the_files_json_is_the_folder_listing(tmp_path):
  from flaxzoo.data import folders
  files = {"train": np.array(['a/1.png', 'b/"x".png', 'b/ü.png'.encode()], dtype=bytes),
           "test": np.array([], "S1")}
  folders.write_files_json(tmp_path / "files.json", files)
  assert json.loads((tmp_path / "files.json").read_text()) == {
      "train": ["a/1.png", 'b/"x".png', "b/ü.png"], "test": []}


def test_an_image_too_large_in_a_training_folder_is_one_line(tmp_path):
  from PIL import Image

  from flaxzoo.data import folders
  write_pngs(tmp_path / "a", ["1.png", "2.png"])
  write_pngs(tmp_path / "b", ["1.png"])
  Image.new("L", (300, 300)).save(tmp_path / "b" / "big.png")
  limit = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = 20_000
    with pytest.raises(data.DataError, match=r"big.png: too large to open .*--max-image-pixels"):
      folders.load_folder_dataset(f"folder:{tmp_path}")
  finally:
    Image.MAX_IMAGE_PIXELS = limit
