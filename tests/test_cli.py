"""The `flaxzoo` command line, each test in a new process as a user would run it."""

import json

import pytest
from conftest import run_cli, tree_snapshot


def error_lines(result):
  return [line for line in result.stderr.splitlines() if line.startswith("flaxzoo: error:")]


def assert_one_clear_error(result, *fragments):
  assert result.returncode == 2, result.stderr
  lines = error_lines(result)
  assert len(lines) == 1, result.stderr
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0]


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


def test_models_lists_names_and_parameter_counts():
  result = run_cli("models", "--json")
  assert result.returncode == 0, result.stderr
  rows = {row["name"]: row for row in json.loads(result.stdout.splitlines()[-1])}
  assert {"convnet", "mlp"} <= set(rows)
  assert rows["mlp"]["params"] == 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
  assert rows["convnet"]["description"]
  assert "convnet" in run_cli("models", "conv*").stdout


def test_train_reaches_a_sane_accuracy_and_eval_agrees(trained_workdir, mnist_data_dir):
  records = [json.loads(l) for l in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
  test = [r for r in records if r["split"] == "test"]
  assert len(test) == 1 and test[0]["step"] == 32 and test[0]["epoch"] == 1
  assert test[0]["accuracy"] > 0.9  # 32 steps of batch 128 on real MNIST
  assert all({"step", "epoch", "split", "loss", "accuracy"} <= set(r) for r in records)

  result = run_cli("eval", "--workdir", trained_workdir, "--data-dir", mnist_data_dir, "--json")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["accuracy"] == pytest.approx(test[0]["accuracy"], abs=1e-9)
  assert report["num_examples"] == 2000 and report["step"] == 32
  assert report["loss"] == pytest.approx(test[0]["loss"], rel=1e-5)


def test_train_again_on_a_finished_run_says_so(trained_workdir, mnist_data_dir):
  before = tree_snapshot(trained_workdir)
  result = run_cli("train", "--workdir", trained_workdir, "--data-dir", mnist_data_dir)
  assert result.returncode == 0, result.stderr
  assert "already trained" in result.stdout
  assert tree_snapshot(trained_workdir) == before


def test_train_on_another_models_checkpoint_is_refused(trained_workdir, mnist_data_dir):
  before = tree_snapshot(trained_workdir)
  result = run_cli("train", "--model", "mlp", "--workdir", trained_workdir, "--data-dir", mnist_data_dir)
  assert_one_clear_error(result, "another run", "'convnet' -> 'mlp'")
  assert tree_snapshot(trained_workdir) == before


def test_unknown_model(tmp_path):
  result = run_cli("train", "--model", "resnet9000", "--workdir", tmp_path / "w")
  assert_one_clear_error(result, "unknown model 'resnet9000'", "convnet", "mlp")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--batch-size", "-1"], "batch_size must be at least 1"),
    (["--learning-rate", "-1"], "learning_rate must be greater than 0"),
    (["--set", "epoch=2"], "unknown config field 'epoch'"),
    (["--set", "batch_size=\"big\""], "'batch_size' must be int"),
])
def test_bad_training_settings(tmp_path, args, fragment):
  result = run_cli("train", "--workdir", tmp_path / "w", *args)
  assert_one_clear_error(result, fragment)
  assert not (tmp_path / "w").exists()


def test_missing_raw_data_says_which_files_and_where(tmp_path):
  empty = tmp_path / "raw"
  empty.mkdir()
  result = run_cli("train", "--workdir", tmp_path / "w", "--data-dir", tmp_path / "tfds",
                   "--manual-dir", empty)
  assert_one_clear_error(result, "train-images-idx3-ubyte.gz", str(empty), "--manual-dir")
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("make_dir", [False, True])
def test_eval_without_a_checkpoint(tmp_path, make_dir):
  workdir = tmp_path / "w"
  if make_dir:
    workdir.mkdir()
  result = run_cli("eval", "--workdir", workdir)
  assert_one_clear_error(result, str(workdir), "flaxzoo train --workdir")
  assert workdir.exists() == make_dir and (not make_dir or not any(workdir.iterdir()))


def test_unknown_model_suggests_the_close_name(tmp_path):
  result = run_cli("train", "--model", "convnt", "--workdir", tmp_path / "w")
  assert_one_clear_error(result, "unknown model 'convnt'", "convnet")
  assert not (tmp_path / "w").exists()


def test_unknown_dataset_suggests_the_close_name(tmp_path):
  result = run_cli("train", "--dataset", "mnits", "--workdir", tmp_path / "w",
                   "--data-dir", tmp_path / "tfds")
  assert_one_clear_error(result, "unknown dataset 'mnits'", "Did you mean", "mnist")
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def test_train_on_another_datasets_checkpoint_is_refused(trained_workdir, mnist_data_dir):
  before = tree_snapshot(trained_workdir)
  result = run_cli("train", "--dataset", "fashion_mnist", "--workdir", trained_workdir,
                   "--data-dir", mnist_data_dir)
  assert_one_clear_error(result, "another run", "dataset: 'mnist' -> 'fashion_mnist'")
  assert tree_snapshot(trained_workdir) == before


def test_workdir_that_cannot_be_written(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a folder")
  result = run_cli("train", "--workdir", blocker / "run")
  assert_one_clear_error(result, f"cannot write to workdir {blocker / 'run'}", "--workdir")
  assert blocker.read_text() == "not a folder"


def test_raw_file_with_a_wrong_checksum(tmp_path, mnist_raw_dir):
  import shutil
  raw = tmp_path / "raw"
  shutil.copytree(mnist_raw_dir, raw)
  with open(raw / "t10k-labels-idx1-ubyte.gz", "ab") as f:
    f.write(b"\0")
  result = run_cli("train", "--workdir", tmp_path / "w", "--data-dir", tmp_path / "tfds",
                   "--manual-dir", raw)
  assert_one_clear_error(result, str(raw / "t10k-labels-idx1-ubyte.gz"), "has sha256",
                         "but tfds expects", "replace it with the original file")
  assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def test_eval_skips_a_damaged_newest_checkpoint(tmp_path, trained_workdir, mnist_data_dir):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  (workdir / "32" / "card" / "metadata").write_text("{")  # a card cut short
  result = run_cli("eval", "--workdir", workdir, "--data-dir", mnist_data_dir, "--step", 32)
  assert_one_clear_error(result, f"checkpoint {workdir}/32 is unreadable", "card cannot be read")


def test_eval_falls_back_from_a_damaged_newest_checkpoint(tmp_path, trained_workdir, mnist_data_dir):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  data_files = [p for p in (workdir / "32" / "state").rglob("d/*") if p.is_file()]
  for path in data_files:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  result = run_cli("eval", "--workdir", workdir, "--data-dir", mnist_data_dir, "--json")
  assert result.returncode == 0, result.stderr
  warnings = [l for l in result.stderr.splitlines() if "unreadable" in l]
  assert len(warnings) == 1 and f"checkpoint {workdir}/32 is unreadable" in warnings[0]
  assert "Traceback" not in result.stderr and "Event loop" not in result.stderr, result.stderr
  assert json.loads(result.stdout.splitlines()[-1])["step"] == 16


def test_unknown_named_config(tmp_path):
  result = run_cli("train", "--config", "fastest", "--workdir", tmp_path / "w")
  assert_one_clear_error(result, "unknown --config 'fastest'", "fast")
  assert not (tmp_path / "w").exists()
