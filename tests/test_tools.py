"""The tools JAX users already run: TensorBoard event files, jax.profiler traces, TOML config
files, and the zoo's models as Flax NNX modules."""

import functools
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, assert_one_clear_error, assert_tensorboard_equals_metrics, run_main, write_checkpoint
from PIL import Image

from flaxzoo import models, training
from flaxzoo.training import checkpoint, configs
from flaxzoo.training.config import Config, ConfigError

TINY = {"widths": [4, 8], "hidden": 16}


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
  """An image folder of three learnable classes (horizontal, vertical, diagonal stripes), 24
  grayscale 28x28 PNGs each, with noise."""
  root = tmp_path_factory.mktemp("stripes")
  rng = np.random.default_rng(0)
  grid = np.indices((28, 28))
  patterns = {"horizontal": grid[0] % 4 < 2, "vertical": grid[1] % 4 < 2,
              "diagonal": (grid[0] + grid[1]) % 4 < 2}
  for name, pattern in patterns.items():
    (root / name).mkdir()
    for i in range(24):
      pixels = np.clip(pattern * 200 + rng.integers(0, 56, (28, 28)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
  return root


def short_run_flags(folder, workdir):
  return ["--workdir", workdir, "--dataset", f"folder:{folder}", "--epochs", 1, "--batch-size", 8,
          "--set", f"model_kwargs={json.dumps(TINY)}", "--set", "train_examples=24"]


@pytest.mark.slow  # two short trainings, a profiler start (~25 s); the kill -9 test covers resume too
def test_tensorboard_scalars_a_profile_and_a_resume(tmp_path, stripes):
  config = Config(dataset=f"folder:{stripes}", model_kwargs=TINY, epochs=2, batch_size=8,
                  log_every_steps=2, checkpoint_every_steps=3, keep_checkpoints=10, profile_steps="2:3")
  training.train_and_evaluate(config, tmp_path)
  assert_tensorboard_equals_metrics(tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "test"}
  assert all(r["learning_rate"] > 0 for r in records if r["split"] == "train")

  xplanes = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(xplanes) == 1 and xplanes[0].stat().st_size > 10_000
  summary = subprocess.run([sys.executable, ROOT / "scripts" / "profile_summary.py", tmp_path],
                           capture_output=True, text=True, check=True).stdout
  assert "traced steps: 2," in summary and "XLA kernel time" in summary

  first, *later = checkpoint.saved_steps(tmp_path)
  for step in later:  # as if the run had died after its first checkpoint
    shutil.rmtree(tmp_path / str(step))
  training.train_and_evaluate(config, tmp_path)
  assert len(list((tmp_path / "tensorboard").iterdir())) == 2
  assert_tensorboard_equals_metrics(tmp_path)  # the first run's points past step 3: purged


@pytest.mark.slow  # two short trainings
def test_config_file_reproduces_the_named_config(tmp_path, stripes, capsys):
  by_name, by_file = tmp_path / "by-name", tmp_path / "by-file"
  assert run_main(capsys, "train", "--config", "fast", *short_run_flags(stripes, by_name))[0] == 0
  assert run_main(capsys, "train", "--config", ROOT / "configs" / "fast.toml",
                  *short_run_flags(stripes, by_file))[0] == 0
  card_name, card_file = checkpoint.read_card(by_name), checkpoint.read_card(by_file)
  assert card_name["config"] == card_file["config"]
  assert card_name["config"]["config_file"] == str(ROOT / "configs" / "fast.toml")
  assert card_name["config"]["learning_rate"] == 2e-2  # from the file
  for card in (card_name, card_file):
    card["metrics"]["train"].pop("img_per_s")
  assert card_name == card_file
  _, variables_name, _ = training.load_checkpoint(by_name)
  _, variables_file, _ = training.load_checkpoint(by_file)
  assert jax.tree.all(jax.tree.map(np.array_equal, variables_name, variables_file))


def test_every_named_config_is_a_file_that_loads():
  assert configs.config_names()[0] == "fast"
  recipes = {"mnist_convnet", "mnist_convnet_large", "mnist_convnet_wide", "mnist_convnet_vgg",
             "mnist_lenet5", "mnist_resnet", "mnist_vit_tiny", "fashion_convnet", "fashion_convnet_large",
             "fashion_convnet_vgg", "mnist_convnet_60s", "mnist_lenet5_60s", "mnist_resnet_60s",
             "mnist_vit_tiny_60s", "fashion_convnet_60s"}
  assert set(configs.config_names()) == {"fast", *recipes, *models.list_models()}
  for name in configs.config_names():
    config = configs.named_config(name)
    assert config.config_file == str(ROOT / "configs" / f"{name}.toml")
  assert configs.named_config("vit_tiny").augment == "shift"
  assert configs.default_config("lenet5").epochs == 5  # a model's recipe without --config too


def test_a_user_config_file_with_tables_and_flags_on_top(tmp_path):
  path = tmp_path / "my.toml"
  path.write_text('model = "lenet5"\nlearning_rate = 3e-3\n\n[model_kwargs]\nwidths = [4, 8]\n')
  config = configs.named_config(str(path), epochs=1)
  assert (config.model, config.learning_rate, config.epochs) == ("lenet5", 3e-3, 1)
  assert config.model_kwargs == {"widths": [4, 8]} and config.config_file == str(path)


@pytest.mark.parametrize("text, fragment", [
    ("epoch = 3\n", "unknown config field 'epoch'. Did you mean epochs?"),
    ('batch_size = "big"\n', "'batch_size' must be int"),
    ("epochs = \n", "is not valid TOML"),
    ("learning_rate = -1.0\n", "learning_rate must be a finite number greater than 0"),
])
def test_bad_config_files_are_one_line_and_create_nothing(tmp_path, capsys, text, fragment):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  result = run_main(capsys, "train", "--config", path, "--workdir", tmp_path / "w")
  assert_one_clear_error(result, fragment)
  assert not (tmp_path / "w").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
  result = run_main(capsys, "train", "--config", tmp_path / "none.toml", "--workdir", tmp_path / "w")
  assert_one_clear_error(result, "cannot read config file", "none.toml")
  with pytest.raises(ConfigError, match="unknown --config 'fastest'"):
    configs.named_config("fastest")


SMALL = {"convnet": TINY, "lenet5": {}, "mlp": {"hidden": [32]}, "resnet": {"widths": [4, 8, 8]},
         "vit_tiny": {"stem_widths": [4, 8, 8], "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16}}


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name == "convnet" else
                                              pytest.mark.slow) for name in models.list_models()])
def test_nnx_model_from_a_checkpoint_gives_the_linen_logits(tmp_path, name):
  # A trained step moves BatchNorm's statistics away from their initial values.
  write_checkpoint(tmp_path, name, steps=1 if name == "resnet" else 0, **SMALL[name])
  linen_model, variables, _ = training.load_checkpoint(tmp_path)
  nnx_model, card = training.load_nnx_model(tmp_path)
  from flax import nnx
  images = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
  # Both jitted (eagerly, each op compiles on its own): the same linen program, so the same bits.
  expected = jax.jit(functools.partial(linen_model.apply, train=False))(variables, images)
  evaluate = nnx.jit(lambda model, images: model(images, train=False))
  np.testing.assert_array_equal(np.asarray(evaluate(nnx_model, images)), np.asarray(expected))
  if "batch_stats" in variables:
    assert jax.tree.leaves(nnx.state(nnx_model, nnx.BatchStat))
  fresh = models.create_nnx_model(name, num_classes=card["num_classes"], **SMALL[name])
  assert evaluate(fresh, images).shape == (8, card["num_classes"])


def test_nnx_finetune_script_trains_a_checkpoint(tiny_mnist_run, mnist_data_dir):
  result = subprocess.run(
      [sys.executable, ROOT / "scripts" / "nnx_finetune.py", "--from", tiny_mnist_run, "--dataset",
       "mnist", "--data-dir", mnist_data_dir, "--train-examples", "1024", "--batch-size", "64"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr
  before, after = (float(line.rsplit(" ", 1)[1].rstrip("%")) for line in result.stdout.splitlines()[-2:])
  assert "16 NNX steps" in result.stdout and after > before
