"""The `flaxzoo` command line. Argument and error handling in-process (`cli.main(argv)`, as the
console script calls it); a real training run and what follows it in new processes, as a user
would run them (slow tier)."""

import hashlib
import json

import jax
import numpy as np
import pytest
from conftest import assert_one_clear_error, run_cli, run_main, tree_snapshot, write_checkpoint
from PIL import Image

from flaxzoo import data
from flaxzoo.training import cli


def test_models_lists_names_and_parameter_counts(capsys):
  status, out, _ = run_main(capsys, "models", "--json")
  assert status == 0
  rows = {row["name"]: row for row in json.loads(out.splitlines()[-1])}
  assert set(rows) == {"convnet", "lenet5", "mlp", "resnet", "vit_tiny"}
  assert rows["mlp"]["params"] == 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
  assert rows["mlp"]["train_defaults"] == {"epochs": 10, "learning_rate": 1e-3}  # configs/mlp.toml
  assert rows["convnet"]["description"] and rows["convnet"]["params"] == 206_922
  # convnet by hand: conv1 28*28*16*9*2, conv2 14*14*32*16*9*2, dense 1568*128*2, head 128*10*2.
  # XLA skips the taps that fall on SAME padding (~7 % here) and adds ReLU, pooling and biases.
  by_hand = 28 * 28 * 16 * 9 * 2 + 14 * 14 * 32 * 16 * 9 * 2 + 1568 * 128 * 2 + 128 * 10 * 2
  assert 0.9 * by_hand <= rows["convnet"]["flops_per_image"] <= 1.1 * by_hand
  assert all(row["flops_per_image"] > 0 for row in rows.values())
  assert run_main(capsys, "models", "conv*")[1].splitlines()[1].startswith("convnet")


def test_unknown_model_suggests_the_close_name(tmp_path, capsys):
  line = assert_one_clear_error(run_main(capsys, "train", "--model", "convnt", "--workdir", tmp_path / "w"),
                                "unknown model 'convnt'. Did you mean convnet?",
                                "Available models: convnet, lenet5, mlp, resnet, vit_tiny")
  assert "Did you mean" not in run_main(capsys, "train", "--model", "qqqq", "--workdir", tmp_path / "w")[2]
  assert line and not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--batch-size", "-1"], "batch_size must be at least 1"),
    (["--learning-rate", "-1"], "learning_rate must be a finite number greater than 0"),
    (["--set", "epoch=2"], "unknown config field 'epoch'. Did you mean epochs?"),
    (["--set", "batch_size=\"big\""], "'batch_size' must be int"),
    (["--set", "nothing"], "--set takes KEY=VALUE"),
    (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
    (["--seed", str(2**64)], "seed must be in [0, 2**32)"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number greater than 0"),
    (["--set", "keep_checkpoints=0"], "(set it with --set keep_checkpoints=VALUE)"),
])
def test_bad_training_settings(tmp_path, capsys, args, fragment):
  assert_one_clear_error(run_main(capsys, "train", "--workdir", tmp_path / "w", *args), fragment)
  assert not (tmp_path / "w").exists()


def test_unknown_named_config_lists_the_named_ones(tmp_path, capsys):
  assert_one_clear_error(run_main(capsys, "train", "--config", "fastest", "--workdir", tmp_path / "w"),
                         "unknown --config 'fastest'; named configs: fast, convnet, fashion_convnet, "
                         "fashion_convnet_60s, fashion_convnet_large, fashion_convnet_vgg, lenet5, mlp, "
                         "mnist_convnet, mnist_convnet_60s, mnist_convnet_large, mnist_convnet_vgg, "
                         "mnist_convnet_wide, mnist_lenet5, mnist_lenet5_60s, mnist_resnet, mnist_resnet_60s, "
                         "mnist_vit_tiny, mnist_vit_tiny_60s, resnet, vit_tiny, or the path of a .toml file")
  assert not (tmp_path / "w").exists()


def test_missing_raw_data_says_which_files_and_where(tmp_path, capsys):
  empty = tmp_path / "raw"
  empty.mkdir()
  result = run_main(capsys, "train", "--workdir", tmp_path / "w", "--data-dir", tmp_path / "tfds",
                    "--manual-dir", empty)
  line = assert_one_clear_error(result, str(empty), "--manual-dir", "FLAXZOO_MANUAL_DIR")
  assert all(name in line for name in data.raw_files("mnist"))
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def test_raw_file_with_a_wrong_checksum_names_it_and_both_sums(tmp_path, capsys):
  raw = tmp_path / "raw"
  raw.mkdir()
  for name in data.raw_files("mnist"):
    (raw / name).write_bytes(b"not mnist")
  result = run_main(capsys, "train", "--workdir", tmp_path / "w", "--data-dir", tmp_path / "tfds",
                    "--manual-dir", raw)
  expected = data.raw_files("mnist")["t10k-images-idx3-ubyte.gz"][1]
  assert_one_clear_error(result, str(raw / "t10k-images-idx3-ubyte.gz"),
                         f"has sha256 {hashlib.sha256(b'not mnist').hexdigest()} but tfds expects {expected}",
                         "replace it with the original file")
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def test_unknown_dataset_suggests_the_close_name(tmp_path, capsys):
  result = run_main(capsys, "train", "--dataset", "mnits", "--workdir", tmp_path / "w",
                    "--data-dir", tmp_path / "tfds")
  assert_one_clear_error(result, "unknown dataset 'mnits'", "Did you mean", "mnist")
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def test_workdir_that_cannot_be_written(tmp_path, capsys):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a folder")
  result = run_main(capsys, "train", "--workdir", blocker / "run")
  assert_one_clear_error(result, f"cannot write to workdir {blocker / 'run'}", "--workdir")
  assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("make_dir", [False, True])
def test_eval_without_a_checkpoint(tmp_path, capsys, make_dir):
  workdir = tmp_path / "w"
  if make_dir:
    workdir.mkdir()
  assert_one_clear_error(run_main(capsys, "eval", "--workdir", workdir), str(workdir),
                         "flaxzoo train --workdir")
  assert workdir.exists() == make_dir and (not make_dir or not any(workdir.iterdir()))


def test_no_readable_checkpoint_exits_2_and_changes_nothing(tmp_path, capsys):
  workdir = tmp_path / "w"
  write_checkpoint(workdir, widths=[4, 8], hidden=16)
  (workdir / "0" / "card" / "metadata").write_text("{")  # a card cut short
  before = tree_snapshot(workdir)
  assert_one_clear_error(run_main(capsys, "eval", "--workdir", workdir), f"no readable checkpoint in {workdir}",
                         "card cannot be read", "nothing was changed")
  assert_one_clear_error(run_main(capsys, "predict", "--workdir", workdir, tmp_path / "x.png"),
                         "no readable checkpoint")
  assert tree_snapshot(workdir) == before


def test_ctrl_c_outside_training_exits_130(tmp_path, capsys, monkeypatch):
  def interrupted(args):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli, "cmd_eval", interrupted)
  status, _, err = run_main(capsys, "eval", "--workdir", tmp_path)
  assert status == 130 and "flaxzoo: error: interrupted" in err


def test_predict_names_the_models_top_classes_for_each_files_pixels(tmp_path, capsys):
  """predict's top-k must be this model's probabilities for this file's pixels, each named by the
  card's class names (a wrong index-to-name map or file order would fail here)."""
  from flaxzoo import training
  names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  workdir = tmp_path / "w"
  write_checkpoint(workdir, class_names=names, steps=3, widths=[4, 8], hidden=16)
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  files = []
  for i, image in enumerate(pixels):
    files.append(tmp_path / f"image-{i}.png")
    Image.fromarray(image).save(files[-1])
  status, out, err = run_main(capsys, "predict", "--workdir", workdir, *files, "--json", "--top-k", 4)
  assert status == 0, err
  predictions = json.loads(out.splitlines()[-1])["predictions"]
  model, variables, _ = training.load_checkpoint(workdir)
  expected = training.predict_arrays(model, variables, pixels[..., None])
  assert [p["file"] for p in predictions] == [str(f) for f in files]
  for prediction, probabilities in zip(predictions, expected):
    best = np.argsort(-probabilities)[:4]
    assert [p["class"] for p in prediction["top_k"]] == [names[i] for i in best]
    np.testing.assert_allclose([p["probability"] for p in prediction["top_k"]], probabilities[best], rtol=1e-6)
  assert len({tuple(np.round(e, 6)) for e in expected}) == len(files)  # the files are told apart
  status, out, _ = run_main(capsys, "predict", "--workdir", workdir, files[0])
  assert status == 0 and out.count("%") == 3  # three classes by default, in the CLI and the API
  assert len(training.predict_files(workdir, [files[0]])[0][0]["top_k"]) == 3


# --- slow tier: a real `flaxzoo train` on real MNIST, and what users do with its workdir ---------------

@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, mnist_data_dir):
  """`flaxzoo train` on a 4,096-image slice of real MNIST, default ConvNet, one epoch (32 steps,
  checkpoints at steps 16 and 32)."""
  workdir = tmp_path_factory.mktemp("run") / "mnist-convnet"
  result = run_cli("train", "--workdir", workdir, "--data-dir", mnist_data_dir, "--epochs", 1,
                   "--checkpoint-every-steps", 16, "--set", "train_examples=4096",
                   "--set", "test_examples=2000")
  assert result.returncode == 0, result.stderr
  return workdir


EVAL_JSON_FIELDS = {"loss", "accuracy", "macro_f1", "num_examples", "per_class_accuracy", "per_class",
                    "class_names", "confusion_matrix", "step", "split", "dataset", "model", "workdir", "files",
                    "top5_accuracy"}  # top-5: more than 5 classes


def test_train_reaches_a_sane_accuracy_and_eval_agrees(trained_workdir, mnist_data_dir):
  records = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
  test = [r for r in records if r["split"] == "test"]
  assert len(test) == 1 and test[0]["step"] == 32 and test[0]["epoch"] == 1
  assert test[0]["accuracy"] > 0.9  # 32 steps of batch 128 on real MNIST
  assert all({"step", "epoch", "split", "loss", "accuracy"} <= set(r) for r in records)

  result = run_cli("eval", "--workdir", trained_workdir, "--data-dir", mnist_data_dir, "--json")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.splitlines()[-1])
  assert set(report) == EVAL_JSON_FIELDS
  assert report["accuracy"] == pytest.approx(test[0]["accuracy"], abs=1e-9)
  assert (report["num_examples"], report["step"], report["split"], report["dataset"], report["model"]) == (
      2000, 32, "test", "mnist", "convnet")
  assert report["loss"] == pytest.approx(test[0]["loss"], rel=1e-5)
  confusion = np.asarray(report["confusion_matrix"])
  assert confusion.shape == (10, 10) and confusion.sum() == 2000
  assert np.trace(confusion) == round(report["accuracy"] * 2000)
  assert report["class_names"] == [str(i) for i in range(10)]
  assert report["files"] == [str(trained_workdir / "eval-test.json"), str(trained_workdir / "confusion-test.png")]
  saved = json.loads((trained_workdir / "eval-test.json").read_text())
  assert saved == {k: v for k, v in report.items() if k != "files"}


def test_eval_with_flip_tta(tmp_path, trained_workdir, mnist_data_dir, capsys):
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  status, out, err = run_main(capsys, "eval", "--workdir", workdir, "--data-dir", mnist_data_dir,
                              "--tta", "flip", "--json")
  assert status == 0, err
  report = json.loads(out.splitlines()[-1])
  assert set(report) == EVAL_JSON_FIELDS | {"tta"} and report["tta"] == "flip"
  assert "accuracy (flip test-time augmentation)" in out
  test = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()][-1]
  assert test["split"] == "test" and "tta" not in test  # the run evaluated without it
  assert report["loss"] != pytest.approx(test["loss"], rel=1e-5)  # with mirrored digits: another answer


def test_train_again_on_a_finished_run_says_so(trained_workdir, mnist_data_dir):
  before = tree_snapshot(trained_workdir)
  result = run_cli("train", "--workdir", trained_workdir, "--data-dir", mnist_data_dir)
  assert result.returncode == 0, result.stderr
  assert "already trained" in result.stdout
  assert tree_snapshot(trained_workdir) == before


@pytest.mark.parametrize("flags, change", [
    (["--model", "mlp"], "'convnet' -> 'mlp'"),
    (["--dataset", "fashion_mnist"], "dataset: 'mnist' -> 'fashion_mnist'"),
])
def test_train_on_another_runs_checkpoint_is_refused(trained_workdir, mnist_data_dir, capsys, flags, change):
  before = tree_snapshot(trained_workdir)
  result = run_main(capsys, "train", *flags, "--workdir", trained_workdir, "--data-dir", mnist_data_dir)
  assert_one_clear_error(result, "another run", change)
  assert tree_snapshot(trained_workdir) == before


def test_eval_of_a_damaged_step_asked_for_by_number_is_an_error(tmp_path, trained_workdir, mnist_data_dir):
  """--step N names one checkpoint: a damaged one is reported, never replaced by another step."""
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  (workdir / "32" / "card" / "metadata").write_text("{")  # a card cut short
  result = run_cli("eval", "--workdir", workdir, "--data-dir", mnist_data_dir, "--step", 32)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("flaxzoo: error:")]
  assert len(errors) == 1 and f"checkpoint {workdir}/32 is unreadable" in errors[0]
  assert "card cannot be read" in errors[0] and "Traceback" not in result.stderr


def test_eval_falls_back_from_a_damaged_newest_checkpoint(tmp_path, trained_workdir, mnist_data_dir):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  data_files = [p for p in (workdir / "32" / "state").rglob("d/*") if p.is_file()]
  for path in data_files:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  result = run_cli("eval", "--workdir", workdir, "--data-dir", mnist_data_dir, "--json")
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stderr.splitlines() if "unreadable" in line]
  assert len(warnings) == 1 and f"checkpoint {workdir}/32 is unreadable" in warnings[0]
  assert "Traceback" not in result.stderr and "Event loop" not in result.stderr, result.stderr
  assert json.loads(result.stdout.splitlines()[-1])["step"] == 16


def test_nan_loss_exits_2_and_keeps_the_checkpoints(tmp_path, trained_workdir, mnist_data_dir, capsys):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  before = tree_snapshot(workdir)
  result = run_main(capsys, "train", "--workdir", workdir, "--data-dir", mnist_data_dir, "--epochs", 2,
                    "--learning-rate", 1e30)
  assert_one_clear_error(result, "the training loss became", f"last good checkpoint, {workdir}/32, is kept")
  assert tree_snapshot(workdir) == before


def test_not_enough_disk_space_is_refused_before_training(tmp_path, mnist_data_dir, capsys, monkeypatch):
  import collections
  import shutil
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
  result = run_main(capsys, "train", "--workdir", tmp_path / "w", "--data-dir", mnist_data_dir,
                    "--set", "train_examples=256", "--set", "test_examples=100")
  assert_one_clear_error(result, f"not enough free disk space in {tmp_path / 'w'}", "MB are free",
                         "choose another --workdir")
  assert not (tmp_path / "w").exists()  # the refused run leaves no empty workdir


@pytest.mark.parametrize("model, kwargs, fragment", [
    ("convnet", '{"widths": 8}', "model 'convnet': widths must be a non-empty list of positive integers, got 8"),
    ("convnet", '{"widths": [8, -1]}', "got [8, -1]"),
    ("convnet", '{"hidden": 0}', "model 'convnet': hidden must be a positive integer, got 0"),
    ("convnet", '{"convs_per_block": 0}', "convs_per_block must be a positive integer, got 0"),
    ("resnet", '{"depth": 9}', "model 'resnet': depth must be 6n + 2"),
    ("vit_tiny", '{"dim": 10}', "model 'vit_tiny': dim (10) must be a multiple of heads (4)"),
    ("vit_tiny", '{"dropout": 1.5}', "dropout must be a number in [0, 1), got 1.5"),
    ("vit_tiny", '{"stem": "big"}', "stem must be conv or patch"),
])
def test_model_arguments_are_checked_before_any_data(tmp_path, capsys, model, kwargs, fragment):
  result = run_main(capsys, "train", "--workdir", tmp_path / "w", "--model", model,
                    "--set", f"model_kwargs={kwargs}")
  assert_one_clear_error(result, fragment)
  assert not (tmp_path / "w").exists()


def test_model_arguments_too_big_for_the_images(tmp_path, mnist_data_dir, capsys):
  result = run_main(capsys, "train", "--workdir", tmp_path / "w", "--data-dir", mnist_data_dir,
                    "--set", "train_examples=256", "--set", 'model_kwargs={"widths": [8, 8, 8, 8, 8, 8]}')
  assert_one_clear_error(result, "model 'convnet' cannot be built with model_kwargs", "for 28x28x1 images")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--frameworks", "jax,tf"], "unknown --frameworks tf; choose among jax, torch_eager, torch_compile"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_bench_settings_are_one_line(capsys, args, fragment):
  assert_one_clear_error(run_main(capsys, "bench", *args), fragment)


def test_bench_without_torch_names_the_extra(capsys, monkeypatch):
  import importlib.util
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
  assert_one_clear_error(run_main(capsys, "bench"), "PyTorch is not installed", "--frameworks jax")


def test_free_space_counts_the_checkpoints_already_there(tmp_path, monkeypatch):
  import collections
  import shutil

  from flaxzoo.training import checkpoint
  state = write_checkpoint(tmp_path / "run", steps=0)
  for step in (1, 2):  # three committed checkpoints: as many as a run keeps
    with checkpoint.open_manager(tmp_path / "run") as manager:
      card = checkpoint.read_card(tmp_path / "run")
      checkpoint.save(manager, state.replace(step=step), {**card, "step": step}, keep=3)
      checkpoint.wait(manager)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 2 * size + (1 << 20)))
  checkpoint.check_free_space(tmp_path / "run", state, keep=3)  # one more at a time: it fits
  with pytest.raises(checkpoint.CheckpointError, match="4 more checkpoint"):
    checkpoint.check_free_space(tmp_path / "fresh", state, keep=3)


def test_predict_arrays_takes_uint8_or_unit_floats_only(tmp_path):
  from flaxzoo import training
  write_checkpoint(tmp_path / "run")
  model, variables, _ = training.load_checkpoint(tmp_path / "run")
  pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  by_uint8 = training.predict_arrays(model, variables, pixels)
  np.testing.assert_allclose(training.predict_arrays(model, variables, pixels / 255.0), by_uint8, atol=1e-6)
  with pytest.raises(data.DataError, match=r"scaled to \[0, 1\], got values in \[0, 255\]"):
    training.predict_arrays(model, variables, pixels.astype(np.float32))
  with pytest.raises(data.DataError, match="got int64"):
    training.predict_arrays(model, variables, pixels.astype(np.int64))
  assert training.predict_arrays(model, variables, pixels[:0]).shape == (0, 10)


def test_a_foreign_orbax_step_is_skipped_in_one_line_and_never_deleted(tmp_path, capsys):
  import orbax.checkpoint as ocp

  from flaxzoo.training import checkpoint
  workdir = tmp_path / "run"
  with ocp.CheckpointManager(workdir) as manager:  # another program's save, older than ours
    manager.save(1, args=ocp.args.StandardSave({"x": np.ones(3)}))
  state = write_checkpoint(workdir, steps=2)
  with ocp.CheckpointManager(workdir) as manager:  # and one newer
    manager.save(5, args=ocp.args.StandardSave({"x": np.ones(3)}))
  capsys.readouterr()
  _, _, card = checkpoint.load_checkpoint(workdir)
  assert card["step"] == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "checkpoint" in err and "/5 is unreadable: not a flaxzoo checkpoint" in err
  with checkpoint.open_manager(workdir) as manager:
    with pytest.raises(checkpoint.CheckpointError, match="step 3 was not saved: .* already holds step 5"):
      checkpoint.save(manager, state.replace(step=3), {**card, "step": 3}, keep=2)
  # Training's resume moves it (kept, in WORKDIR/unreadable/) so that its own steps can be saved.
  checkpoint.set_aside(workdir, checkpoint.restore_latest(workdir, state)[2])
  assert (workdir / "unreadable" / "5" / "default").is_dir()
  with checkpoint.open_manager(workdir) as manager:
    for step in (3, 4, 6):
      checkpoint.save(manager, state.replace(step=step), {**card, "step": step}, keep=2)
    checkpoint.wait(manager, 2)
  assert checkpoint.saved_steps(workdir) == [1, 4, 6]  # ours: the newest two; theirs: never deleted
