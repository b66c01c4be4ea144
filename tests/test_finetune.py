"""Fine-tuning: head surgery, shape errors, freezing, lineage, image folders, predict, eval files.

A tiny ConvNet trained on real MNIST is the source; the image folder is written in the test from
real MNIST digits (as 32x32 RGB PNGs, so every image needs converting to the model's input)."""

import dataclasses
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import generated_images, write_checkpoint
from PIL import Image

from flaxzoo import data, models, training
from flaxzoo.data import folders
from flaxzoo.training import checkpoint, cli
from flaxzoo.training.config import Config, ConfigError
from flaxzoo.training.optimizer import param_groups
from flaxzoo.training.pretrained import load_pretrained
from flaxzoo.training.state import create_train_state

TINY = {"widths": [4, 8], "hidden": 16}
DIGIT_NAMES = ["zero", "one", "two", "three", "four"]


def bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def run_main(capsys, *argv):
  """`flaxzoo ARGV` in this process (the console script's own entry point)."""
  status = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(argv, status, out, err)


@pytest.fixture(scope="module")
def source(tiny_mnist_run) -> Path:
  """A tiny ConvNet trained for one short epoch on real MNIST (conftest's `tiny_mnist_run`)."""
  return tiny_mnist_run


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, mnist_data_dir) -> Path:
  """PATH/{train,test}/<digit name>/*.png: 12 train and 4 test images of the digits 0-4."""
  root = tmp_path_factory.mktemp("folder") / "digits"
  images, labels = data.load_split("mnist", "test", mnist_data_dir, limit=400)
  for digit, name in enumerate(DIGIT_NAMES):
    picks = np.flatnonzero(labels == digit)[:16]
    for i, index in enumerate(picks):
      split = "train" if i < 12 else "test"
      (root / split / name).mkdir(parents=True, exist_ok=True)
      rgb = Image.fromarray(images[index, ..., 0]).convert("RGB").resize((32, 32))
      rgb.save(root / split / name / f"{index}.png")
  return root


def test_same_classes_load_every_array(source):
  model = models.create_model("convnet", num_classes=10, **TINY)
  variables, report = load_pretrained(source, model)
  _, saved, _ = checkpoint.load_checkpoint(source)
  assert report.reinitialized == []
  assert sorted(report.loaded) == report.loaded and "head/kernel" in report.loaded
  assert jax.tree.all(jax.tree.map(bits_equal, variables, saved))


def test_head_is_reinitialised_when_the_class_count_changes(source):
  model = models.create_model("convnet", num_classes=5, **TINY)
  variables, report = load_pretrained(source, model, seed=1)
  _, saved, _ = checkpoint.load_checkpoint(source)
  assert report.reinitialized == ["head/bias", "head/kernel"]
  assert report.loaded == ["Conv_0/bias", "Conv_0/kernel", "Conv_1/bias", "Conv_1/kernel",
                           "Dense_0/bias", "Dense_0/kernel"]
  assert report.head["how"] == "re-initialised"
  assert "the checkpoint has 10 classes, the model 5" in report.head["summary"]
  params = variables["params"]
  assert params["head"]["kernel"].shape == (16, 5)
  for module in ("Conv_0", "Conv_1", "Dense_0"):
    assert jax.tree.all(jax.tree.map(bits_equal, params[module], saved["params"][module]))


def test_any_other_shape_mismatch_lists_each_path_with_both_shapes(source):
  model = models.create_model("convnet", num_classes=10, widths=[4, 8], hidden=32)
  with pytest.raises(checkpoint.CheckpointError) as error:
    load_pretrained(source, model)
  message = str(error.value)
  assert "Dense_0/kernel: checkpoint (392, 16), model (392, 32)" in message
  assert "Dense_0/bias: checkpoint (16,), model (32,)" in message
  assert "head/kernel: checkpoint (16, 10), model (32, 10)" in message  # same class count
  assert "Conv_0" not in message


def test_freeze_patterns_label_parameters_and_reject_mistakes():
  model = models.create_model("convnet", **TINY)
  params = create_train_state(model, Config(), (28, 28, 1), 10).params
  labels = param_groups(params, "Conv_*, Dense_0/bias")
  assert labels["Conv_0"]["kernel"] == labels["Conv_1"]["bias"] == "frozen"
  assert labels["Dense_0"] == {"kernel": "backbone", "bias": "frozen"}
  assert labels["head"] == {"kernel": "head", "bias": "head"}
  with pytest.raises(ConfigError, match="'Conv_9' matches no parameter.*Conv_0, Conv_1, Dense_0, head"):
    param_groups(params, "Conv_9")
  with pytest.raises(ConfigError, match="freezes every parameter"):
    param_groups(params, "*")


def test_frozen_backbone_stays_bitwise_unchanged_and_lineage_is_recorded(source, digit_folder,
                                                                         tmp_path):
  workdir = tmp_path / "ft"
  state = training.finetune(source, f"folder:{digit_folder}", workdir, freeze="backbone",
                            head_learning_rate=1e-2, epochs=3, batch_size=20)
  _, saved, source_card = checkpoint.load_checkpoint(source)
  for module in ("Conv_0", "Conv_1", "Dense_0"):
    assert jax.tree.all(jax.tree.map(bits_equal, state.params[module], saved["params"][module]))
  assert int(state.step) == 9
  card = checkpoint.read_card(workdir)
  lineage = card["lineage"]
  assert lineage["source_workdir"] == str(source.absolute())
  assert lineage["source_step"] == source_card["step"]
  assert lineage["source_dataset"] == "mnist"
  assert lineage["reinitialized"] == ["head/bias", "head/kernel"]
  assert lineage["frozen"] == ["Conv_0/bias", "Conv_0/kernel", "Conv_1/bias", "Conv_1/kernel",
                               "Dense_0/bias", "Dense_0/kernel"]
  assert card["dataset"]["class_names"] == sorted(DIGIT_NAMES)
  assert card["input_shape"] == [28, 28, 1]  # the source model's, not the folder's 32x32 RGB


def test_unfrozen_finetune_changes_every_layer(source, digit_folder, tmp_path):
  state = training.finetune(source, f"folder:{digit_folder}", tmp_path / "ft", epochs=1,
                            batch_size=20, learning_rate=1e-3)
  _, saved, _ = checkpoint.load_checkpoint(source)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]]
  assert len(paths) == 8  # the kernel and bias of Conv_0, Conv_1, Dense_0 and the head
  changed = jax.tree.map(lambda new, old: not bits_equal(new, old), state.params, saved["params"])
  assert all(jax.tree.leaves(changed)), changed


def test_folder_layouts_and_held_out_fraction(digit_folder, tmp_path):
  full = folders.load_folder_dataset(f"folder:{digit_folder}")
  assert full.info.class_names == tuple(sorted(DIGIT_NAMES))
  assert full.info.image_shape == (32, 32, 3)  # the folder's own when nothing else is asked
  assert full.info.num_examples == {"train": 60, "test": 20}
  flat = folders.load_folder_dataset(f"folder:{digit_folder / 'train'}", image_shape=(28, 28, 1),
                                     test_fraction=0.25)
  train_files, test_files = set(flat.info.files["train"]), set(flat.info.files["test"])
  assert flat.splits["train"].images.shape[1:] == (28, 28, 1)
  assert len(train_files | test_files) == 60 and not train_files & test_files
  assert 5 <= len(test_files) <= 25  # about 25 % of 60: each file by the hash of its path
  assert set(flat.splits["train"].labels.tolist()) == set(range(5))  # every class trains
  assert flat.info.split_rule.startswith("held out by hash")
  with pytest.raises(data.DataError, match="does not exist"):
    folders.load_folder_dataset(f"folder:{tmp_path / 'missing'}")


def test_a_damaged_image_in_a_folder_is_named(digit_folder, tmp_path):
  import shutil
  root = tmp_path / "copy"
  shutil.copytree(digit_folder, root)
  bad = root / "train" / "one" / "broken.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(data.DataError, match="broken.png"):
    folders.load_folder_dataset(f"folder:{root}")


def test_cli_finetune_predict_and_eval_on_an_image_folder(source, digit_folder, tmp_path, capsys):
  workdir = tmp_path / "ft-cli"
  result = run_main(capsys, "finetune", "--from", source, "--dataset", f"folder:{digit_folder}",
                    "--workdir", workdir, "--freeze", "Conv_0", "--epochs", "2", "--batch-size", "20")
  assert result.returncode == 0, result.stderr
  assert "loaded (6): Conv_0/bias, Conv_0/kernel" in result.stdout
  assert "re-initialised (2): head/bias, head/kernel" in result.stdout
  assert "frozen (2): Conv_0/bias, Conv_0/kernel" in result.stdout
  assert "converting images to 28x28 grayscale" in result.stderr
  assert result.stderr.count("converting images") == 1

  again = run_main(capsys, "finetune", "--from", source, "--dataset", f"folder:{digit_folder}",
                   "--workdir", workdir, "--freeze", "Conv_0", "--epochs", "2", "--batch-size", "20")
  assert again.returncode == 0 and "already trained" in again.stdout

  test_images = sorted((digit_folder / "test").rglob("*.png"))
  not_an_image = tmp_path / "notes.png"
  not_an_image.write_text("hello")
  result = run_main(capsys, "predict", "--workdir", workdir, *test_images[:3], not_an_image, test_images[-1],
                    "--top-k", "2", "--json")
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("flaxzoo: error:")]
  assert len(errors) == 1 and "notes.png" in errors[0]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert [p["file"] for p in out["predictions"]] == [str(p) for p in test_images[:3] + [test_images[-1]]]
  for prediction in out["predictions"]:
    assert len(prediction["top_k"]) == 2
    assert {c["class"] for c in prediction["top_k"]} <= set(DIGIT_NAMES)
    assert prediction["top_k"][0]["probability"] >= prediction["top_k"][1]["probability"]

  result = run_main(capsys, "eval", "--workdir", workdir, "--json")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["num_examples"] == 20
  assert set(report["per_class_accuracy"]) == set(DIGIT_NAMES)
  assert np.array(report["confusion_matrix"]).sum() == 20
  assert json.loads((workdir / "eval-test.json").read_text())["accuracy"] == report["accuracy"]
  with Image.open(workdir / "confusion-test.png") as png:
    assert png.format == "PNG"


def test_cli_finetune_reports_a_missing_source_in_one_line(tmp_path, capsys):
  result = run_main(capsys, "finetune", "--from", tmp_path / "nothing", "--dataset", "fashion_mnist")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("flaxzoo: error:") and len(result.stderr.splitlines()) == 1
  assert "does not exist" in result.stderr


def test_fashion_mnist_prepared_beside_mnist_has_its_own_pixels(mnist_data_dir, mnist_raw_dir):
  """tfds reuses an extracted file of the same name: fashion_mnist must not get mnist's pixels."""
  fashion_raw = mnist_raw_dir.parent / "fashion_mnist"
  if not (fashion_raw / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"no Fashion-MNIST raw files in {fashion_raw}")
  fashion = data.load_dataset("fashion_mnist", mnist_data_dir, str(fashion_raw), splits=("test",),
                              limits={"test": 1000})
  assert fashion.info.class_names[0] == "T-shirt/top"
  fashion_images, fashion_labels = fashion.splits["test"].arrays()
  mnist_images, mnist_labels = data.load_split("mnist", "test", mnist_data_dir, limit=1000)
  assert not np.array_equal(fashion_labels, mnist_labels)
  assert not np.array_equal(fashion_images, mnist_images)


def test_cli_finetune_refuses_a_bad_freeze_pattern_before_loading_data(source, tmp_path, capsys):
  workdir = tmp_path / "never"
  result = run_main(capsys, "finetune", "--from", source, "--dataset", "folder:/nonexistent/images",
                    "--workdir", workdir, "--freeze", "Conv_7")
  assert result.returncode == 2
  assert result.stderr.strip() == ("flaxzoo: error: --freeze pattern 'Conv_7' matches no parameter; "
                                   "parameter paths are MODULE/NAME with modules Conv_0, Conv_1, "
                                   "Dense_0, head")
  assert not workdir.exists()


def test_evaluate_counts_the_confusion_matrix_of_its_predictions(source, mnist_data_dir):
  """The on-device confusion matrix (padded, masked last batch) against one built from predict."""
  from flaxzoo.training import metrics
  model, variables, card = checkpoint.load_checkpoint(source)
  images, labels = data.load_split("mnist", "test", mnist_data_dir, limit=250)
  names = card["dataset"]["class_names"]
  result = training.evaluate(model, variables, (images, labels), 100, names)  # 100+100+50 padded
  predicted = training.predict_arrays(model, variables, images).argmax(1)
  expected = metrics.confusion_matrix(labels, predicted, 10)
  assert result["confusion_matrix"] == expected.tolist()
  assert result["num_examples"] == 250
  assert result["accuracy"] == pytest.approx(np.mean(predicted == labels))
  assert result["macro_f1"] == metrics.classification_metrics(expected, names)["macro_f1"]


# --- the head follows the class names -------------------------------------------------------------

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def named_source(tmp_path_factory) -> Path:
  """A checkpoint of a tiny ConvNet whose classes are named zero ... nine (generated data)."""
  workdir = tmp_path_factory.mktemp("named") / "source"
  write_checkpoint(workdir, class_names=NAMES, steps=3, **TINY)
  return workdir


def head_logits(workdir, names, **options):
  """Logits of the model `load_pretrained` builds for classes `names`, and of the source model."""
  model = models.create_model("convnet", num_classes=len(names), **TINY)
  variables, report = load_pretrained(workdir, model, class_names=names, **options)
  source_model, source_variables, _ = checkpoint.load_checkpoint(workdir)
  images = generated_images(8)[0].astype(np.float32) / 255
  return (np.asarray(model.apply(variables, images)), np.asarray(source_model.apply(source_variables, images)),
          report)


def test_same_names_in_another_order_keep_the_head_with_its_rows_permuted(named_source):
  order = sorted(NAMES)  # eight, five, four, nine, ...: how folders named after the digits sort
  new, old, report = head_logits(named_source, order)
  np.testing.assert_array_equal(new, old[:, [NAMES.index(name) for name in order]])
  assert report.head["how"] == "reordered" and report.head["rows"]["eight"] == "eight"
  assert report.head["summary"] == "head rows reordered to the new dataset's classes"
  assert "head/kernel" in report.loaded and report.reinitialized == []
  new, old, report = head_logits(named_source, NAMES)  # the same order: the head as it is
  np.testing.assert_array_equal(new, old)
  assert report.head["how"] == "kept"


def test_other_names_reinitialise_the_head_and_say_why(named_source):
  digits = [str(i) for i in range(10)]
  new, old, report = head_logits(named_source, digits)
  assert report.head["how"] == "re-initialised" and report.reinitialized == ["head/bias", "head/kernel"]
  assert report.head["summary"].startswith("re-initialised: the checkpoint's classes (zero, one, two, three, …) "
                                           "are not this dataset's (0, 1, 2, 3, …)")
  assert not np.allclose(new, old)
  kept, _, report = head_logits(named_source, digits, head="keep")  # as before names were compared
  np.testing.assert_array_equal(kept, old)
  assert report.head["how"] == "kept"
  assert head_logits(named_source, NAMES, head="reinit")[2].head["how"] == "re-initialised"


def test_a_class_map_keeps_the_mapped_rows(named_source):
  digits = [str(i) for i in range(10)]
  new, old, report = head_logits(named_source, digits, class_map={"7": "seven", "3": "three"})
  np.testing.assert_array_equal(new[:, 7], old[:, 7])
  np.testing.assert_array_equal(new[:, 3], old[:, 3])
  assert not np.allclose(new[:, 0], old[:, 0])  # unmapped: fresh
  assert report.head["how"] == "partly kept" and report.head["rows"]["7"] == "seven"
  assert report.head["rows"]["0"] is None
  full = {str(i): name for i, name in enumerate(NAMES)}
  new, old, report = head_logits(named_source, digits, class_map=full)
  np.testing.assert_array_equal(new, old)


def test_a_class_map_naming_no_class_is_one_error(named_source):
  with pytest.raises(ConfigError, match=r"--class-map names classes that do not exist: 11 not a class of the "
                                        r"new dataset .*; seventeen not a class of the checkpoint"):
    head_logits(named_source, [str(i) for i in range(10)], class_map={"11": "one", "7": "seventeen"})


def test_cli_class_map_error_exits_2_and_writes_nothing(source, digit_folder, tmp_path, capsys):
  class_map = tmp_path / "map.json"
  class_map.write_text(json.dumps({"zero": "0", "eleven": "1"}))
  result = run_main(capsys, "finetune", "--from", source, "--dataset", f"folder:{digit_folder}",
                    "--workdir", tmp_path / "ft", "--class-map", class_map, "--batch-size", "20")
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("flaxzoo: error:")]
  assert len(errors) == 1 and "eleven not a class of the new dataset (four, one, three, two, zero)" in errors[0]
  assert "Traceback" not in result.stderr and not (tmp_path / "ft").exists()
  class_map.write_text("{not json")
  result = run_main(capsys, "finetune", "--from", source, "--dataset", f"folder:{digit_folder}",
                    "--workdir", tmp_path / "ft", "--class-map", class_map)
  assert result.returncode == 2 and "is not JSON" in result.stderr and not (tmp_path / "ft").exists()


def test_cli_class_map_keeps_the_rows_through_a_finetune(source, digit_folder, tmp_path, capsys):
  class_map = tmp_path / "map.json"
  class_map.write_text(json.dumps({name: str(digit) for digit, name in enumerate(DIGIT_NAMES)}))
  result = run_main(capsys, "finetune", "--from", source, "--dataset", f"folder:{digit_folder}",
                    "--workdir", tmp_path / "ft", "--class-map", class_map, "--epochs", "1", "--batch-size", "20")
  assert result.returncode == 0, result.stderr
  assert "head: kept the rows of the new dataset's 5 classes (of the checkpoint's 10), in its order" in result.stdout
  card = checkpoint.read_card(tmp_path / "ft")
  assert card["lineage"]["head"]["rows"] == {"four": "4", "one": "1", "three": "3", "two": "2", "zero": "0"}
  assert card["config"]["class_map"] == json.loads(class_map.read_text())


def test_a_source_step_deleted_meanwhile_is_replaced_by_the_newest(source, digit_folder, tmp_path, capsys):
  """A source still training deletes old steps: the step chosen when the fine-tune began (here one
  that is no longer on disk) gives way to the source's newest, said in one line."""
  newest = checkpoint.read_card(source)["step"]
  config = training.finetuning.finetune_config(checkpoint.read_card(source), source,
                                               f"folder:{digit_folder}", epochs=1, batch_size=20)
  config = dataclasses.replace(config, init_step=newest - 1)  # what retention removed
  training.train_and_evaluate(config, tmp_path / "ft")
  assert f"step {newest - 1} of {source.absolute()} is gone" in capsys.readouterr().err
  card = checkpoint.read_card(tmp_path / "ft")
  assert card["config"]["init_step"] == card["lineage"]["source_step"] == newest


def test_eval_on_a_folder_that_changed_says_what_changed(source, digit_folder, tmp_path, capsys):
  import shutil
  root = tmp_path / "digits"
  shutil.copytree(digit_folder, root)
  workdir = tmp_path / "ft"
  training.finetune(source, f"folder:{root}", workdir, epochs=1, batch_size=20)
  card = checkpoint.read_card(workdir)
  assert card["dataset"]["split_rule"] == "PATH/train/ and PATH/test/ folders"
  recorded = json.loads((workdir / "dataset-files.json").read_text())
  assert len(recorded["test"]) == card["dataset"]["num_examples"]["test"] == 20
  one = root / "test" / "one"
  first, second = sorted(one.iterdir())[:2]
  shutil.copy(first, one / "copy-a.png")
  shutil.copy(first, one / "copy-b.png")
  second.unlink()
  capsys.readouterr()
  result = run_main(capsys, "eval", "--workdir", workdir, "--json")
  assert result.returncode == 0, result.stderr
  assert "changed since training: its test split has 2 new and 1 gone files" in result.stderr


def test_a_moved_image_folder_is_followed_by_eval_and_train(digit_folder, tmp_path, capsys):
  import shutil
  old, new = tmp_path / "old" / "digits", tmp_path / "new" / "digits"
  shutil.copytree(digit_folder, old)
  workdir = tmp_path / "run"
  config = Config(dataset=f"folder:{old}", model_kwargs=TINY, epochs=1, batch_size=20)
  training.train_and_evaluate(config, workdir)
  before = training.evaluate_checkpoint(workdir, save=False)
  shutil.move(old, new)

  result = run_main(capsys, "eval", "--workdir", workdir, "--json")
  assert result.returncode == 2 and "does not exist" in result.stderr
  result = run_main(capsys, "eval", "--workdir", workdir, "--dataset", f"folder:{new}", "--json")
  assert result.returncode == 0, result.stderr
  after = json.loads(result.stdout.splitlines()[-1])
  assert after["accuracy"] == before["accuracy"] and after["dataset"] == f"folder:{new}"

  result = run_main(capsys, "train", "--workdir", workdir, "--dataset", f"folder:{new}", "--epochs", "2")
  assert result.returncode == 0, result.stderr
  assert f"continuing with folder:{new}" in result.stderr
  card = checkpoint.read_card(workdir)
  assert card["config"]["dataset"] == f"folder:{new}"
  assert card["dataset_moves"] == [{"from": f"folder:{old}", "to": f"folder:{new}", "step": 3}]

  other = tmp_path / "other"
  shutil.copytree(new, other)
  shutil.rmtree(other / "train" / "one")
  shutil.rmtree(other / "test" / "one")
  result = run_main(capsys, "eval", "--workdir", workdir, "--dataset", f"folder:{other}")
  assert result.returncode == 2 and "the checkpoint was trained on" in result.stderr
