"""Every registered model: forward shape, a train step that learns, checkpoints with batch_stats,
deterministic eval mode, bfloat16 training; `flaxzoo models` with FLOPs; the results script on a
slice of real MNIST."""

import csv
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, generated_images

from flaxzoo import data, models
from flaxzoo.models import profile
from flaxzoo.training import checkpoint
from flaxzoo.training.config import Config, ConfigError, validate
from flaxzoo.training.configs import default_config
from flaxzoo.training.state import create_train_state
from flaxzoo.training.steps import train_step

ZOO = models.list_models()
# Each architecture's code, with ViT-tiny one block deep: six blocks cost ~4x the compilation and
# test nothing more (checkpoints and dtypes do not depend on it at all: ViT-tiny is left out there).
SMALL = {"vit_tiny": {"depth": 1}}
ZOO_CASES_NO_VIT = [name for name in ZOO if name != "vit_tiny"]
# ResNet's and ViT-tiny's train steps are the largest programs a unit test here compiles (6-8 s
# each): their train-step cases are in the full suite only; the fast tier keeps the other three.
TRAIN_STEP_CASES = [pytest.param(name, marks=pytest.mark.slow) if name in ("resnet", "vit_tiny") else name
                    for name in ZOO]


def zoo_model(name: str, **kwargs):
  return models.create_model(name, **SMALL.get(name, {}), **kwargs)


def test_the_zoo_has_the_five_architectures():
  assert set(ZOO) >= {"mlp", "lenet5", "convnet", "resnet", "vit_tiny"}
  assert models.list_models("res*") == ["resnet"]


@pytest.fixture(scope="module")
def batch():
  return generated_images(32)


@jax.jit
def train_mode_loss(state, images, labels):
  """The training loss of `state` on a batch, with a fixed dropout key (deterministic)."""
  variables = state.variables()
  mutable = ["batch_stats"] if state.batch_stats else False
  out = state.apply_fn(variables, images.astype(jnp.float32) / 255, train=True,
                       rngs={"dropout": jax.random.PRNGKey(7)}, mutable=mutable)
  logits = out[0] if mutable else out
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])


@pytest.mark.parametrize("case", TRAIN_STEP_CASES)
def test_a_train_step_lowers_the_loss_and_eval_mode_is_deterministic(case, batch):
  """One step lowers the training loss. Then in eval mode dropout is off and BatchNorm uses its
  running statistics (moved from their init by that step): an image's output is the same under
  any dropout key and whatever else is in the batch."""
  images, labels = batch
  model = zoo_model(case, num_classes=7)
  variables = models.abstract_variables(model)
  assert jax.eval_shape(model.apply, variables, images.astype(np.float32) / 255).shape == (32, 7)
  labels = labels % 7
  config = default_config(model.registered_name, learning_rate=1e-4, warmup_fraction=0.0, augment="none")
  state = create_train_state(model, config, (28, 28, 1), total_steps=100)
  before = train_mode_loss(state, images, labels)
  state, metrics = train_step(state, images, labels)
  assert np.isfinite(float(metrics["loss"]))
  assert float(train_mode_loss(state, images, labels)) < float(before)

  x = images.astype(np.float32) / 255
  apply = jax.jit(lambda v, x, key: model.apply(v, x, train=False, rngs={"dropout": key}))
  full = apply(state.variables(), x, jax.random.PRNGKey(1))
  again = apply(state.variables(), x, jax.random.PRNGKey(2))
  # The first 5 images beside 27 others (the rest, darkened: other batch statistics), at the same
  # batch size: one compiled program.
  mixed = apply(state.variables(), np.concatenate([x[:5], x[5:] * 0.5]), jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(full), np.asarray(again))
  np.testing.assert_allclose(np.asarray(full[:5]), np.asarray(mixed[:5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ZOO_CASES_NO_VIT)
def test_checkpoint_round_trip_includes_batch_stats(case, batch, tmp_path):
  images, labels = batch
  model = zoo_model(case)
  config = Config(model=model.registered_name)
  state = create_train_state(model, config, (28, 28, 1), total_steps=10)
  for _ in range(2):
    state, _ = train_step(state, images, labels)
  info = data.DatasetInfo("mnist", 10, tuple("0123456789"), (28, 28, 1), {"train": 60000, "test": 10000})
  with checkpoint.open_manager(tmp_path) as manager:
    checkpoint.save(manager, state, checkpoint.make_card(model, config, info, 2, 0.1, {}), keep=3)
    checkpoint.wait(manager)
  target = create_train_state(model, config, (28, 28, 1), total_steps=10)
  restored, card, _ = checkpoint.restore_latest(tmp_path, target)
  for part in ("params", "batch_stats", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(state, part)), jax.tree.leaves(getattr(restored, part))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if model.registered_name == "resnet":
    assert jax.tree.leaves(restored.batch_stats), "resnet must carry BatchNorm statistics"
    _, variables, _ = checkpoint.load_checkpoint(tmp_path)
    assert "batch_stats" in variables


@pytest.mark.parametrize("case", ZOO_CASES_NO_VIT)
def test_bfloat16_training_keeps_float32_parameters(case, batch):
  images, labels = batch
  model = zoo_model(case)
  state = create_train_state(model, Config(model=model.registered_name, dtype="bfloat16"), (28, 28, 1), 10)
  # The forward and backward pass compute in bfloat16 (and in float32 without it)...
  assert "bf16" in train_step.lower(state, images, labels).as_text()
  float32 = create_train_state(model, Config(model=model.registered_name), (28, 28, 1), 10)
  assert "bf16" not in train_step.lower(float32, images, labels).as_text()
  state, metrics = train_step(state, images, labels)
  assert np.isfinite(float(metrics["loss"]))
  # ...while parameters, optimizer state and BatchNorm statistics stay float32.
  dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
            if jnp.issubdtype(leaf.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype("float32")}


def test_dtype_is_checked_and_recorded_in_the_card():
  with pytest.raises(ConfigError, match="dtype must be float32 or bfloat16"):
    validate(Config(dtype="float16"))
  info = data.DatasetInfo("mnist", 10, tuple("0123456789"), (28, 28, 1), {"train": 60000, "test": 10000})
  card = checkpoint.make_card(models.create_model("convnet"), Config(dtype="bfloat16"), info, 0, 0, {})
  assert card["dtype"] == {"params": "float32", "training_compute": "bfloat16"}
  assert card["config"]["dtype"] == "bfloat16"


def test_create_model_lists_valid_arguments():
  with pytest.raises(TypeError, match="valid arguments: num_classes, depth, widths"):
    models.create_model("resnet", blocks=3)
  with pytest.raises(models.registry.ModelArgumentError, match="depth must be 6n \\+ 2"):
    models.create_model("resnet", depth=10)
  with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):  # a ResNet built directly
    models.ResNet(depth=10).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize("every_seconds, drawings", [(1e9, 1), (0, 2)])
def test_every_run_draws_its_training_curves(tmp_path, mnist_data_dir, monkeypatch, every_seconds,
                                             drawings):
  from PIL import Image

  from flaxzoo import training
  from flaxzoo.training import train
  # Redrawn at an epoch's end once CURVES_EVERY_SECONDS have passed, and always at the run's end.
  monkeypatch.setattr(train, "CURVES_EVERY_SECONDS", every_seconds)
  drawn = []
  monkeypatch.setattr(train, "draw_curves", lambda run, draw=train.draw_curves: drawn.append(draw(run)))
  config = Config(model="lenet5", data_dir=mnist_data_dir, epochs=2, batch_size=64,
                  train_examples=256, test_examples=100)
  training.train_and_evaluate(config, tmp_path)
  assert len(drawn) == drawings
  with Image.open(tmp_path / "curves.png") as png:
    assert png.format == "PNG" and png.width > 300
  from flaxzoo.training.curves import epoch_curves
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  curves = epoch_curves(records)
  assert curves["epoch"] == [1, 2]
  assert curves["test_accuracy"] == [r["accuracy"] for r in records if r["split"] == "test"]


def test_results_script_runs_end_to_end_on_a_slice(tmp_path, mnist_data_dir):
  out_csv, out_md = tmp_path / "mnist.csv", tmp_path / "results.md"
  result = subprocess.run(
      [sys.executable, "scripts/make_results.py", "--models", "mlp,lenet5", "--train-examples",
       "256", "--test-examples", "100", "--epochs", "1", "--data-dir", mnist_data_dir,
       "--workdir-root", tmp_path / "runs", "--csv", out_csv, "--markdown", out_md, "--hessian-examples", "64"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  rows = list(csv.DictReader(out_csv.open()))
  assert [r["model"] for r in rows] == ["lenet5", "mlp"]
  for row in rows:
    assert 0 <= float(row["test_accuracy"]) <= 1 and float(row["latency_ms_batch1"]) > 0
    assert float(row["hessian_top_eigenvalue"]) > 0 and float(row["hessian_trace_std_error"]) > 0
    assert int(row["params"]) == profile.param_count(models.create_model(row["model"]))
  table = out_md.read_text()
  assert "quick run" in table and "| lenet5 |" in table and "Machine:" in table
  assert "on 64 training examples" in table

  # Recipes at two seeds: their own CSV, their section added to the same page, the zoo table kept.
  recipes_csv = tmp_path / "recipes.csv"
  result = subprocess.run(
      [sys.executable, "scripts/make_results.py", "--recipes", "fast", "--seeds", "0,1",
       "--train-examples", "256", "--test-examples", "100", "--epochs", "1", "--data-dir", mnist_data_dir,
       "--workdir-root", tmp_path / "runs", "--recipes-csv", recipes_csv, "--markdown", out_md],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  (row,) = list(csv.DictReader(recipes_csv.open()))
  accuracies = [float(a) for a in row["accuracies"].split()]
  assert row["recipe"] == "fast" and row["seeds"] == "0 1" and len(accuracies) == 2
  assert float(row["mean_accuracy"]) == pytest.approx(sum(accuracies) / 2, abs=1e-4)
  assert float(row["mean_wall_seconds"]) > 0
  assert row["tta"] == "none" and row["single_view_accuracies"] == row["accuracies"]
  page = out_md.read_text()
  assert page.startswith(table.rstrip()) and "## Recipes" in page and "| fast | convnet |" in page
  assert "LeCun et al., 1998" in page  # the published figures it is read against
  # Each model's best recipe beside its best in <= 60 s: a slice of one epoch is both.
  assert re.search(r"\| convnet \| fast \| [\d.]+% \| \d+ s \| fast \| [\d.]+% \| \d+ s \|", page)


def test_shift_augmentation_moves_each_image_by_at_most_two_pixels():
  from flaxzoo.training.augment import MAX_SHIFT, augment_batch
  augment_images = lambda key, images, names: augment_batch(key, images, None, names)[0]  # noqa: E731
  images = jnp.zeros((64, 12, 12, 1)).at[:, 4:8, 4:8, 0].set(1.0)  # a square away from the edges
  shifted = np.asarray(augment_images(jax.random.PRNGKey(0), images, "shift"))
  corners = np.array([np.argwhere(image[..., 0] > 0).min(0) for image in shifted])
  assert np.all(np.abs(corners - 4) <= MAX_SHIFT)
  assert len({tuple(c) for c in corners}) > 10  # images move independently
  np.testing.assert_array_equal(shifted.sum((1, 2, 3)), 16.0)  # moved, not cut
  again = np.asarray(augment_images(jax.random.PRNGKey(0), images, "shift"))
  np.testing.assert_array_equal(shifted, again)  # a function of the key alone
  assert augment_images(jax.random.PRNGKey(0), images, "none") is images
  with pytest.raises(ConfigError, match="augment must be none or comma-separated names from shift"):
    validate(Config(augment="blur"))
